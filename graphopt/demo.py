"""``graphopt demo``: a ResNet, a ViT and a DiT (random weights) through graphopt beside eager, inductor and
onnxruntime.

Each model runs eagerly; through graphopt's Python API (``capture -> optimize("O2") -> to_torch``: the
rewrites on torch's kernels); through ``torch.compile(backend="graphopt")`` with its default options (O3:
the rewrites, then each region lowered to the backend it measures fastest, within a compile budget);
through ``torch.compile`` with inductor; and through onnxruntime (``torch.onnx.export``, all of
onnxruntime's graph optimizations, as the benchmarks run it). The first table shows the IR before and
after the rewrites, which passes fired, where the lowered regions went and each graphopt path's largest
output difference from eager (relative to the largest eager magnitude); the second the median latencies
and the compile times (the first call of each ``torch.compile``). The third is the lossy half: a trained
digits diffusion transformer sampled with and without step caching (``demo_step_cache``), then the
sparse-attention kernel and the trained video DiT with head-kind sparse attention (``demo_sparse_attention``).
"""
from __future__ import annotations

import io
import logging
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .api import capture, optimize
from .models import ModelCase, demo_cases
from .testing import max_rel_error

LEVEL = "O2"
"""The Python API path's level: the rewrites alone, beside torch.compile's default O3."""


@dataclass
class DemoRow:
    model: str
    nodes_before: int
    nodes_after: int
    passes_fired: list[str]
    diff_graphopt: float  # capture -> optimize -> to_torch, vs eager
    diff_compile: float  # torch.compile(backend="graphopt"), vs eager
    eager_ms: float
    graphopt_ms: float
    compile_ms: float
    """torch.compile(backend="graphopt") with its default options, per call."""
    regions: dict[str, int] = field(default_factory=dict)
    """Regions the default torch.compile lowered, by backend."""
    compile_s: float = float("nan")
    """The default torch.compile's first call: Dynamo, AOTAutograd and graphopt's compile."""
    inductor_ms: float | None = None
    inductor_compile_s: float | None = None
    onnxruntime_ms: float | None = None
    """None where the way was not run (``inductor=False``) or onnxruntime's export failed."""


