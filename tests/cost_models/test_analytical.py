"""The device profile, region features and the roofline model, on small hand-built graphs."""
from __future__ import annotations

import math

import pytest
import torch

from graphopt.backends.region import Region, partition
from graphopt.cost_models import device_profile
from graphopt.cost_models.analytical import AnalyticalCostModel, BackendConstants
from graphopt.cost_models.database import device_key
from graphopt.cost_models.device_profile import DeviceProfile
from graphopt.cost_models.features import launches, region_features
from graphopt.ir import Graph, TensorType
from graphopt.passes.fusion_groups import MarkFusionGroups

CPU = torch.device("cpu")


def f32(*shape: int) -> TensorType:
    return TensorType(torch.float32, shape)


def as_region(graph: Graph) -> Region:
    MarkFusionGroups().call(graph)
    (region,) = partition(graph, lambda n: True)
    return region


def chain(length: int, shape: tuple[int, ...], with_views: bool = False) -> Region:
    """``length`` unary elementwise ops in a row (one fusion group), optionally a reshape pair between each."""
    g = Graph("chain")
    x = g.add_input("x", f32(*shape))
    for k in range(length):
        x = g.add_node(("sigmoid", "tanh", "relu")[k % 3], [x]).output
        if with_views:
            x = g.add_node("reshape", [x], {"shape": [-1]}).output
            x = g.add_node("reshape", [x], {"shape": list(shape)}).output
    g.outputs = [x]
    return as_region(g)


def matmul(m: int, k: int, n: int) -> Region:
    g = Graph("mm")
    a, b = g.add_input("a", f32(m, k)), g.add_input("b", f32(k, n))
    g.outputs = [g.add_node("matmul", [a, b]).output]
    return as_region(g)


@pytest.fixture
def measurements(tmp_path, monkeypatch):
    """An empty cache folder, no profile in memory (a process that never profiled this device), and
    a stand-in for the micro-benchmarks that records each run."""
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(device_profile, "_LOADED", {})
    calls = []

    def measure(cls, device):
        calls.append(device)
        return DeviceProfile(device_key(device), torch.__version__, 1e11, 2e10, 2e-6)

    monkeypatch.setattr(DeviceProfile, "measure", classmethod(measure))
    return calls


def test_device_profile_is_measured_once_and_cached_on_disk(measurements, tmp_path, monkeypatch):
    profile = DeviceProfile.for_device(CPU)
    assert DeviceProfile.for_device("cpu") is profile
    assert len(measurements) == 1
    (path,) = (tmp_path / "device").iterdir()
    assert f"{torch.get_num_threads()}t" in path.name and torch.__version__.split("+")[0] in path.name
    monkeypatch.setattr(device_profile, "_LOADED", {})  # a new process: reads the file, does not measure
    assert DeviceProfile.for_device(CPU) == profile
    assert len(measurements) == 1


def test_device_profile_is_per_thread_count(measurements, monkeypatch):
    DeviceProfile.for_device(CPU)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    assert DeviceProfile.for_device(CPU).device.endswith(f":{threads + 1}t")
    assert len(measurements) == 2


def test_micro_benchmarks_give_plausible_rates():
    profile = DeviceProfile.measure(CPU)
    assert profile.device == device_key(CPU)
    assert 1e9 < profile.peak_flops < 1e15
    assert 1e9 < profile.bandwidth < 1e13
    assert 1e-8 < profile.launch_overhead < 1e-4


def test_features_are_deterministic_and_scale_with_shapes():
    small, big = chain(6, (8, 64)), chain(6, (64, 512))
    assert region_features(small) == region_features(chain(6, (8, 64)))
    assert list(region_features(small)) == list(region_features(big))
    grows = ["log_flops", "log_eager_bytes", "log_fused_bytes", "log_input_bytes", "log_largest_tensor"]
    assert all(region_features(big)[k] > region_features(small)[k] for k in grows)
    assert region_features(matmul(256, 256, 256))["log_intensity"] > region_features(matmul(8, 256, 8))["log_intensity"]


