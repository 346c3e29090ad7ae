"""Measured costs: time a compiled region once, remember it, answer from memory afterwards."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
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
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = device or device_of(inputs)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: list[float] = []
    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        sync()
        while len(times) < repeats or sum(times) < min_seconds:
            start = time.perf_counter()
            fn(*inputs)
            sync()
            times.append(time.perf_counter() - start)
    if len(times) < 2:
        return times[0], 0.0, 1
    q1, _, q3 = statistics.quantiles(times, n=4)
    return statistics.median(times), q3 - q1, len(times)


def measure(region: Region, backend_name: str, kernel: Callable[..., object], inputs: Sequence[torch.Tensor],
            compile_seconds: float = 0.0, source: str = "", *, database: TimingDatabase | None = None,
            warmup: int = 3, repeats: int = 10, min_seconds: float = MIN_TIMED_SECONDS) -> TimingRecord:
    """Time ``kernel`` (the region compiled by ``backend_name``) on ``inputs`` and store the record."""
    device = device_of(inputs)
    seconds, spread, calls = time_kernel(kernel, inputs, warmup, repeats, device, min_seconds)
    record = TimingRecord(region.hash, backend_name, device_key(device), dict(library_versions(backend_name)),
                          seconds, spread, calls, compile_seconds, region_features(region),
                          DeviceProfile.for_device(device).numbers(), source)
    (database if database is not None else TimingDatabase()).add(record)
    return record


@dataclass
class MeasuredCostModel(CostModel):
    """The time recorded for this region, backend, device and library versions; None if never measured."""

    name = "measured"
    database: TimingDatabase = field(default_factory=TimingDatabase)

    def predict(self, region: Region, backend: str, device: torch.device) -> float | None:
        record = self.database.lookup(region.hash, backend, device_key(device))
        return None if record is None else record.seconds
