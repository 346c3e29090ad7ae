"""The timing database, the kernel timer and the measured cost model."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from graphopt.backends.base import random_inputs
from graphopt.backends.region import Region, partition
from graphopt.cost_models.database import TimingDatabase, TimingRecord, device_key, library_versions
from graphopt.cost_models.measured import MeasuredCostModel, measure, time_in_turns, time_kernel
from graphopt.ir import Graph, TensorType
from graphopt.passes.fusion_groups import MarkFusionGroups

CPU = torch.device("cpu")


def relu_chain(width: int) -> Region:
    g = Graph("chain")
    x = g.add_input("x", TensorType(torch.float32, (4, width)))
    for _ in range(3):
        x = g.add_node("relu", [x]).output
    g.outputs = [x]
    MarkFusionGroups().call(g)
    (region,) = partition(g, lambda n: True)
    return region


def record(**changes) -> TimingRecord:
    base = TimingRecord("abc123", "onnxruntime", "cpu:test:2t", {"torch": "2.0", "onnxruntime": "1.0"},
                        seconds=1e-4, spread=1e-6, repeats=10, compile_seconds=0.5,
                        features={"log_flops": 3.0}, profile={"peak_flops": 1e11}, source="resnet")
    return dataclasses.replace(base, **changes)


def test_round_trip_through_the_file(tmp_path):
    db = TimingDatabase(tmp_path / "t.jsonl")
    db.add(record())
    db.add(record(backend="tvm", versions={"torch": "2.0", "apache-tvm": "0.27"}, seconds=3e-4))
    again = TimingDatabase(tmp_path / "t.jsonl")
    assert list(again) == list(db) and len(again) == 2
    hit = again.lookup("abc123", "onnxruntime", "cpu:test:2t", {"onnxruntime": "1.0", "torch": "2.0"})
    assert hit == record()


def test_other_versions_device_or_hash_miss(tmp_path):
    db = TimingDatabase(tmp_path / "t.jsonl")
    db.add(record())
    assert db.lookup("abc123", "onnxruntime", "cpu:test:2t", {"torch": "2.0", "onnxruntime": "1.1"}) is None
    assert db.lookup("abc123", "onnxruntime", "cpu:test:2t", {"torch": "2.1", "onnxruntime": "1.0"}) is None
    assert db.lookup("abc123", "onnxruntime", "cpu:test:4t", {"torch": "2.0", "onnxruntime": "1.0"}) is None
    assert db.lookup("abc124", "onnxruntime", "cpu:test:2t", {"torch": "2.0", "onnxruntime": "1.0"}) is None
    assert db.lookup("abc123", "onnxruntime", "cpu:test:2t") is None  # installed versions: torch is not 2.0


def test_latest_record_of_a_key_wins_and_all_stay_for_training(tmp_path):
    db = TimingDatabase(tmp_path / "t.jsonl")
    db.add(record(seconds=1.0))
    db.add(record(seconds=2.0))
    versions = {"torch": "2.0", "onnxruntime": "1.0"}
    assert TimingDatabase(db.path).lookup("abc123", "onnxruntime", "cpu:test:2t", versions).seconds == 2.0
    assert [r.seconds for r in TimingDatabase(db.path)] == [1.0, 2.0]


def test_library_versions_name_the_backends_library():
    assert library_versions("torch") == {"torch": torch.__version__}
    assert set(library_versions("onnxruntime")) == {"torch", "onnxruntime"}
    assert set(library_versions("tvm")) == {"torch", "apache-tvm"}
    assert device_key(CPU) == device_key("cpu") and device_key(CPU).endswith(f":{torch.get_num_threads()}t")


def test_time_kernel_reports_median_and_spread():
    calls = []

    def sleepy(x):
        calls.append(x)
        time.sleep(0.002 if len(calls) % 2 else 0.001)

    median, spread, timed = time_kernel(sleepy, [torch.zeros(1)], warmup=2, repeats=7)  # 4 of 2 ms, 3 of 1 ms
    assert len(calls) == 9 and timed == 7
    assert 0.002 <= median < 0.01  # the median, not the mean (1.6 ms)
    assert 0.0005 < spread < 0.01
    with pytest.raises(ValueError):
        time_kernel(sleepy, [torch.zeros(1)], repeats=0)


def test_time_kernel_times_short_kernels_for_at_least_min_seconds():
    calls = []

    def short(x):
        calls.append(x)
        time.sleep(0.001)

    _, _, timed = time_kernel(short, [torch.zeros(1)], warmup=1, repeats=3, min_seconds=0.1)
    assert len(calls) == timed + 1
    assert 3 < timed <= 100  # every call sleeps at least 1 ms, so 100 of them span the 0.1 s


def test_time_in_turns_settles_so_no_kernel_is_charged_for_threads_another_left_spinning():
    spinning_until = [0.0]

    def spinner(x):  # 1.3 ms a call; its "worker threads" keep a core busy for 10 ms after it returns
        time.sleep(0.0013)
        spinning_until[0] = time.perf_counter() + 0.01

    def victim(x):  # 1 ms a call, 3 ms while the spinner's threads spin
        time.sleep(0.003 if time.perf_counter() < spinning_until[0] else 0.001)

    x = [torch.zeros(1)]
    (spinner_s, _, _), (victim_s, _, _) = time_in_turns([spinner, victim], x, warmup=1, repeats=6, min_seconds=0.02,
                                                        settle_seconds=0.0)
    assert victim_s > 2 * spinner_s, "unsettled, every timed victim call comes right after a spinner turn"
    (spinner_s, _, spinner_calls), (victim_s, _, victim_calls) = time_in_turns([spinner, victim], x, warmup=1,
                                                                               repeats=6, min_seconds=0.02)
    assert victim_s < spinner_s
    assert min(spinner_calls, victim_calls) >= 6


def test_measure_stores_a_record_the_measured_model_answers_from(tmp_path):
    db = TimingDatabase(tmp_path / "t.jsonl")
    region = relu_chain(256)
    rec = measure(region, "torch", region.graph.to_torch(), random_inputs(region, CPU), compile_seconds=0.25,
                  source="chain", database=db, warmup=1, repeats=3, min_seconds=0.0)
    assert (rec.region_hash, rec.backend, rec.device, rec.repeats) == (region.hash, "torch", device_key(CPU), 3)
    assert rec.source == "chain"
    assert rec.seconds > 0 and rec.compile_seconds == 0.25 and rec.features["eager_kernels"] == 3
    assert set(rec.profile) == {"peak_flops", "bandwidth", "launch_overhead"}
    model = MeasuredCostModel(TimingDatabase(db.path))
    assert model.predict(relu_chain(256), "torch", CPU) == rec.seconds  # another region, same structure
    assert model.predict(relu_chain(128), "torch", CPU) is None
    assert model.predict(region, "onnxruntime", CPU) is None
