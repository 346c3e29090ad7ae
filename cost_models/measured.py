"""Measured costs: time a compiled region once, remember it, answer from memory afterwards."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from graphopt.backends.base import device_of
from graphopt.backends.region import Region

from .base import CostModel
from .database import TimingDatabase, TimingRecord, device_key, library_versions
from .device_profile import DeviceProfile
from .features import region_features


MIN_TIMED_SECONDS = 0.02
"""The least time the timed calls of one kernel span: a 20 µs region timed 21 times spans half a
millisecond. Over three runs of 286 CPU regions on three backends, the runs agreed on the fastest
backend for 86% of the regions with this floor against 81% without it (the larger cause of the
disagreement was the allocator: ``benchmarks/report.py`` ``TUNED_MALLOC``)."""


SETTLE_SECONDS = 0.015
"""Untimed calls at least this long open each turn of :func:`time_in_turns`: another runtime's worker
threads keep spinning for milliseconds after it returns and would be charged to the kernel timed next
(2 cores: onnxruntime ran MobileNetV2 1.8x slower in the 4 ms after an eager torch call, whose OpenMP
workers spin on, and up to 1.5x slower until 11 ms after it)."""
ROUNDS = 3
"""Rounds of :func:`time_in_turns`: each turn costs a settling period, so a few long turns, not many short."""


def time_kernel(fn: Callable[..., object], inputs: Sequence[torch.Tensor], warmup: int = 3, repeats: int = 10,
                device: torch.device | None = None, min_seconds: float = 0.0) -> tuple[float, float, int]:
    """Median seconds of one call of ``fn(*inputs)``, the interquartile range, and the number of timed
    calls: at least ``repeats``, and more until they span ``min_seconds``.

    The median, because a shared machine's noise only ever adds time and
    comes in bursts that would drag a mean. The warm-up calls absorb lazy
    initialisation (allocator, autotuning, first-call compilation). On CUDA
    each call is bracketed by synchronizations, so the time is the kernel's,
    not its launch's.
    """
    return time_in_turns([fn], inputs, warmup, repeats, device, min_seconds)[0]


def time_in_turns(kernels: Sequence[Callable[..., object]], inputs: Sequence[torch.Tensor], warmup: int = 3,
                  repeats: int = 10, device: torch.device | None = None, min_seconds: float = 0.0,
                  rounds: int | None = None, settle_seconds: float | None = None) -> list[tuple[float, float, int]]:
    """``time_kernel`` of each kernel, timed in ``rounds`` rounds in which every kernel takes a turn:
    untimed calls spanning ``settle_seconds``, then ``repeats / rounds`` timed calls, more until they
    span ``min_seconds / rounds``. By default ``ROUNDS`` rounds settling ``SETTLE_SECONDS``, and one
    unsettled turn for a lone kernel: nothing runs between its calls.

    A burst of load on a shared machine then falls on every kernel alike:
    timed one after the other, a burst during one kernel's timing alone
    reverses the ranking (it sent a whole ResNet-50 at batch 8 to eager torch,
    65 ms a call, against onnxruntime's 38, in one benchmark run).
    """
    default_rounds, default_settle = (1, 0.0) if len(kernels) == 1 else (ROUNDS, SETTLE_SECONDS)
    rounds = default_rounds if rounds is None else rounds
    settle_seconds = default_settle if settle_seconds is None else settle_seconds
    if repeats < 1 or rounds < 1:
        raise ValueError(f"repeats and rounds must be at least 1, got {repeats} and {rounds}")
    device = device or device_of(inputs)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: list[list[float]] = [[] for _ in kernels]
    with torch.no_grad():
        for fn in kernels:
            for _ in range(warmup):
                fn(*inputs)
        sync()
        for _ in range(rounds):
            for fn, samples in zip(kernels, times):
                _calls_for(fn, inputs, sync, settle_seconds)
                samples += _calls_for(fn, inputs, sync, min_seconds / rounds, -(-repeats // rounds))
    return [_summary(samples) for samples in times]


def _calls_for(fn: Callable[..., object], inputs: Sequence[torch.Tensor], sync: Callable[[], None],
               seconds: float, calls: int = 0) -> list[float]:
    """Times of back-to-back calls of ``fn(*inputs)``: at least ``calls``, and more until they span ``seconds``."""
    times: list[float] = []
    while len(times) < calls or sum(times) < seconds:
        start = time.perf_counter()
        fn(*inputs)
        sync()
        times.append(time.perf_counter() - start)
    return times


def _summary(times: list[float]) -> tuple[float, float, int]:
    """Median, interquartile range and count of some call times."""
    if len(times) < 2:
        return times[0], 0.0, 1
    q1, _, q3 = statistics.quantiles(times, n=4)
    return statistics.median(times), q3 - q1, len(times)


def measure(region: Region, backend_name: str, kernel: Callable[..., object], inputs: Sequence[torch.Tensor],
            compile_seconds: float = 0.0, source: str = "", *, database: TimingDatabase | None = None,
            warmup: int = 3, repeats: int = 10, min_seconds: float = MIN_TIMED_SECONDS) -> TimingRecord:
    """Time ``kernel`` (the region compiled by ``backend_name``) on ``inputs`` and store the record."""
    return measure_in_turns(region, {backend_name: (kernel, compile_seconds)}, inputs, source, database=database,
                            warmup=warmup, repeats=repeats, min_seconds=min_seconds)[backend_name]


def measure_in_turns(region: Region, kernels: Mapping[str, tuple[Callable[..., object], float]],
                     inputs: Sequence[torch.Tensor], source: str = "", *, database: TimingDatabase | None = None,
                     warmup: int = 3, repeats: int = 10,
                     min_seconds: float = MIN_TIMED_SECONDS) -> dict[str, TimingRecord]:
    """Time the region's kernels (backend name: kernel and its compile seconds) in turns on ``inputs``
    and store a record for each."""
    device = device_of(inputs)
    timings = time_in_turns([k for k, _ in kernels.values()], inputs, warmup, repeats, device, min_seconds)
    database = database if database is not None else TimingDatabase()
    features, profile = region_features(region), DeviceProfile.for_device(device).numbers()
    records = {}
    for (name, (_, compile_seconds)), (seconds, spread, calls) in zip(kernels.items(), timings):
        records[name] = TimingRecord(region.hash, name, device_key(device), dict(library_versions(name)), seconds,
                                     spread, calls, compile_seconds, features, profile, source)
        database.add(records[name])
    return records


@dataclass
class MeasuredCostModel(CostModel):
    """The time recorded for this region, backend, device and library versions; None if never measured."""

    name = "measured"
    database: TimingDatabase = field(default_factory=TimingDatabase)

    def predict(self, region: Region, backend: str, device: torch.device) -> float | None:
        record = self.database.lookup(region.hash, backend, device_key(device))
        return None if record is None else record.seconds
