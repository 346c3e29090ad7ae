"""Everything graphopt asks of TVM, in one module: targets, Relax import, tuning, building, running.

TVM's Python API moves between releases (0.2x renamed ``tvm.nd``, ``tvm.tir``,
MetaSchedule's package and the target syntax), so no other module imports
``tvm``; this one is written against 0.27. Objects it hands out (targets,
IRModules, kernels) are opaque to callers.

Why the choices:

* Import goes region graph → ``to_torch()`` → ``torch.export`` → TVM's
  exported-program front end. ``to_torch`` is the reference semantics of the
  IR, and core ATen is the input TVM's torch importer is tested against; the
  ONNX route adds a second emitter and TVM's thinner ONNX importer between the
  IR and Relax.
* Weights are Relax constants, not inputs: they fold into the compiled module,
  and the tuning workloads (fused TIR functions) never contain tensor data, so
  records made for one model's weights serve every model with the same shapes.
* TVM's generated code assumes 64-byte aligned, contiguous buffers; torch's
  allocators give that, so tensors cross by DLPack without copies except for
  strided or offset views.
"""
from __future__ import annotations

import functools
import importlib
import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt.ir import Graph

_ALIGNMENT = 64


@functools.cache
def available() -> str | None:
    """Why TVM cannot be used in this process (not installed, a broken install), or None."""
    try:
        importlib.import_module("tvm.relax.frontend.torch")
    except Exception as error:  # a broken native library raises more than ImportError
        return f"apache-tvm is not importable: {type(error).__name__}: {error}"
    return None


def cuda_unavailable() -> str | None:
    """Why TVM cannot run CUDA kernels here (a build without CUDA, no driver, no GPU), or None."""
    import tvm

    if str(tvm.support.libinfo().get("USE_CUDA", "OFF")).upper() in ("OFF", "", "NOT-FOUND"):
        return "this TVM build has no CUDA support"
    if not tvm.cuda(0).exist:
        return "TVM finds no CUDA device (libcuda.so.1 missing or no GPU visible)"
    return None


# ----------------------------------------------------------------------------- targets
def target_for(device: torch.device, spec: str | None = None) -> Any:
    """The compilation target for ``device``: ``spec`` (a kind such as ``"llvm"``, or TVM's JSON form)
    when given, else LLVM for this host's CPU model, or CUDA for the GPU's architecture.

    An LLVM target gets this machine's physical core count when it names none:
    MetaSchedule needs it to size parallel loops.
    """
    import tvm
    from tvm.target import Target, codegen

    if spec is not None:
        target = Target(spec)
    elif device.type == "cuda":
        target = Target.from_device(tvm.cuda(device.index or 0))
    else:
        cpu = codegen.llvm_get_system_cpu()
        target = Target({"kind": "llvm", "mcpu": cpu} if cpu and cpu != "generic" else {"kind": "llvm"})
    kind = target.kind.name
    if (device.type == "cuda") != (kind == "cuda") or device.type not in ("cpu", "cuda"):
        raise ValueError(f"TVM target {kind!r} does not run on a {device.type} device")
    if kind == "llvm" and "num-cores" not in target.attrs:
        from tvm.s_tir.meta_schedule.utils import cpu_count

        target = Target({**target.export(), "num-cores": cpu_count(logical=False)})
    return target


def target_key(target: Any) -> str:
    """A stable text for ``target`` (its canonical JSON), to key records by."""
    return str(target)


def target_folder(target: Any) -> str:
    """A readable folder name for ``target``'s tuning records: kind and CPU or architecture."""
    attrs = target.attrs
    detail = attrs.get("mcpu") or attrs.get("arch") or ""
    return re.sub(r"[^\w.-]+", "_", f"{target.kind.name}-{detail}".strip("-"))


# ----------------------------------------------------------------------------- import
def relax_from_graph(graph: Graph, example_inputs: Sequence[torch.Tensor]) -> Any:
    """A Relax IRModule whose ``main`` computes ``graph`` and returns a tuple of its outputs."""
    from tvm.relax.frontend.torch import from_exported_program

    program = torch.export.export(graph.to_torch(), tuple(example_inputs))
    return from_exported_program(program, keep_params_as_input=False, unwrap_unit_return_tuple=False)


