"""onnxruntime as a backend: a region becomes an ONNX model run by an ``InferenceSession``.

The region is emitted for onnxruntime's own fused ops (and, on CPU, its NCHWc
blocked convolutions) and the session applies its full optimisation level. On
CPU the session is called with numpy views of the torch tensors, and its output
arrays are wrapped as tensors, neither copied; its intra-op thread count is
tuned per region. On CUDA tensors are bound in place with IO binding: inputs are
read from the torch tensors' memory and outputs written into tensors allocated here.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from graphopt.emitters.onnx import DEFAULT_OPSET
from graphopt.emitters.onnx_table import EMITTERS
from graphopt.frontends.onnx import numpy_to_torch, torch_to_numpy
from graphopt.ir import Node, TensorType
from graphopt.passes.targets import optimize_for_target

from . import _onnxruntime
from .base import Backend, Kernel, random_inputs, register_backend, static_tensors_only
from .region import Region


THREAD_TRIAL_SECONDS = 0.001
"""Regions whose call takes longer on all threads are not tried on one: at that size the second core
paid on every model measured (DeiT-tiny at batch 1: 3.2 ms a call against 4.2 on one thread), and a
trial of a few noisy millisecond calls could still pick the slower session."""
THREAD_TRIAL_ROUNDS = 5
"""Rounds of the thread trial; each times both sessions for ``THREAD_TRIAL_SAMPLE`` seconds, alternating."""
THREAD_TRIAL_SAMPLE = 0.005
THREAD_TRIAL_MARGIN = 0.03
"""How much faster one thread must be (median over the counted rounds) to be picked: a wrong pick of one
thread costs far more than a wrong pick of all (HF ViT at batch 8: 0.51 ms against 0.42 on two threads;
HF BERT-tiny at batch 1, where one thread wins: 0.150 against 0.161)."""
MIN_CORE_SHARE = 0.6
"""A trial round counts only when the all-threads session got at least this share of each core beyond the
first (process CPU seconds per wall second, at least ``1 + share * (threads - 1)``). Another process
running on the cores preempts onnxruntime's spinning workers, and every op waits for the one descheduled:
with a busy loop on one of two cores, HF ViT at batch 8 took 1.0 ms on two threads against 0.51 on one,
using 1.0 cores, where idle it took 0.43 on 1.9 cores. A benchmark compile once picked one thread for
that region, most likely while inductor's compile workers (subprocesses) were starting. Not 0.5: a busy
loop on one of two cores gets that core half the time when the scheduler shares it fairly, and a round of
5 ms can land at 1.5 cores or above (1.59 measured) while running at a busy core's speed."""


@register_backend
@dataclass
class OnnxRuntimeBackend(Backend):
    """Regions of ops with an ONNX lowering and static shapes, run by onnxruntime (CPU or CUDA provider)."""

    name = "onnxruntime"
    compile_seconds = 0.5  # an ONNX export and a session: no code generated

    threads: int | None = None
    """Intra-op threads. Default: torch's thread count (both runtimes share the cores), or one thread
    where that runs the region faster, timed at compile time. onnxruntime's workers meet after every
    op, which on small ops costs more than a second core gives (2 cores, the two sessions alternating in
    one process: HF BERT-tiny at batch 1, 0.134 ms a call on one thread, 0.147 on two; MobileNetV2,
    where the second core pays, 1.02 against 0.78)."""

    def unavailable(self, device: torch.device) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "this onnxruntime build has no CUDA execution provider (install onnxruntime-gpu)"
        if device.type not in ("cpu", "cuda"):
            return f"onnxruntime runs on cpu and cuda, not {device.type}"
        return None

    def supports(self, node: Node) -> bool:
        return node.op in EMITTERS and static_tensors_only(node)

    def compile(self, region: Region, device: torch.device) -> Kernel:
        target = "onnxruntime-cpu" if device.type == "cpu" else "onnxruntime"
        model = optimize_for_target(region.graph, target, DEFAULT_OPSET).to_onnx(opset=DEFAULT_OPSET, target=target)
        model = model.SerializeToString()
        threads = self.threads or torch.get_num_threads()
        if device.type == "cuda":
            return _BoundSession(_session(model, device, threads), region, device)
        kernel = _NumpySession(_session(model, device, threads), region)
        if self.threads is None and threads > 1:
            kernel = _faster(kernel, threads, lambda: _NumpySession(_session(model, device, 1), region),
                             random_inputs(region, device))
        return kernel


