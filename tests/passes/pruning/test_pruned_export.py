"""Pruned models export to ONNX: in-place slice writes (``slice_scatter``/``copy``) import as canonical ops.

Swin writes its shifted-window mask (and Swin v2 its zeroed k bias) slice by slice; left
``torch.opaque`` they would have no ONNX form, pruned or not.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torchvision.models import swin_transformer as swin

import graphopt


def onnxruntime_outputs(graph: graphopt.Graph, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    session = ort.InferenceSession(graph.to_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})[0]


def assert_round_trip(model: nn.Module, inputs: tuple[torch.Tensor, ...], op: str) -> None:
    exported = torch.export.export(model, inputs)
    assert any(op in str(n.target) for n in exported.graph.nodes), f"the model has no aten {op}"
    graph = graphopt.optimize(graphopt.capture(model, inputs), "O1")
    assert not graph.find("torch.opaque"), [n.attrs.get("target") for n in graph.find("torch.opaque")]
    with torch.no_grad():
        expected = model(*inputs).numpy()
    np.testing.assert_allclose(onnxruntime_outputs(graph, inputs), expected, rtol=1e-5, atol=1e-6)


class SliceScatter(nn.Module):
    def __init__(self, dim: int, start: int | None, end: int | None, step: int) -> None:
        super().__init__()
        self.where = (dim, start, end, step)

    def forward(self, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        return torch.slice_scatter(x, src, *self.where) * 2


@pytest.mark.parametrize("dim,start,end,step", [
    (1, 2, 7, 1), (1, -7, -2, 2), (2, 1, None, 3), (0, None, 2, 1), (-1, 0, 100, 2), (1, 5, 5, 1)])
def test_slice_scatter_matches_torch(dim, start, end, step):
    torch.manual_seed(0)
    x = torch.randn(4, 9, 5)
    written = [slice(None)] * 3
    written[dim] = slice(start, end, step)
    src = torch.randn(x[tuple(written)].shape)
    assert_round_trip(SliceScatter(dim, start, end, step), (x, src), "slice_scatter")


class SliceWrites(nn.Module):
    """``x[a:b] = v`` with a broadcast scalar, a broadcast row and an integer source (cast on copy)."""

    def forward(self, x: torch.Tensor, row: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[:, 1:-2] = 3.0
        y[2:4] = row
        y[-1, ::2] = counts
        return y + 1


def test_slice_assignment_copy_matches_torch():
    torch.manual_seed(0)
    inputs = (torch.randn(5, 7), torch.randn(7), torch.arange(4))
    assert_round_trip(SliceWrites(), inputs, "copy")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pruned_swin_runs_in_onnxruntime(version):
    """A small torchvision Swin (shifted windows, so the mask is written slice by slice), pruned at 0.5."""
    torch.manual_seed(0)
    v2 = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if version == "v2" else {}
    model = swin.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                 window_size=[4, 4], num_classes=10, **v2).eval()
    inputs = (torch.randn(1, 3, 32, 32),)
    pruned = graphopt.prune(model, inputs, ratio=0.5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    graph = graphopt.optimize(graphopt.capture(pruned, inputs), "O1")
    assert not graph.find("torch.opaque")
    with torch.no_grad():
        expected = pruned(*inputs).numpy()
    np.testing.assert_allclose(onnxruntime_outputs(graph, inputs), expected, rtol=1e-4, atol=1e-5)
