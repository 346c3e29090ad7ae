"""What a device can do: peak compute, memory bandwidth and the cost of one kernel launch.

Measured once per device, thread count and torch version by three
micro-benchmarks through torch itself (so "peak" means what torch's own GEMM
reaches, the ceiling every backend here is compared against), then cached as
JSON in ``cache_dir("device")``.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from graphopt.backends.base import cache_dir

from .database import device_key


@dataclass(frozen=True)
class BenchmarkSizes:
    """Micro-benchmark sizes: large enough to leave the caches and reach steady state, small enough
    to take well under a second in all."""

    gemm: int
    """Side of the square float32 GEMM."""
    copy_bytes: int
    """Bytes of the copied buffer (several times a CPU's last-level cache)."""
    launches: int = 100
    """Tiny ops timed back to back for the launch overhead."""
    warmup: int = 2
    repeats: int = 8


CPU_SIZES = BenchmarkSizes(gemm=1024, copy_bytes=64 << 20)
CUDA_SIZES = BenchmarkSizes(gemm=4096, copy_bytes=1 << 30)


@dataclass(frozen=True)
class DeviceProfile:
    """The measured limits of one device, at one thread count, under one torch version."""

    device: str
    """``device_key``: device name and, on CPU, thread count."""
    torch_version: str
    peak_flops: float
    """float32 FLOP/s of a large GEMM."""
    bandwidth: float
    """Bytes/s read plus written by a large copy."""
    launch_overhead: float
    """Seconds per op in a stream of tiny ops: dispatch and launch, no work."""

    @classmethod
    def for_device(cls, device: torch.device | str) -> DeviceProfile:
        """The profile of ``device``, from the cache, else measured and cached."""
        device = torch.device(device)
        key = device_key(device)
        path = cache_dir("device") / (re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{key}-torch{torch.__version__}") + ".json")
        if path not in _LOADED:
            if path.exists():
                _LOADED[path] = cls(**json.loads(path.read_text()))
            else:
                _LOADED[path] = cls.measure(device)
                path.write_text(json.dumps(asdict(_LOADED[path]), indent=1))
        return _LOADED[path]

    @classmethod
    def measure(cls, device: torch.device) -> DeviceProfile:
        """Run the three micro-benchmarks on ``device`` (uncached)."""
        sizes = CUDA_SIZES if device.type == "cuda" else CPU_SIZES
        n = sizes.gemm
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        gemm = _best_seconds(lambda: torch.mm(a, b), device, sizes)
        src = torch.empty(sizes.copy_bytes // 4, device=device)
        dst = torch.empty_like(src)
        copy = _best_seconds(lambda: dst.copy_(src), device, sizes)
        one, out = torch.ones(1, device=device), torch.empty(1, device=device)

        def tiny_ops() -> None:
            for _ in range(sizes.launches):
                torch.add(one, one, out=out)

        launches = _best_seconds(tiny_ops, device, sizes)
        return cls(device_key(device), torch.__version__, peak_flops=2 * n**3 / gemm,
                   bandwidth=2 * sizes.copy_bytes / copy, launch_overhead=launches / sizes.launches)

    def numbers(self) -> dict[str, float]:
        """The measured rates, as the learned model's device features."""
        return {"peak_flops": self.peak_flops, "bandwidth": self.bandwidth, "launch_overhead": self.launch_overhead}


_LOADED: dict[Path, DeviceProfile] = {}
"""Profiles read or measured in this process, by cache file (a test's cache folder is its own)."""


def _best_seconds(fn: Callable[[], object], device: torch.device, sizes: BenchmarkSizes) -> float:
    """Fastest of the synchronized calls after the warm-up: a peak is the best the device does,
    and on a shared machine only the fastest run is free of other tenants."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(sizes.warmup):
        fn()
    best = float("inf")
    for _ in range(sizes.repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best