# ----------------------------------------------------------------------------- tuning
def tune(mod: Any, target: Any, database_dir: Path, max_trials: int, progress: bool,
         only_unrecorded: bool = True) -> int:
    """Tune ``mod``'s workloads with MetaSchedule, ``max_trials`` measured candidates in all, into the
    database in ``database_dir``; with ``only_unrecorded``, just those it has no record for.
    Returns how many workloads were tuned."""
    from tvm.s_tir import meta_schedule as ms

    database = _database(database_dir)
    tasks = ms.relax_integration.extract_tasks(_fused_tir(mod, target), target)
    if only_unrecorded:
        tasks = [t for t in tasks if database.query_tuning_record(t.dispatched[0], target, t.task_name) is None]
    if not tasks:
        return 0
    _quiet_meta_schedule_console()
    with tempfile.TemporaryDirectory(prefix="graphopt-tvm-logs-") as logs:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, work_dir=logs)
        with _progress_bar(max_trials, len(tasks), progress) as bar:
            ms.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=logs, database=database,
                max_trials_global=max_trials, num_trials_per_iter=min(64, max_trials),
                builder=ms.builder.LocalBuilder(max_workers=2, timeout_sec=180, f_build=_build_candidate),
                measure_callbacks=[*ms.MeasureCallback.create("default"), _progress_callback_type()(bar)],
            )
    return len(tasks)


def _fused_tir(mod: Any, target: Any) -> Any:
    """``mod`` with its operators legalized to TIR and fused: the functions MetaSchedule tunes, as
    ``compile_relax`` lowers them before it looks them up in the database."""
    import tvm
    from tvm import relax

    with target:
        return tvm.transform.Sequential([
            *relax.pipeline.library_dispatch_passes(target),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ])(mod)


def _database(database_dir: Path) -> Any:
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(work_dir=str(database_dir))


def _build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default candidate build without its ``import tvm.s_tir.tensor_intrin``.

    That import takes ~40 s on a small CPU and every builder worker process
    pays it (the pool restarts each round); a scheduled candidate has its
    intrinsics inlined already, so the build does not need the registry.
    """
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _quiet_meta_schedule_console() -> None:
    """MetaSchedule prints its task tables to stdout at the level of its logger, DEBUG when unset;
    keep the console to warnings unless the user chose a level (the progress bar reports instead)."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def _progress_bar(max_trials: int, tasks: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=max_trials, disable=not enabled, unit="trial", leave=False,
                desc=f"TVM tuning {tasks} workload{'s' * (tasks != 1)}")


@functools.cache
def _progress_callback_type() -> type:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        """Advances a tqdm bar by each round's measured candidates and shows the best time so far."""

        def __init__(self, bar: Any):
            super().__init__()
            self.bar, self.best = bar, float("inf")

        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any, builder_results: Any,
                  runner_results: Any) -> None:
            for result in runner_results:
                if result.run_secs:
                    self.best = min(self.best, sum(float(s) for s in result.run_secs) / len(result.run_secs))
            self.bar.update(len(measure_candidates))
            if self.best < float("inf"):
                self.bar.set_postfix_str(f"best {self.best * 1e6:.1f} µs")

    return ProgressCallback


# ----------------------------------------------------------------------------- building
def build(mod: Any, target: Any, database_dir: Path | None = None) -> Any:
    """Compile ``mod`` for ``target``: with the schedules recorded in ``database_dir`` when given
    (workloads without a record keep TVM's default schedule), else untuned."""
    import tvm

    if database_dir is None:
        return tvm.compile(mod, target=target)
    from tvm.s_tir import meta_schedule as ms

    return ms.relax_integration.compile_relax(_database(database_dir), mod, target, params=None)


class Kernel:
    """A compiled Relax module as a torch function: tensors in, a tuple of tensors out, shared by DLPack."""

    def __init__(self, executable: Any, device: torch.device):
        import tvm
        from tvm import relax

        tvm_device = tvm.cuda(device.index or 0) if device.type == "cuda" else tvm.cpu(0)
        self._vm = relax.VirtualMachine(executable, tvm_device)
        self._main = self._vm["main"]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self._main(*(_to_tvm(t) for t in inputs))
        return tuple(torch.from_dlpack(o) for o in outputs)


def _to_tvm(t: torch.Tensor) -> Any:
    """The tensor as a TVM tensor on the same memory, copied only when strided or misaligned."""
    import tvm

    t = t.detach()
    if not t.is_contiguous() or t.data_ptr() % _ALIGNMENT:
        t = t.clone(memory_format=torch.contiguous_format)
    return tvm.runtime.from_dlpack(t)
