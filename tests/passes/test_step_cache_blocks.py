"""find_blocks: a diffusion transformer's repeated blocks, found by dataflow alone.

Spec per model: as many blocks as the model has layers, in the runs its
architecture has (FLUX: double-stream, then single-stream blocks; a last block
that drops a stream it no longer updates is a run of its own), every node of
the span in one block or hoisted, each block reading only the previous block's
stream, values from before the span and constants, and outlining every block
leaves the model's outputs unchanged.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import graphopt
from graphopt import models
from graphopt.ir.region import outline
from graphopt.passes.step_cache.blocks import BlockSpan, conditioning_first, find_blocks

# builder, its layers arguments (None: the builder's own 2 layers), blocks expected, runs expected
CASES = {
    "dit": ("build_dit", None, [(0, 2)]),
    "pixart": ("build_pixart", None, [(0, 2)]),
    "sana": ("build_sana", None, [(0, 2)]),
    # SD3's last block reads the text stream without updating it: a run of its own.
    "sd3": ("build_sd3", 3, [(0, 2), (2, 3)]),
    # CogVideoX's last block computes no text output (nothing reads it).
    "cogvideox": ("build_cogvideox", None, [(0, 1), (1, 2)]),
    "wan": ("build_wan", None, [(0, 2)]),
    "ltx_video": ("build_ltx_video", None, [(0, 2)]),
    # Double-stream blocks, single-stream blocks, and the last single block that returns the image only.
    "flux": ("build_flux", 2, [(0, 2), (2, 3), (3, 4)]),
    "hunyuan_video": ("build_hunyuan_video", 2, [(0, 2), (2, 3), (3, 4)]),
    "mochi": ("build_mochi", 3, [(0, 2), (2, 3)]),
    # AuraFlow joins its text and image streams into one between its joint and single blocks: no residual
    # spans the join, so the span is the run of more nodes, the joint blocks (2 of 59 nodes) or the single
    # blocks (6 of 30).
    "auraflow": ("build_auraflow", (2, 3), [(0, 2)]),
    "auraflow_single": ("build_auraflow", (2, 6), [(0, 6)]),
    "allegro": ("build_allegro", None, [(0, 2)]),
}
SLOW = {"pixart", "sd3", "cogvideox", "wan", "ltx_video", "flux", "hunyuan_video", "mochi", "auraflow_single",
        "allegro"}


def _params(names=CASES):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


@functools.cache
def _captured(name: str):
    builder, layers, _ = CASES[name]
    torch.manual_seed(0)
    layers = () if layers is None else layers if isinstance(layers, tuple) else (layers,)
    model, inputs = getattr(models, builder)(*layers)
    return model, inputs, _in_conditioning_first(graphopt.capture(model, inputs))


def _in_conditioning_first(graph: graphopt.ir.Graph) -> graphopt.ir.Graph:
    """Blocks are found (and outlined by the pass) with the conditioning work first."""
    graph.reorder(conditioning_first(graph))
    return graph


def _check_invariants(graph: graphopt.ir.Graph, span: BlockSpan) -> None:
    order = {id(n): k for k, n in enumerate(graph)}
    nodes = graph.nodes
    first, last = order[id(span.blocks[0][0])], order[id(span.blocks[-1][-1])]
    # (a) every node of the span's range is in exactly one block or hoisted
    owner = [id(n) for block in span.blocks for n in block] + [id(n) for n in span.hoisted]
    assert len(owner) == len(set(owner))
    assert set(owner) == {id(n) for n in nodes[first:last + 1]}
    # blocks contiguous and in execution order
    for a, b in zip(span.blocks, span.blocks[1:]):
        assert order[id(a[-1])] < order[id(b[0])]
    block_of = {id(n): k for k, block in enumerate(span.blocks) for n in block}
    # (b) a block reads its predecessor's values, values from before the span (or hoisted), constants
    for k, block in enumerate(span.blocks):
        for n in block:
            for v in n.inputs:
                if v is None or v.is_constant or v.producer is None or id(v.producer) not in block_of:
                    continue
                assert block_of[id(v.producer)] in (k, k - 1), f"block {k} reads block {block_of[id(v.producer)]}"
    # (c) the stream enters the first block from before the span; after the span only stream_out is read
    assert span.stream_in and all(v.producer is None or order[id(v.producer)] < first for v in span.stream_in)
    stream_out = {id(v) for v in span.stream_out}
    for n in nodes[last + 1:]:
        for v in n.inputs:
            if v is not None and v.producer is not None and id(v.producer) in block_of:
                assert id(v) in stream_out
    assert all(block_of[id(v.producer)] == len(span.blocks) - 1 for v in span.stream_out)


@pytest.mark.parametrize("name", _params())
def test_finds_one_block_per_layer(name):
    model, inputs, graph = _captured(name)
    span = find_blocks(graph)
    assert span is not None
    assert span.runs == CASES[name][2]
    _check_invariants(graph, span)


@pytest.mark.parametrize("name", _params())
def test_outlining_each_block_keeps_outputs(name):
    model, inputs, captured = _captured(name)
    graph = captured.clone()
    span = find_blocks(graph)
    for k, block in enumerate(span.blocks):
        outline(graph, block, label=f"block{k}")
    assert len(graph.find("region")) == len(span.blocks)
    with torch.no_grad():
        expected = model(*inputs)
        got = graph.to_torch()(*inputs)
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_model_without_repeated_blocks_has_none():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16),
                        nn.Sigmoid(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    graph = graphopt.capture(net, (torch.randn(1, 3, 16, 16),))
    assert find_blocks(graph) is None


def test_single_layer_model_has_none():
    """DiT with one layer: nothing repeats."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    model = models.KwargsWrapper(dit, ("hidden_states", "timestep", "class_labels"), {"return_dict": False}).eval()
    graph = graphopt.capture(model, (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.tensor([3])))
    assert find_blocks(graph) is None