class _CompileLog(logging.Handler):
    """Collects the decisions of graphopt's torch.compile backend from its INFO lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.regions: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        lowering = getattr(record, "lowering", None)
        for decision in lowering or []:
            self.regions[decision["chosen"] or "eager"] += 1


def run_case(case: ModelCase, repeats: int = 15, inductor: bool = True,
             pass_options: dict[str, dict[str, Any]] | None = None) -> DemoRow:
    """Build ``case``, run it through every way and measure each against eager. ``inductor=False`` leaves
    inductor out (its compile takes tens of seconds); ``pass_options`` go to the default torch.compile."""
    model, inputs = case.build()
    with torch.no_grad():
        expected = model(*inputs)
        graph = capture(model, inputs)
        nodes_before = len(graph)
        graph = optimize(graph, level=LEVEL)
        module = graph.to_torch()
        compiled, compile_s, regions = _compile_default(model, inputs, pass_options)
        row = DemoRow(
            model=case.name,
            nodes_before=nodes_before,
            nodes_after=len(graph),
            passes_fired=graph.meta["report"].fired,
            diff_graphopt=max_rel_error(expected, module(*inputs)),
            diff_compile=max_rel_error(expected, compiled(*inputs)),
            eager_ms=median_ms(model, inputs, repeats),
            graphopt_ms=median_ms(module, inputs, repeats),
            compile_ms=median_ms(compiled, inputs, repeats),
            regions=regions,
            compile_s=compile_s,
        )
        if inductor:
            torch.compiler.reset()
            start = time.perf_counter()
            compiled = torch.compile(model)
            compiled(*inputs)
            row.inductor_compile_s = time.perf_counter() - start
            row.inductor_ms = median_ms(compiled, inputs, repeats)
        if (session := onnxruntime_runner(model, inputs)) is not None:
            row.onnxruntime_ms = median_ms(session, inputs, repeats)
        return row


def _compile_default(model: torch.nn.Module, inputs: Sequence[torch.Tensor], pass_options: dict[str, dict[str, Any]] | None
                     ) -> tuple[Callable[..., Any], float, dict[str, int]]:
    """``torch.compile(model, backend="graphopt")`` after its first call, that call's seconds, and the
    backends its regions went to (from the backend's compile log)."""
    from .compile_backend import logger

    torch.compiler.reset()
    log = _CompileLog()
    logger.addHandler(log)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        compiled = torch.compile(model, backend="graphopt", options={"pass_options": pass_options or {}})
        start = time.perf_counter()
        compiled(*inputs)
        return compiled, time.perf_counter() - start, dict(log.regions.most_common())
    finally:
        logger.removeHandler(log)
        logger.setLevel(level)


def onnxruntime_runner(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> Callable[..., Any] | None:
    """The model exported by ``torch.onnx.export`` in an onnxruntime session at ``ORT_ENABLE_ALL`` on
    torch's thread count, called on numpy views of torch tensors; None when the export fails."""
    from .backends._onnxruntime import inference_session

    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(inputs), buffer, dynamo=False)
    except Exception as exc:  # an exporter limit: the demo row shows no onnxruntime time
        logging.getLogger(__name__).info("torch.onnx.export failed on the model: %s", exc)
        return None
    session = inference_session(buffer.getvalue(), "all", torch.get_num_threads(), log_severity=3)
    names = [i.name for i in session.get_inputs()]

    def run(*args: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in session.run(None, {n: a.numpy() for n, a in zip(names, args)})]

    return run


def median_ms(fn: Callable[..., object], inputs: Sequence[torch.Tensor], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after two warm-up calls, in milliseconds."""
    fn(*inputs)
    fn(*inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def format_rows(rows: Sequence[DemoRow]) -> str:
    """Two tables: what graphopt did to each model, then every way's latency and compile time."""
    from .cli import format_table

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    header = ("model", "nodes", "passes fired", "regions (default)", "diff O2", "diff default")
    cells = [(r.model, f"{r.nodes_before}->{r.nodes_after}", ",".join(r.passes_fired) or "-",
              ",".join(f"{b}:{n}" for b, n in r.regions.items()) or "-", f"{r.diff_graphopt:.1e}",
              f"{r.diff_compile:.1e}") for r in rows]
    timing_header = ("model", "eager ms", "graphopt O2 ms", "graphopt default ms", "inductor ms", "onnxruntime ms",
                     "graphopt compile s", "inductor compile s")
    timings = [(r.model, ms(r.eager_ms), ms(r.graphopt_ms), ms(r.compile_ms), ms(r.inductor_ms), ms(r.onnxruntime_ms),
                f"{r.compile_s:.1f}", "-" if r.inductor_compile_s is None else f"{r.inductor_compile_s:.1f}")
               for r in rows]
    return "\n\n".join([format_table(header, cells), format_table(timing_header, timings),
                        "graphopt O2: capture -> optimize('O2') -> to_torch; graphopt default: "
                        "torch.compile(model, backend='graphopt'), O3 (options={'level': 'O2'} skips the lowering)."])


def run_demo(quick: bool = False) -> str:
    """The demo tables; ``quick`` runs only the first model with fewer timing runs."""
    from .demo_sparse_attention import format_sparse_attention_row, run_sparse_attention_demo
    from .demo_step_cache import format_step_cache_row, run_step_cache_demo

    cases = demo_cases()[:1] if quick else demo_cases()
    rows = [run_case(case, repeats=5 if quick else 15) for case in cases]
    return "\n\n".join([format_rows(rows), format_step_cache_row(run_step_cache_demo(quick=quick)),
                        format_sparse_attention_row(run_sparse_attention_demo(quick=quick))])


if __name__ == "__main__":
    print(run_demo())