def test_features_count_kernels_ops_and_fused_traffic():
    f = region_features(chain(6, (64, 512)))
    assert (f["nodes"], f["view_nodes"], f["eager_kernels"], f["fused_kernels"], f["fusion_groups"]) == (6, 0, 6, 1, 1)
    assert (f["category_elementwise"], f["op_relu"], f["op_matmul"]) == (6, 2, 0)
    assert (f["inputs"], f["outputs"]) == (1, 1)
    tensor = 64 * 512 * 4
    assert f["log_fused_bytes"] == pytest.approx(math.log1p(2 * tensor))  # read x, write the result
    assert f["log_eager_bytes"] == pytest.approx(math.log1p(12 * tensor))
    f = region_features(chain(6, (64, 512), with_views=True))  # reshapes between: no fusion group forms
    counts = f["nodes"], f["view_nodes"], f["eager_kernels"], f["fused_kernels"], f["category_shape"]
    assert counts == (18, 12, 6, 6, 12)


def conv(channels: int, groups: int, kernel: int, stride: int) -> Region:
    g = Graph("conv")
    x = g.add_input("x", f32(1, channels, 16, 16))
    w = g.add_input("w", f32(channels, channels // groups, kernel, kernel))
    g.outputs = [g.add_node("conv", [x, w], {"stride": (stride, stride), "padding": (kernel // 2,) * 2,
                                               "groups": groups}).output]
    return as_region(g)


def test_features_tell_conv_kinds_and_matmul_rows_apart():
    """A depthwise 3x3 and a dense 1x1 conv can do the same arithmetic; the library routines differ."""
    depthwise, pointwise = region_features(conv(64, 64, 3, 1)), region_features(conv(8, 1, 1, 2))
    assert (depthwise["conv_depthwise"], depthwise["conv_pointwise"], depthwise["conv_strided"]) == (1, 0, 0)
    assert (pointwise["conv_depthwise"], pointwise["conv_pointwise"], pointwise["conv_strided"]) == (0, 1, 1)
    assert depthwise["log_conv_kernel_area"] == pytest.approx(math.log1p(9))
    assert pointwise["log_conv_kernel_area"] == pytest.approx(math.log1p(1))
    assert region_features(matmul(8, 256, 8))["log_matmul_rows"] == pytest.approx(math.log1p(8))
    assert region_features(chain(2, (8, 8)))["log_matmul_rows"] == 0


def test_fused_kernel_moves_only_boundary_values():
    region = chain(4, (32, 32))
    (fused,) = launches(region.graph, fused=True)
    assert len(fused.nodes) == 4 and fused.bytes == 2 * 32 * 32 * 4
    assert [k.bytes for k in launches(region.graph, fused=False)] == [2 * 32 * 32 * 4] * 4


def test_bigger_matmul_predicts_more_time():
    model = AnalyticalCostModel()
    times = [model.predict(matmul(n, n, n), "torch", CPU) for n in (64, 256, 1024)]
    assert times[0] < times[1] < times[2]
    profile = DeviceProfile.for_device(CPU)
    assert times[2] >= 2 * 1024**3 / profile.peak_flops  # never faster than the peak


def test_eager_pays_for_every_node_of_an_elementwise_chain(monkeypatch):
    profile = DeviceProfile("test", torch.__version__, peak_flops=1e11, bandwidth=2e10, launch_overhead=2e-6)
    monkeypatch.setattr(DeviceProfile, "for_device", classmethod(lambda cls, device: profile))
    model = AnalyticalCostModel()
    region = chain(12, (512, 1024))
    eager, fused = model.predict(region, "torch", CPU), model.predict(region, "inductor", CPU)
    elements = 512 * 1024
    assert eager == pytest.approx(12 * (8 * elements / 2e10 + 2 * 2e-6))  # memory-bound: 12 round trips
    assert fused == pytest.approx(12 * elements / (0.1 * 1e11) + (1 + 10) * 2e-6)  # one pass, compute-bound
    assert eager > 3 * fused


def test_view_nodes_cost_nothing():
    model = AnalyticalCostModel()
    assert model.predict(chain(6, (64, 512), with_views=True), "torch", CPU) == pytest.approx(
        model.predict(chain(6, (64, 512)), "torch", CPU))


def test_untuned_tvm_is_much_slower_on_compute_bound_regions():
    model = AnalyticalCostModel()
    region = matmul(512, 512, 512)
    assert model.predict(region, "tvm", CPU) > 10 * model.predict(region, "torch", CPU)


def test_unknown_backend_has_no_estimate_and_constants_are_overridable():
    model = AnalyticalCostModel()
    assert model.predict(chain(2, (8, 8)), "tensorrt", CPU) is None
    slow = AnalyticalCostModel({"torch": BackendConstants(fused=False, library_efficiency=0.01)})
    region = matmul(256, 256, 256)
    assert slow.predict(region, "torch", CPU) > 10 * model.predict(region, "torch", CPU)
