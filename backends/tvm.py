"""TVM as a backend: a region compiled through Relax, tuned by MetaSchedule when given a budget.

Untuned, TVM's CPU code is the operators' loop nests as written, on one thread,
far slower than eager torch, so the backend only pays with tuning. Tuning
records live in one MetaSchedule database per target under graphopt's cache
folder, shared by every region and model: a workload (a fused TIR function,
which holds shapes but no weights) is tuned once and reused wherever it
recurs. Beside the database, ``regions.json`` remembers which regions (by
structural hash) were tuned for which target with what budget, so compiling a
tuned region again does not tune.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from graphopt.errors import InvalidOptionError
from graphopt.ir import Node

from . import _tvm
from .base import Backend, Kernel, cache_dir, random_inputs, register_backend, static_tensors_only
from .region import Region

UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(["amax", "amin", "prod"], "TVM 0.27's torch importer has no converter for these ATen ops"),
    "selu": "TVM's torch importer imports it wrongly: results 5e-2 off",
}
"""Canonical ops TVM does not compile, and why; it compiles every other op but opaque ones."""


@register_backend
@dataclass
class TVMBackend(Backend):
    """Regions of static-shape ops compiled by TVM (LLVM on CPU, CUDA on GPU) and run by the Relax VM."""

    name = "tvm"
    compile_seconds = 5.0  # an LLVM build per region, untuned (tuning takes its trials on top)

    tune_trials: int = 0
    """MetaSchedule's budget of measured candidates per region; 0 compiles untuned."""
    target: str | None = None
    """A TVM target (``"llvm"``, ``"cuda"`` or TVM's JSON form); default: LLVM for this host's CPU on a
    CPU device, CUDA for the GPU's architecture on a CUDA device."""
    progress: bool = True
    """Show a progress bar while tuning."""

    def __post_init__(self) -> None:
        if not isinstance(self.tune_trials, int) or self.tune_trials < 0:
            raise InvalidOptionError(f"tune_trials must be a non-negative int, got {self.tune_trials!r}")

    def unavailable(self, device: torch.device) -> str | None:
        if reason := _tvm.available():
            return reason
        if device.type == "cuda":
            return _tvm.cuda_unavailable()
        if device.type != "cpu":
            return f"TVM runs on cpu and cuda here, not {device.type}"
        return None

    def supports(self, node: Node) -> bool:
        """Static shapes and an op TVM's torch importer handles correctly; opaque calls (arbitrary
        torch, ONNX or compiled code) never. Found by compiling about 120 single-op cases and seven models."""
        if node.opdef.category == "opaque" or node.op in UNSUPPORTED or not static_tensors_only(node):
            return False
        # TVM imports select as take, which reads a negative index out of bounds instead of wrapping
        return not (node.op == "select" and node.attrs["index"] < 0)

    def compile(self, region: Region, device: torch.device) -> Kernel:
        if reason := self.unavailable(device):
            raise RuntimeError(f"the TVM backend cannot run on {device}: {reason}")
        target = _tvm.target_for(device, self.target)
        mod = _tvm.relax_from_graph(region.graph, random_inputs(region, device))
        database = None
        if self.tune_trials:
            database = cache_dir("tvm", _tvm.target_folder(target))
            self._tune(region, mod, target, database)
        return _tvm.Kernel(_tvm.build(mod, target, database), device)

    def _tune(self, region: Region, mod: object, target: object, database: Path) -> None:
        """Tune the region unless it was tuned for this target with at least this budget.

        A region new to the index tunes only the workloads the database has no
        record for (those of other regions and models serve as they are); one
        tuned before with a smaller budget tunes all of its workloads again,
        MetaSchedule starting from the records it has.
        """
        index = TunedRegions(database / "regions.json")
        key = _tvm.target_key(target)
        spent = index.trials(key, region.hash)
        if spent >= self.tune_trials:
            return
        _tvm.tune(mod, target, database, self.tune_trials, self.progress, only_unrecorded=not spent)
        index.record(key, region.hash, self.tune_trials)


class TunedRegions:
    """``{target: {region hash: trials}}`` in a JSON file: the regions tuned with what budget.

    Written whole through a rename, so a reader never sees half a file; two
    processes tuning at once may lose each other's entry, which costs a re-tune.
    """

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict[str, dict[str, int]]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def trials(self, target: str, region_hash: str) -> int:
        return self.read().get(target, {}).get(region_hash, 0)

    def record(self, target: str, region_hash: str, trials: int) -> None:
        entries = self.read()
        entries.setdefault(target, {})[region_hash] = trials
        staging = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        staging.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(staging, self.path)
