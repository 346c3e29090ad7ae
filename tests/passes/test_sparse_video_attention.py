"""The ``sparse_video_attention`` pass (Sparse VideoGen): grid, band kernel, head profiling, the rewrite.

Exact at density 1.0 (every band is the whole sequence), lossy below: the
quality bound on the trained video DiT is in tests/test_diffusers_sparse_attention.py.
"""
from __future__ import annotations

import functools
import time
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt.errors import InvalidOptionError, UnsupportedModelError
from graphopt.models import MODEL_CASES, build_allegro, build_cogvideox, build_mochi
from graphopt.passes.sparse_attention.grid import Band, VideoGrid
from graphopt.passes.sparse_attention.kernels import band_attention, band_attention_reference
from graphopt.passes.sparse_attention.profile import DENSE, SPATIAL, TEMPORAL, classify_heads, sample_rows
from graphopt.passes.sparse_attention.runtime import Settings, kernel_for
from graphopt.testing import max_rel_error, planted_video_heads


# ------------------------------------------------------------------- grid
def test_token_major_order_puts_each_position_s_frames_together():
    grid = VideoGrid(frames=3, height=1, width=4)
    frame_major = torch.arange(12)  # token 4f + p
    assert grid.to_token_major(frame_major, 0).tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert grid.to_frame_major(grid.to_token_major(frame_major, 0), 0).equal(frame_major)
    assert grid.to_token_major(frame_major, 0)[grid.token_major_positions].equal(frame_major)


def test_a_band_keeps_its_density_of_key_blocks_centred_on_each_query_block():
    band = Band.for_density(1024, 0.25)
    assert (band.block, band.window) == (128, 256)
    mask = band.mask(torch.arange(1024), 1024)
    assert mask.float().mean().item() == pytest.approx(0.25)
    assert mask[0, :256].all() and mask[1023, -256:].all()  # clipped at the ends, never shorter
    assert mask[512].nonzero().flatten().tolist() == list(range(448, 704))  # rows 512-639, centred at 576


@pytest.mark.parametrize("tokens, density, block, window", [
    (13312, 0.25, 1024, 3328),  # CogVideoX's 13 frames of 32 x 32: 13 blocks, a quarter of the keys in 256s
    (4096, 0.25, 512, 1024),
    (13312, 0.04, 512, 512),  # a window shorter than the longest block shortens the block
])
def test_long_sequences_get_long_query_blocks_and_their_windows_keep_the_density(tokens, density, block, window):
    band = Band.for_density(tokens, density)
    assert (band.block, band.window) == (block, window)
    assert band.mask(torch.arange(tokens), tokens).float().mean().item() == pytest.approx(window / tokens)


# ----------------------------------------------------------------- kernel
@pytest.mark.parametrize("tokens, density, text", [(96, 0.25, 0), (100, 0.3, 7), (64, 0.5, 5)])
def test_band_attention_equals_dense_attention_under_the_band_mask(tokens, density, text):
    torch.manual_seed(0)
    band = Band.for_density(tokens, density, block=16)
    q, k, v = (torch.randn(2, 3, tokens, 8) for _ in range(3))
    extra = tuple(torch.randn(2, 3, text, 8) for _ in range(2)) if text else (None, None)
    torch.testing.assert_close(band_attention(q, k, v, band, *extra), band_attention_reference(q, k, v, band, *extra))


def test_band_attention_at_density_one_is_attention():
    q, k, v = (torch.randn(1, 2, 80, 8) for _ in range(3))
    band = Band.for_density(80, 1.0, block=16)
    torch.testing.assert_close(band_attention(q, k, v, band), F.scaled_dot_product_attention(q, k, v))


def test_band_attention_applies_a_key_mask_to_text_keys():
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    tk, tv = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    keep_text = torch.tensor([True] * 4 + [False] * 2).view(1, 1, 1, 6)
    band = Band.for_density(64, 1.0, block=16)
    got = band_attention(q, k, v, band, tk, tv, torch.ones(1, 1, 1, 64, dtype=torch.bool), keep_text)
    expected = F.scaled_dot_product_attention(q, torch.cat([k, tk[..., :4, :]], -2), torch.cat([v, tv[..., :4, :]], -2))
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- profile
def test_profiling_names_planted_spatial_and_temporal_heads_and_keeps_the_rest_dense():
    right = known = 0
    for seed in range(3):
        q, k, v, grid, truth = planted_video_heads(seed=seed)
        rows = sample_rows(grid, 64, torch.Generator().manual_seed(seed))
        found = classify_heads(q, k, v, grid, [Band.for_density(grid.video, 0.25)], rows, budget=0.05).kinds
        planted = truth != DENSE
        right += int((found[planted] == truth[planted]).sum())
        known += int(planted.sum())
        assert (found[~planted] == DENSE).all(), "near-uniform heads fit neither band"
    assert right / known >= 0.95
    assert (truth == SPATIAL).any() and (truth == TEMPORAL).any()


