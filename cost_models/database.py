"""The timing database: one measured time per region, backend, device and library versions.

A JSON-lines file under ``cache_dir("timings")``: a record is appended as
one line, so a crashed run loses at most the line it was writing and files
from several machines concatenate. Records are keyed by the region's
structural hash (equal regions in different models share a timing), the
backend, the device and the versions of the libraries involved: after an
upgrade the old timings no longer answer ``lookup``, but stay in the file as
training data for the learned model.
"""
from __future__ import annotations

import json
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path

import torch

from graphopt.backends.base import cache_dir

BACKEND_LIBRARIES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tvm": ("apache-tvm", "tvm"),
    "triton": ("triton",),
}
"""The distributions whose version, besides torch's, decides a backend's code (first one installed)."""


@dataclass
class TimingRecord:
    """One region timed on one backend and device."""

    region_hash: str
    backend: str
    device: str
    """``device_key``: the device's name and, on CPU, the thread count."""
    versions: dict[str, str]
    seconds: float
    """Median of the timed calls."""
    spread: float
    """Interquartile range of the timed calls, in seconds."""
    repeats: int
    compile_seconds: float
    features: dict[str, float] = field(default_factory=dict)
    """``region_features`` of the region."""
    profile: dict[str, float] = field(default_factory=dict)
    """``DeviceProfile.numbers()`` of the device it ran on."""
    source: str = ""
    """Where the region came from (a model name): held-out evaluation splits by it."""

    @property
    def key(self) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
        return self.region_hash, self.backend, self.device, tuple(sorted(self.versions.items()))


def device_key(device: torch.device | str) -> str:
    """The name timings are filed under: the CUDA device's name, or the CPU model and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu:{_cpu_model()}:{torch.get_num_threads()}t"
    return device.type


@cache
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cache
def library_versions(backend: str) -> dict[str, str]:
    """torch's version and that of the library the backend compiles with (``missing`` if absent)."""
    versions = {"torch": torch.__version__}
    dists = BACKEND_LIBRARIES.get(backend, ())
    if dists:
        versions[dists[0]] = next((v for v in map(_installed_version, dists) if v), "missing")
    return versions


def _installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


class TimingDatabase:
    """The records of one JSON-lines file, indexed by key; the latest record of a key wins."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else cache_dir("timings") / "timings.jsonl"
        self._records: list[TimingRecord] = []
        self._index: dict[tuple, TimingRecord] = {}
        if self.path.exists():
            with self.path.open() as f:
                for line in f:
                    if line.strip():
                        self._remember(TimingRecord(**json.loads(line)))

    def add(self, record: TimingRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(record)) + "\n")
        self._remember(record)

    def lookup(self, region_hash: str, backend: str, device: str,
               versions: dict[str, str] | None = None) -> TimingRecord | None:
        """The record for this region, backend and ``device_key``, under ``versions`` (default: the installed ones)."""
        versions = library_versions(backend) if versions is None else versions
        return self._index.get((region_hash, backend, device, tuple(sorted(versions.items()))))

    def __iter__(self) -> Iterator[TimingRecord]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def _remember(self, record: TimingRecord) -> None:
        self._records.append(record)
        self._index[record.key] = record