def _session(model: bytes, device: torch.device, threads: int) -> Any:
    # Workers spin inside a run (parking them between its many small ops costs up to a third of the
    # latency) but stop as soon as it returns, leaving the cores to torch's threads between region calls.
    spin = {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    return _onnxruntime.inference_session(model, "all", threads, providers, config=spin)


def _faster(kernel: Kernel, threads: int, make_other: Callable[[], Kernel],
            inputs: Sequence[torch.Tensor]) -> Kernel:
    """``kernel`` (a session on ``threads`` threads) or the one-thread session ``make_other`` builds,
    timed in rounds that alternate the two (a shared machine's load drifts between back-to-back trials).

    Rounds in which another process held the cores say nothing about an idle machine and are dropped;
    with none left, ``kernel`` is kept."""
    if _sample(kernel, inputs, 0.0).seconds > THREAD_TRIAL_SECONDS:
        return kernel
    other = make_other()
    rounds = [(_sample(kernel, inputs, THREAD_TRIAL_SAMPLE), _sample(other, inputs, THREAD_TRIAL_SAMPLE))
              for _ in range(THREAD_TRIAL_ROUNDS)]
    return other if one_thread_wins(rounds, threads) else kernel


@dataclass(frozen=True)
class TrialSample:
    """Back-to-back calls of one session in the thread trial."""

    seconds: float
    """Mean wall seconds of one call."""
    cores: float
    """CPU seconds this process spent per wall second while the calls ran."""


def one_thread_wins(rounds: Sequence[tuple[TrialSample, TrialSample]], threads: int) -> bool:
    """Whether the thread trial's rounds (the ``threads``-thread sample, the one-thread sample) show one
    thread faster by ``THREAD_TRIAL_MARGIN``, counting only rounds where the session on all threads ran on
    its cores (``MIN_CORE_SHARE``), and only when all rounds but one are counted: rounds with the cores
    amid rounds without them are the other process's pauses, not an idle machine (with 3 of 5 enough, a
    busy-core trial in CI once picked one thread)."""
    needed = 1 + MIN_CORE_SHARE * (threads - 1)
    counted = [(every, one) for every, one in rounds if every.cores >= needed]
    if not counted or len(counted) < len(rounds) - 1:
        return False
    every = statistics.median(s.seconds for s, _ in counted)
    one = statistics.median(s.seconds for _, s in counted)
    return one * (1 + THREAD_TRIAL_MARGIN) < every


def _sample(kernel: Kernel, inputs: Sequence[torch.Tensor], min_seconds: float) -> TrialSample:
    """Back-to-back calls spanning ``min_seconds`` (at least one), after one untimed call."""
    kernel(*inputs)
    calls, start, cpu = 0, time.perf_counter(), time.process_time()
    while not calls or time.perf_counter() - start < min_seconds:
        kernel(*inputs)
        calls += 1
    wall = time.perf_counter() - start
    return TrialSample(wall / calls, (time.process_time() - cpu) / wall)


class _NumpySession:
    """Calls a CPU session on numpy views of torch tensors. Cheaper than IO binding on CPU, whose
    per-call binding objects cost more than the copies they save (HF ViT-tiny: 0.16 against 0.21 ms).

    Every call is Python work done with caches cold from the last run, so what can be is done once:
    the run options (a run passed none builds defaults, about 6 µs on HF BERT-tiny at batch 1), the
    converters, the binding the run goes through (``_onnxruntime.session_run``)."""

    def __init__(self, session, region: Region):
        import onnxruntime as ort

        self.session = session
        self.run = _onnxruntime.session_run(session)
        self.run_options = ort.RunOptions()
        self.outputs = [o.name for o in session.get_outputs()]
        # The converters are picked once from the region's types: per call, only the view is made.
        self.inputs = [(i.name, torch_to_numpy if _ml_dtype(v.type) else _numpy_view)
                       for i, v in zip(session.get_inputs(), region.graph.inputs)]
        self.wrap = [numpy_to_torch if _ml_dtype(v.type) or not v.type.numel else torch.from_numpy
                     for v in region.graph.outputs]

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: view(t) for (name, view), t in zip(self.inputs, tensors)}
        return tuple(wrap(a) for wrap, a in zip(self.wrap, self.run(self.outputs, feeds, self.run_options)))


def _ml_dtype(t: Any) -> bool:
    """Whether numpy holds this tensor type's elements as an ml_dtypes type (bfloat16, float8)."""
    return isinstance(t, TensorType) and _numpy_dtype(t.dtype).type.__module__ != "numpy"


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a numpy array (a contiguous copy of it when it is not contiguous)."""
    return t.numpy() if t.is_contiguous() and not t.requires_grad else t.detach().contiguous().numpy()


class _BoundSession:
    """Calls a CUDA session through IO binding on torch tensors: zero-copy in, outputs allocated by torch."""

    def __init__(self, session, region: Region, device: torch.device):
        import onnxruntime as ort

        self.session = session
        self.run_options = ort.RunOptions()  # as _NumpySession's
        self.device = device
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [(o.name, v.type) for o, v in zip(session.get_outputs(), region.graph.outputs)]

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        binding = self.session.io_binding()
        kept = []  # contiguous copies must outlive the run
        for name, t in zip(self.inputs, tensors):
            t = t.contiguous()
            kept.append(t)
            binding.bind_input(name, self.device.type, self.device.index or 0, _numpy_dtype(t.dtype),
                               tuple(t.shape), t.data_ptr())
        results = []
        for name, t in self.outputs:
            assert isinstance(t, TensorType)
            out = torch.empty(t.shape, dtype=t.dtype, device=self.device)
            binding.bind_output(name, self.device.type, self.device.index or 0, _numpy_dtype(t.dtype),
                                tuple(out.shape), out.data_ptr())
            results.append(out)
        self.session.run_with_iobinding(binding, self.run_options)
        return tuple(results)


def _numpy_dtype(dtype: torch.dtype) -> Any:
    """The numpy element type onnxruntime binds for a torch dtype (ml_dtypes for bfloat16)."""
    return torch_to_numpy(torch.empty(0, dtype=dtype)).dtype