def test_runs_of_unequal_length():
    """FLUX with 2 double-stream and 4 single-stream blocks (the trained digits model's shape): every block
    is found, not just the longest run; the last single block returns the image stream only (a tail)."""
    from graphopt.digits import TRANSFORMER_CONFIG, image_ids
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(**TRANSFORMER_CONFIG).eval()
    model = models.KwargsWrapper(flux, ("hidden_states", "encoder_hidden_states", "pooled_projections",
                                        "timestep", "img_ids", "txt_ids"), {"return_dict": False})
    inputs = (torch.randn(2, 64, 16), torch.randn(2, 2, 64), torch.randn(2, 64), torch.tensor([0.5, 0.5]),
              image_ids(32, 32), torch.zeros(2, 3))
    graph = _in_conditioning_first(graphopt.capture(model, inputs))
    span = find_blocks(graph)
    assert span.runs == [(0, 2), (2, 5), (5, 6)]
    _check_invariants(graph, span)


def test_a_first_block_that_differs_is_a_block_of_its_own():
    """A pass changed the first layer only (sparse attention leaves the first layer's attention dense, as
    Sparse VideoGen does): that layer is still a block, a run of its own before the rest, not work left
    outside the span to run at every step."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    model = models.KwargsWrapper(dit, ("hidden_states", "timestep", "class_labels"), {"return_dict": False}).eval()
    graph = _in_conditioning_first(graphopt.capture(model, (torch.randn(1, 4, 8, 8), torch.tensor([10]),
                                                            torch.tensor([3]))))
    assert find_blocks(graph).runs == [(0, 3)]  # before: three equal blocks
    first = graph.find("sdpa")[0]
    first.attrs["scale"] = 16 ** -0.5  # the default scale spelled out: the same attention, another key
    span = find_blocks(graph)
    assert span.runs == [(0, 1), (1, 3)]
    _check_invariants(graph, span)