def test_sampled_rows_cover_every_frame_and_svg_s_draw_only_the_first_tokens():
    grid = VideoGrid(frames=16, height=32, width=32)
    ours = sample_rows(grid, 64, torch.Generator().manual_seed(0))
    svg = sample_rows(grid, 64, torch.Generator().manual_seed(0), first=10_000)
    assert set((ours // grid.per_frame).tolist()) == set(range(16))
    assert (svg < 10_000).all() and (svg // grid.per_frame).max() < 10


# ------------------------------------------------------------------- pass
class VideoSelfAttention(torch.nn.Module):
    """A patch embedding, text tokens joined before the video tokens, one attention, an unpatchify."""

    def __init__(self, width: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Conv3d(4, width, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, 4 * 4)

    def forward(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = video.shape
        x = self.embed(video).flatten(2).transpose(1, 2)
        x = torch.cat([text, x], 1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = self.out(x[:, text.shape[1]:])
        return x.reshape(b, f, h // 2, w // 2, -1)


@functools.lru_cache(maxsize=None)
def small_video_graph():
    torch.manual_seed(0)
    model = VideoSelfAttention().eval()
    inputs = (torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, 32))
    return model, inputs


def sparse(options: dict | None = None, inputs_model=None):
    model, inputs = inputs_model or small_video_graph()
    graph = graphopt.optimize(graphopt.capture(model, inputs), "O1", passes=["sparse_video_attention"],
                              options={"sparse_video_attention": {"dense_layers": 0, **(options or {})}})
    return graph


def stats(graph) -> dict:
    return next(r.stats for r in graph.meta["report"].records if r.name == "sparse_video_attention" and r.modified)


def test_the_pass_reads_the_grid_and_text_side_off_the_graph():
    graph = sparse({"density": 0.5})
    (node,) = graph.find("video_sparse_attention")
    assert node.attrs["grid"] == [3, 4, 4] and node.attrs["text"] == 5 and node.attrs["text_first"]
    assert stats(graph)["attention_replaced"] == 1
    assert not graph.find("sdpa")


def test_at_density_one_the_emitted_module_equals_dense_attention():
    model, inputs = small_video_graph()
    module = sparse({"density": 1.0}).to_torch()
    with torch.no_grad():
        torch.testing.assert_close(module(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_below_density_one_it_differs_and_the_head_map_is_module_state():
    model, inputs = small_video_graph()
    module = sparse({"density": 0.25, "dense_steps": 1, "dense_heads": False}).to_torch()
    with torch.no_grad():
        first, second = module(*inputs), module(*inputs)
        torch.testing.assert_close(first, model(*inputs))  # the first call is dense
        assert not torch.allclose(second, first)
    (attention,) = [m for m in module.modules() if hasattr(m, "head_counts")]
    counts = attention.head_counts()
    assert counts["calls"] == 2 and counts["spatial"] + counts["temporal"] + counts["dense"] == 2 * 2
    module.graphopt_state.reset()
    assert attention.head_counts()["calls"] == 0


def test_named_branches_keep_their_own_head_maps():
    model, inputs = small_video_graph()
    module = sparse({"density": 0.25, "dense_steps": 1}).to_torch()
    with torch.no_grad():
        for branch in ("cond", "uncond"):
            with module.graphopt_state.branch(branch):
                module(*inputs)
    (attention,) = [m for m in module.modules() if hasattr(m, "head_counts")]
    assert [m.calls for m in module.graphopt_state.memories_of(attention.key)] == [1, 1]  # each branch's first


@pytest.mark.parametrize("options, error, text", [
    ({"density": 0.0}, InvalidOptionError, r"density must be in \(0, 1\]"),
    ({"density": 1.5}, InvalidOptionError, r"density must be in \(0, 1\]"),
    ({"video_shape": (3, 4, 5)}, InvalidOptionError, r"is 60 tokens, more than the 53 .*; fix video_shape"),
    ({"video_shape": (3, 4, 4), "text_tokens": 4}, InvalidOptionError, "runs over 53; fix video_shape or text_tokens"),
    ({"text_position": "middle"}, InvalidOptionError, "text_position is 'first' or 'last'"),
])
def test_bad_options_get_one_line_naming_the_fix(options, error, text):
    with pytest.raises(error, match=text) as caught:
        sparse(options)
    assert "\n" not in str(caught.value)


def test_a_model_without_attention_is_refused_clearly():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(UnsupportedModelError, match="found no self-attention"):
        sparse({}, (model, (torch.randn(1, 3, 8, 8),)))


def test_an_attention_without_a_grid_asks_for_video_shape():
    class Tokens(torch.nn.Module):
        def forward(self, x):
            q = x.unflatten(-1, (2, -1)).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q)

    with pytest.raises(UnsupportedModelError, match=r"give video_shape=\(frames, height, width\)"):
        sparse({}, (Tokens(), (torch.randn(1, 48, 16),)))
    graph = sparse({"video_shape": (3, 4, 4)}, (Tokens(), (torch.randn(1, 48, 16),)))
    assert graph.find("video_sparse_attention")


def test_onnx_export_of_a_sparse_graph_is_refused_clearly():
    with pytest.raises(Exception, match="keeps state across calls"):
        sparse({"density": 0.5}).to_onnx()


def test_through_torch_compile():
    model, inputs = small_video_graph()
    compiled = torch.compile(model, backend="graphopt", options={
        "passes": ["sparse_video_attention"], "pass_options": {"sparse_video_attention": {"density": 1.0,
                                                                                            "dense_layers": 0}}})
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ----------------------------------------------- diffusers' video transformers
VIDEO = {"diffusers.cogvideox": {}, "diffusers.hunyuan_video": {}, "diffusers.wan": {},
         "diffusers.ltx_video": {"video_shape": (2, 4, 4)}, "mochi": {}, "allegro": {}}  # Allegro: beyond the list
BUILDERS = {"mochi": build_mochi, "allegro": build_allegro}
EXPECTED_GRID = {"diffusers.cogvideox": ([2, 4, 4], 8, True), "diffusers.hunyuan_video": ([2, 4, 4], 8, False),
                 "mochi": ([2, 4, 4], None, False), "allegro": ([2, 4, 4], 0, True),
                 "diffusers.wan": ([2, 4, 4], 0, True), "diffusers.ltx_video": ([2, 4, 4], 0, True)}


@pytest.mark.slow
@pytest.mark.parametrize("name", VIDEO)
def test_every_video_self_attention_is_replaced_and_density_one_equals_dense(name):
    model, inputs = BUILDERS[name]() if name in BUILDERS else MODEL_CASES[name].build()
    with torch.no_grad():
        reference = model(*inputs)
    graph = sparse({"density": 1.0, **VIDEO[name]}, (model, inputs))
    before = graphopt.optimize(graphopt.capture(model, inputs), "O1")
    lengths = [(n.inputs[0].type.shape[-2], n.inputs[1].type.shape[-2]) for n in before.find("sdpa")]
    self_attentions = [q for q, k in lengths if str(q) == str(k) and (not isinstance(q, int) or q >= 32)]  # 2x4x4
    replaced = graph.find("video_sparse_attention")
    assert len(replaced) == len(self_attentions) >= 1
    if name in EXPECTED_GRID:
        grid, text, first = EXPECTED_GRID[name]
        assert all((n.attrs["grid"], n.attrs["text"], n.attrs["text_first"]) == (grid, text, first) for n in replaced)
    with torch.no_grad():
        assert max_rel_error(reference, graph.to_torch()(*inputs)) <= 1e-4


# ------------------------------------------------------------------ layout
def sparse_heads(layout: str, inputs_model=None, **options):
    """Every head sparse (no dense choice), in the given layout."""
    return sparse({"density": 0.25, "dense_heads": False, "layout": layout, **options}, inputs_model)


def test_layout_token_runs_the_attention_token_major_with_permutations_only_at_the_ends():
    model, inputs = small_video_graph()
    graph = sparse_heads("token")
    (node,) = graph.find("video_sparse_attention")
    assert node.attrs["order"] == "token"
    assert (stats(graph)["layout_permutations_placed"], stats(graph)["layout_permutations_left"]) == (4, 2)
    takes = graph.find("take")
    assert takes[0].inputs[0].producer.op == "reshape"  # the patch embedding's flatten, before the text joins
    assert takes[1].output is graph.outputs[0].producer.inputs[0] or takes[1].output is graph.outputs[0]
    frame, token = sparse_heads("frame").to_torch(), graph.to_torch()
    with torch.no_grad():
        torch.testing.assert_close(token(*inputs), frame(*inputs), rtol=1e-5, atol=1e-5)
        assert max_rel_error(model(*inputs), token(*inputs)) > 1e-3  # sparse, not dense
    maps = [next(m for m in module.modules() if hasattr(m, "head_counts")).memory().head_map.kinds
            for module in (frame, token)]
    assert maps[0].equal(maps[1])


def test_layout_token_needs_a_text_length_known_when_compiling():
    with pytest.raises(InvalidOptionError, match="layout='token' needs a text length known when compiling"):
        sparse({"layout": "token"}, build_mochi())
    with pytest.raises(InvalidOptionError, match="layout is 'frame' or 'token'"):
        sparse({"layout": "diagonal"})


def three_frames(name: str):
    """The mechanics models with 3 x 4 x 4 video tokens: none of their lengths equals their width (32)."""
    if name == "diffusers.cogvideox":
        return build_cogvideox(latent_frames=3)
    model, inputs = BUILDERS[name]() if name in BUILDERS else MODEL_CASES[name].build()
    if name == "diffusers.ltx_video":
        model.static_kwargs["num_frames"] = 3
        return model, (torch.randn(1, 48, 8), *inputs[1:])
    return model, (torch.randn(*inputs[0].shape[:2], 3, *inputs[0].shape[3:]), *inputs[1:])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["diffusers.cogvideox", "diffusers.hunyuan_video", "diffusers.wan",
                                  "diffusers.ltx_video", "allegro"])
def test_layout_token_folds_each_layer_s_permutations_on_diffusers_video_transformers(name):
    model, inputs = three_frames(name)
    options = {"video_shape": (3, 4, 4)} if name == "diffusers.ltx_video" else {}
    token = sparse_heads("token", (model, inputs), **options)
    placed, left = stats(token)["layout_permutations_placed"], stats(token)["layout_permutations_left"]
    assert placed >= 8 and left <= 3, (placed, left)  # 4-5 per layer placed; the start, the end (and a key mask)
    with torch.no_grad():
        torch.testing.assert_close(token.to_torch()(*inputs), sparse_heads("frame", (model, inputs), **options)
                                   .to_torch()(*inputs), rtol=1e-4, atol=1e-5)
        exact = sparse({"density": 1.0, "layout": "token", **options}, (model, inputs)).to_torch()
        assert max_rel_error(model(*inputs), exact(*inputs)) <= 1e-4


# ----------------------------------------------------------------- kernels
def test_the_kernel_is_the_one_timed_faster_once_per_shape():
    calls = Counter()

    def kernel(name: str, seconds: float):
        def run():
            calls[name] += 1
            time.sleep(seconds)
        return run

    candidates = {"torch": kernel("torch", 0.02), "triton": kernel("triton", 0.0)}
    shape = (torch.float32, 1, 2, 3, Settings(VideoGrid(2, 4, 4), levels=2).bands)  # the runtime's key
    assert kernel_for(candidates, shape, torch.device("cpu")) == "triton"
    assert calls == {"torch": 2, "triton": 2}  # a warm-up (Triton compiles) and a timed call each
    assert kernel_for(candidates, shape, torch.device("cpu")) == "triton"
    assert calls == {"torch": 2, "triton": 2}  # the choice is kept for the shape
    assert kernel_for({"torch": kernel("torch", 0.0)}, ("test", 4), torch.device("cpu")) == "torch"
    assert calls["torch"] == 2  # a lone candidate is not timed


def test_on_cpu_the_sparse_heads_run_on_torch_s_kernels():
    model, inputs = small_video_graph()
    module = sparse({"density": 0.25, "dense_heads": False}).to_torch()
    with torch.no_grad():
        module(*inputs)
    (attention,) = [m for m in module.modules() if hasattr(m, "kernel_calls")]
    assert attention.kernel_calls() == {"torch": 1}


def test_a_timed_attention_clocks_its_dense_step_calls_and_the_rest_apart():
    model, inputs = small_video_graph()
    module = sparse({"density": 0.25, "dense_steps": 1}).to_torch()
    (attention,) = [m for m in module.modules() if hasattr(m, "timed")]
    with torch.no_grad():
        module(*inputs)
        assert attention.timed() == ([0.0, 0.0], [0, 0])  # untimed by default: nothing is synchronised
        attention.timing = True
        for _ in range(3):
            module(*inputs)
    seconds, calls = attention.timed()
    assert calls == [0, 3] and seconds[0] == 0.0 < seconds[1]  # the dense step was the untimed first call
    module.graphopt_state.reset()
    with torch.no_grad():
        module(*inputs)
    assert attention.timed()[1] == [1, 0]  # a new run's first call is its dense step
