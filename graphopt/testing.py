"""Comparing model outputs: what the real-model suite, the demo and the CLI check with.

``flatten_outputs`` turns whatever a model returns (a tensor, nested tuples/lists,
dicts, Hugging Face ``ModelOutput`` / diffusers ``BaseOutput``) into a flat list of
tensors in a stable order; ``max_rel_error`` and ``assert_close_outputs`` compare
two such outputs with ``output_difference``, an error scaled by the reference's magnitude.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "PATHS", "PathResult", "SUITE_RTOL", "assert_close_outputs", "capture_and_optimize", "flatten_outputs",
    "max_rel_error", "output_difference", "output_errors", "run_onnxruntime", "run_path",
]


def flatten_outputs(x: Any) -> list[torch.Tensor]:
    """Flatten a model output into a list of tensors (depth-first, in order).

    ``None`` entries are dropped (HF outputs keep unused fields as ``None``).
    ``ModelOutput`` / ``BaseOutput`` are ordered dicts, so they go through the
    mapping branch in field order; plain dicts keep insertion order.
    """
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in flatten_outputs(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in flatten_outputs(v)]
    if hasattr(x, "to_tuple"):  # ModelOutput-like object that is not a Mapping
        return flatten_outputs(x.to_tuple())
    if isinstance(x, (int, float, bool)):
        return [torch.tensor(x)]
    raise TypeError(f"cannot flatten model output of type {type(x).__name__}")


def output_difference(expected: Any, actual: Any) -> tuple[float, float]:
    """The largest absolute difference between two outputs (torch tensors or numpy arrays), and that relative
    to the largest expected magnitude (at least 1e-6): the one measure the suite, the demo, the lowering
    stage and the CLI's ``--check`` hold outputs to.

    Differing shapes, and integer, bool or string outputs that differ anywhere, are infinitely apart;
    non-finite values must agree in position and value.
    """
    e, a = _as_numpy(expected), _as_numpy(actual)
    inf = float("inf")
    if e.shape != a.shape:
        return inf, inf
    if e.size == 0:
        return 0.0, 0.0
    if e.dtype.kind not in "fc" or a.dtype.kind not in "fc":
        return (0.0, 0.0) if np.array_equal(e, a) else (inf, inf)
    e, a = e.astype(np.float64), a.astype(np.float64)
    e_bad, a_bad = ~np.isfinite(e), ~np.isfinite(a)
    if not np.array_equal(e_bad, a_bad) or not np.array_equal(np.nan_to_num(e[e_bad]), np.nan_to_num(a[a_bad])):
        return inf, inf
    e, a = e[~e_bad], a[~a_bad]
    if e.size == 0:
        return 0.0, 0.0
    abs_err = float(np.abs(e - a).max())
    return abs_err, abs_err / max(float(np.abs(e).max()), 1e-6)


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.dtype.is_floating_point else x).numpy()
    return np.asarray(x)


def output_errors(ref: Any, got: Any) -> list[float]:
    """Per-output relative errors; raises ``AssertionError`` on structure mismatch."""
    refs, gots = flatten_outputs(ref), flatten_outputs(got)
    if len(refs) != len(gots):
        raise AssertionError(f"output count differs: reference has {len(refs)}, got {len(gots)}")
    for i, (r, g) in enumerate(zip(refs, gots)):
        if r.shape != g.shape:
            raise AssertionError(f"output {i}: shape differs: reference {tuple(r.shape)}, got {tuple(g.shape)}")
    return [output_difference(r, g)[1] for r, g in zip(refs, gots)]


def max_rel_error(ref: Any, got: Any) -> float:
    """max over outputs of ``max|ref - got| / max(max|ref|, 1e-6)``.

    Raises ``AssertionError`` when the outputs' count or shapes differ; returns
    ``inf`` when integer outputs or non-finite positions differ.
    """
    return max(output_errors(ref, got), default=0.0)


def assert_close_outputs(ref: Any, got: Any, rtol: float = 1e-4, what: str = "") -> None:
    """Assert every output of ``got`` is within ``rtol`` (scaled error) of ``ref``."""
    errors = output_errors(ref, got)
    bad = [(i, e) for i, e in enumerate(errors) if not e <= rtol]
    if not bad:
        return
    refs, gots = flatten_outputs(ref), flatten_outputs(got)
    prefix = f"{what}: " if what else ""
    lines = [f"{prefix}{len(bad)} of {len(errors)} outputs differ (rtol={rtol:g}):"]
    for i, e in bad:
        r, g = refs[i], gots[i]
        detail = ""
        if r.dtype.is_floating_point and r.numel():
            diff = (r.detach().double() - g.detach().double()).abs().nan_to_num(nan=float("inf"))
            flat = int(diff.argmax())
            idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(flat), r.shape)) if r.dim() else ()
            detail = (
                f"; worst at index {idx}: ref={r.reshape(-1)[flat].item():.6g} "
                f"got={g.reshape(-1)[flat].item():.6g}; max|ref|={r.detach().abs().max().item():.4g}"
            )
        lines.append(
            f"  output {i} {tuple(r.shape)} {str(r.dtype).removeprefix('torch.')}: rel error {e:.3g}{detail}"
        )
    raise AssertionError("\n".join(lines))


# ------------------------------------------------------------ the three paths
@dataclass
class PathResult:
    """How one path (IR → torch, IR → ONNX → onnxruntime, torch.compile) fared on one model."""

    path: str
    error: float | None = None  # max relative error against eager; None when the path failed
    reason: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is not None and self.error <= SUITE_RTOL


SUITE_RTOL = 1e-4
PATHS = ("to_torch", "to_onnx", "to_onnxruntime", "to_onnxruntime_cpu", "torch_compile")
"""``to_onnx`` writes standard ONNX; ``to_onnxruntime`` adds onnxruntime's contrib ops (``target="onnxruntime"``);
``to_onnxruntime_cpu`` also its NCHWc layout for this CPU (``target="onnxruntime-cpu"``)."""
ONNX_TARGETS = {"to_onnx": "onnx", "to_onnxruntime": "onnxruntime", "to_onnxruntime_cpu": "onnxruntime-cpu"}


def capture_and_optimize(model: torch.nn.Module, inputs: tuple, level: str = "O2"):
    """capture → ``level``: the graph every path below starts from."""
    import graphopt

    graph = graphopt.capture(model, inputs)
    return graphopt.optimize(graph, level)


def run_path(path: str, model: torch.nn.Module, inputs: tuple, reference: Any, graph=None,
             level: str = "O2") -> PathResult:
    """Run one path and compare it with ``reference`` (eager outputs). Failures become reasons."""
    start = time.perf_counter()
    try:
        if path == "torch_compile":
            torch.compiler.reset()
            got = torch.compile(model, backend="graphopt", options={"level": level, "fallback": False})(*inputs)
        else:
            graph = graph if graph is not None else capture_and_optimize(model, inputs, level)
            if path == "to_torch":
                got = graph.to_torch()(*inputs)
            else:
                got = run_onnxruntime(graph, inputs, target=ONNX_TARGETS[path])
        error = max_rel_error(reference, got)
        reason = "" if error <= SUITE_RTOL else f"max relative error {error:.3g}"
        return PathResult(path, error, reason, time.perf_counter() - start)
    except Exception as exc:  # a failing path is reported with its reason, not raised
        first = (str(exc).strip().splitlines() or [""])[0]
        return PathResult(path, None, f"{type(exc).__name__}: {first[:300]}", time.perf_counter() - start)


def run_onnxruntime(graph, inputs: tuple, target: str = "onnx") -> list[torch.Tensor]:
    """Rewrite ``graph`` for ``target`` (a copy: ``graphopt.passes.targets``), emit it and run it in onnxruntime
    on ``inputs`` (fed in graph-input order).

    onnxruntime's own graph rewrites are off, so what runs is what graphopt wrote.
    """
    from graphopt.backends._onnxruntime import inference_session
    from graphopt.passes.targets import optimize_for_target

    model = optimize_for_target(graph, target).to_onnx(target=target)
    session = inference_session(model, optimization="none", threads=torch.get_num_threads())
    flat = [t for t in flatten_outputs(list(inputs))]
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), flat)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def planted_video_heads(seed: int = 0, frames: int = 8, height: int = 8, width: int = 8, per_kind: int = 8,
                        sharpness: float = 12.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, torch.Tensor]:
    """``q, k, v`` (``[heads, tokens, d]``) of attention heads built to be spatial, temporal or neither,
    ``per_kind`` of each, over a frame-major ``frames x height x width`` grid, with the truth (the kinds of
    ``graphopt.passes.sparse_attention.profile``). A spatial head's queries and keys carry an orthonormal
    code of their frame, a temporal head's one of their position, so each attends within its frame or
    across frames at its position; the third kind's are small and random (near-uniform attention)."""
    from graphopt.passes.sparse_attention.grid import VideoGrid
    from graphopt.passes.sparse_attention.profile import DENSE, SPATIAL, TEMPORAL

    g = torch.Generator().manual_seed(seed)
    grid = VideoGrid(frames, height, width)
    dim = max(frames, height * width)
    codes = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    frame_of = torch.arange(grid.video) // grid.per_frame
    position_of = torch.arange(grid.video) % grid.per_frame
    amplitude = (sharpness * dim ** 0.5) ** 0.5
    heads, truth = [], []
    for kind in (SPATIAL, TEMPORAL, DENSE):
        for _ in range(per_kind):
            if kind == DENSE:
                x = 0.3 * torch.randn(grid.video, dim, generator=g)
            else:
                x = amplitude * codes[frame_of if kind == SPATIAL else position_of]
                x = x + 0.1 * torch.randn(grid.video, dim, generator=g)
            heads.append(x)
            truth.append(kind)
    q = torch.stack(heads)
    k = q + 0.05 * torch.randn(q.shape, generator=g)
    v = torch.randn(q.shape, generator=g)
    return q, k, v, grid, torch.tensor(truth)
