"""The TVM backend: untuned regions match their torch execution; tuning fills a database once.

The fast tests compile untuned (a few seconds each). The slow one tunes a
small matmul region and checks that compiling it again, from a new backend and
a region with other weights, or as a region the index has never seen, reuses
the database instead of tuning.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from graphopt.api import capture, optimize
from graphopt.backends import _tvm
from graphopt.backends.base import cache_dir, random_inputs
from graphopt.backends.region import Region, partition
from graphopt.backends.tvm import TVMBackend, TunedRegions
from graphopt.testing import assert_close_outputs

pytestmark = pytest.mark.skipif(_tvm.available() is not None, reason=str(_tvm.available()))

CPU = torch.device("cpu")


def biggest_region(model: torch.nn.Module, *inputs: torch.Tensor, backend: TVMBackend | None = None) -> Region:
    graph = optimize(capture(model.eval(), inputs), "O2")
    regions = partition(graph, (backend or TVMBackend()).supports)
    return max(regions, key=lambda r: len(r.nodes))


def assert_matches_torch(region: Region, backend: TVMBackend | None = None) -> None:
    kernel = (backend or TVMBackend()).compile(region, CPU)
    inputs = random_inputs(region, CPU)
    with torch.no_grad():
        expected = region.graph.to_torch()(*inputs)
    got = kernel(*inputs)
    assert isinstance(got, tuple) and len(got) == len(region.graph.outputs)
    assert [t.dtype for t in got] == [t.dtype for t in expected]
    assert_close_outputs(expected, got, rtol=1e-4)


class ConvBnRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        torch.nn.init.uniform_(self.bn.running_var, 0.5, 2.0)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class LinearGelu(torch.nn.Module):
    def __init__(self, features: int = 32):
        super().__init__()
        self.linear = torch.nn.Linear(features, 64)

    def forward(self, x):
        return F.gelu(self.linear(x))


class TwoOutputs(torch.nn.Module):
    """A region with two outputs: the activation and a reduction of it."""

    def forward(self, x):
        y = torch.sigmoid(x) * x
        return y, y.mean(dim=-1)


def test_conv_bn_relu():
    region = biggest_region(ConvBnRelu(), torch.randn(2, 3, 16, 16))
    assert {"conv", "relu"} <= {n.op for n in region.nodes}
    assert_matches_torch(region)


def test_linear_gelu():
    region = biggest_region(LinearGelu(), torch.randn(4, 10, 32))
    assert "gelu" in {n.op for n in region.nodes}
    assert_matches_torch(region)


def test_layer_norm():
    region = biggest_region(torch.nn.LayerNorm(48), torch.randn(2, 7, 48))
    assert "layer_norm" in {n.op for n in region.nodes}
    assert_matches_torch(region)


def test_multi_output_region():
    region = biggest_region(TwoOutputs(), torch.randn(3, 20))
    assert len(region.graph.outputs) == 2
    assert_matches_torch(region)


def test_real_model_region():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    region = biggest_region(model, torch.randn(1, 3, 32, 32))
    assert sum(n.op == "conv" for n in region.nodes) >= 10
    assert_matches_torch(region)


def test_inputs_cross_without_copies_unless_strided():
    aligned = torch.randn(16, 16)
    assert torch.from_dlpack(_tvm._to_tvm(aligned)).data_ptr() == aligned.data_ptr()
    strided = torch.randn(16, 16).t()
    assert torch.equal(torch.from_dlpack(_tvm._to_tvm(strided)), strided)
    offset = torch.randn(300)[1:257]
    assert torch.equal(torch.from_dlpack(_tvm._to_tvm(offset)), offset)


def test_kernel_takes_views():
    region = biggest_region(LinearGelu(), torch.randn(4, 32))
    kernel = TVMBackend().compile(region, CPU)
    x = torch.randn(32, 4).t()
    with torch.no_grad():
        expected = region.graph.to_torch()(x)
    assert_close_outputs(expected, kernel(x), rtol=1e-4)


def test_supports_static_shapes_only():
    graph = optimize(capture(LinearGelu().eval(), (torch.randn(4, 32),), dynamic={0: {0: "batch"}}), "O2")
    assert not any(TVMBackend().supports(n) for n in graph.nodes if n.op in ("linear", "gelu"))


class Awkward(torch.nn.Module):
    """amax has no TVM importer, select of a negative index reads out of bounds, sort stays opaque."""

    def forward(self, x):
        return x.amax(-1), x[:, -1], x.sort(-1).values


def test_supports_leaves_out_what_tvm_imports_wrongly():
    graph = optimize(capture(Awkward().eval(), (torch.randn(4, 8),)), "O1")
    rejected = {n.op for n in graph.nodes if not TVMBackend().supports(n)}
    assert {"amax", "select", "torch.opaque"} <= rejected


def test_default_target_is_this_cpu():
    target = _tvm.target_for(CPU)
    assert target.kind.name == "llvm" and int(target.attrs["num-cores"]) >= 1
    assert _tvm.target_folder(target).startswith("llvm")
    with pytest.raises(ValueError, match="does not run"):
        _tvm.target_for(CPU, "cuda")


def test_unavailable_on_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert TVMBackend().unavailable(torch.device("cuda")) is not None
    assert TVMBackend().unavailable(CPU) is None


def test_rejects_negative_budget():
    with pytest.raises(ValueError, match="tune_trials"):
        TVMBackend(tune_trials=-1)


@pytest.mark.slow
def test_tuning_is_recorded_and_reused(monkeypatch):
    """Tunes once; then a new backend, other weights or a forgotten index reuse the database."""
    tuned: list[int] = []
    tune = _tvm.tune
    monkeypatch.setattr(_tvm, "tune", lambda *a, **k: tuned.append(tune(*a, **k)) or tuned[-1])
    x = torch.randn(16, 64)
    region = biggest_region(LinearGelu(64), x)
    folder = cache_dir("tvm", _tvm.target_folder(_tvm.target_for(CPU)))

    assert_matches_torch(region, TVMBackend(tune_trials=4, progress=False))
    assert tuned == [1]  # linear + gelu fuse into one workload
    records = (folder / "database_tuning_record.json").read_text().splitlines()
    assert records
    key = _tvm.target_key(_tvm.target_for(CPU))
    assert TunedRegions(folder / "regions.json").trials(key, region.hash) == 4

    other = biggest_region(LinearGelu(64), x)  # fresh weights, same structure
    assert other.hash == region.hash
    assert_matches_torch(other, TVMBackend(tune_trials=4, progress=False))
    assert tuned == [1], "a tuned region was tuned again"

    (folder / "regions.json").write_text(json.dumps({}))  # as if another model had tuned the workload
    assert_matches_torch(other, TVMBackend(tune_trials=4, progress=False))
    assert tuned == [1, 0]  # looked the workload up and found it
    assert (folder / "database_tuning_record.json").read_text().splitlines() == records
