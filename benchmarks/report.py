"""What the benchmark scripts share: the machine line, round-robin timings, geometric means, failure reasons in
table cells, measurements in processes of their own, shared options."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from graphopt.cost_models.measured import SETTLE_SECONDS

SETTLE_MS = SETTLE_SECONDS * 1e3
"""Untimed calls this long precede each timed turn of :func:`time_in_turns` by default."""


def machine() -> str:
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), {allocator()}"


TUNED_MALLOC = "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=2147483647"
"""``GLIBC_TUNABLES`` that keep freed memory in the heap: with glibc's defaults a large tensor freed
at the top of the heap goes back to the OS and the next one page-faults its memory in again, which
made a 64-channel depthwise conv on a 56x56 map take about 1.7 ms here instead of about 0.3 ms.
Runtimes with their own arenas (onnxruntime) never see the difference; eager and inductor do."""


def restart_with_tuned_malloc() -> None:
    """Run this script again under ``TUNED_MALLOC`` unless it already is: glibc reads its tunables
    only when a process starts."""
    if os.environ.get("GLIBC_TUNABLES") != TUNED_MALLOC:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": TUNED_MALLOC})


def allocator() -> str:
    """The malloc the process runs with, for the results header: timings of torch on CPU depend on it."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return name
    if os.environ.get("GLIBC_TUNABLES") == TUNED_MALLOC:
        return "glibc malloc, tuned (freed memory kept: benchmarks/report.py TUNED_MALLOC)"
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith("glibc.malloc.")]
    return f"glibc malloc ({', '.join(tunables)})" if tunables else "glibc malloc, default thresholds"


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def failure_cell(exc: Exception) -> str:
    """An exception as one short markdown-safe table cell."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:120]}".replace("|", "/")


@dataclass
class Timing:
    """Median and quartiles of repeated timings, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float

    @staticmethod
    def of(times_ms: list[float]) -> Timing:
        q1, median, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
        return Timing(median, q1, q3)

    def cell(self) -> str:
        """The median with the interquartile range in brackets."""
        return f"{self.median_ms:.2f} ({self.q3_ms - self.q1_ms:.2f})"


def round_robin(runs: Sequence[Callable[[], object]], repeats: int, warmup: int,
                settle_ms: float = 0.0) -> list[Timing]:
    """Time ``runs`` in turns, one timed call each per round, so load from other processes falls on all alike
    (``settle_ms``: see :func:`time_in_turns`)."""
    return [Timing.of(ts) for ts in time_in_turns(runs, repeats, warmup, 0.0, settle_ms)]


def time_alone(run: Callable[[], object], repeats: int, warmup: int, sample_ms: float) -> list[float]:
    """Time ``run`` with nothing else running in the process: ``repeats`` samples (ms), each the mean of
    as many back-to-back calls as fill ``sample_ms`` (counted from the warm-up), so a sub-millisecond
    call is not measured against the clock's and the loop's own cost."""
    return time_in_turns([run], repeats, warmup, sample_ms, settle_ms=0.0)[0]


def batch_sizes(text: str) -> list[int]:
    """An argparse type: ``"1,8"`` → ``[1, 8]``; anything else is a one-line usage error."""
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive batch sizes like 1,8, got {text!r}")
    return sizes


def run_child(script: str, spec: dict[str, Any]) -> dict[str, Any] | str:
    """``script --child SPEC`` in a fresh process, waited for: the JSON object its last line of output
    holds, or, when it died, its last line of errors (a markdown-safe table cell)."""
    done = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode == 0:
        return json.loads(done.stdout.splitlines()[-1])
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return f"process died: {last[:120]}".replace("|", "/")


def time_in_turns(runs: Sequence[Callable[[], object]], repeats: int, warmup: int, sample_ms: float,
                  settle_ms: float = SETTLE_MS) -> list[list[float]]:
    """Samples (ms) of each of ``runs``, taken in turns: round after round, one sample of each, so the
    machine's drifting load falls on all alike. A sample is the mean of as many back-to-back calls as
    fill ``sample_ms``; untimed calls spanning ``settle_ms`` precede it, because another runtime's
    worker threads spin on after it returns (``graphopt.cost_models.measured.SETTLE_SECONDS``)."""
    calls = []
    for run in runs:
        start = time.perf_counter()
        for _ in range(warmup):
            run()
        per_call_ms = (time.perf_counter() - start) * 1e3 / max(warmup, 1)
        calls.append(max(1, math.ceil(sample_ms / max(per_call_ms, 1e-6))))
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, n, ts in zip(runs, calls, times):
            settle_until = time.perf_counter() + settle_ms / 1e3
            while time.perf_counter() < settle_until:
                run()
            start = time.perf_counter()
            for _ in range(n):
                run()
            ts.append((time.perf_counter() - start) * 1e3 / n)
    return times
