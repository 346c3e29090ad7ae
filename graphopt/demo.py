"""``graphopt demo``: a ResNet, a ViT and a DiT (random weights) through both torch paths.

Each model runs eagerly, through ``capture -> optimize("O2") -> to_torch`` and
through ``torch.compile(backend="graphopt")``; the table shows the IR before and
after the passes, which passes fired, each path's largest output difference from
eager (relative to the largest eager magnitude) and the median latencies.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .api import capture, optimize
from .models import ModelCase, demo_cases
from .testing import max_rel_error

LEVEL = "O2"


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


def run_case(case: ModelCase, repeats: int = 15) -> DemoRow:
    """Build ``case``, run it through both graphopt paths and measure them against eager."""
    model, inputs = case.build()
    with torch.no_grad():
        expected = model(*inputs)
        graph = capture(model, inputs)
        nodes_before = len(graph)
        graph = optimize(graph, level=LEVEL)
        module = graph.to_torch()
        torch.compiler.reset()
        compiled = torch.compile(model, backend="graphopt", options={"level": LEVEL})
        return DemoRow(
            model=case.name,
            nodes_before=nodes_before,
            nodes_after=len(graph),
            passes_fired=graph.meta["report"].fired,
            diff_graphopt=max_rel_error(expected, module(*inputs)),
            diff_compile=max_rel_error(expected, compiled(*inputs)),
            eager_ms=median_ms(model, inputs, repeats),
            graphopt_ms=median_ms(module, inputs, repeats),
            compile_ms=median_ms(compiled, inputs, repeats),
        )


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
    from .cli import format_table

    header = ("model", "nodes", "passes fired", "diff graphopt", "diff compile", "eager ms", "graphopt ms",
              "compile ms")
    cells = [(r.model, f"{r.nodes_before}->{r.nodes_after}", ",".join(r.passes_fired) or "-",
              f"{r.diff_graphopt:.1e}", f"{r.diff_compile:.1e}", f"{r.eager_ms:.2f}", f"{r.graphopt_ms:.2f}",
              f"{r.compile_ms:.2f}") for r in rows]
    return format_table(header, cells)


def run_demo(quick: bool = False) -> str:
    """The demo table; ``quick`` runs only the first model with fewer timing runs."""
    cases = demo_cases()[:1] if quick else demo_cases()
    rows = [run_case(case, repeats=5 if quick else 15) for case in cases]
    return format_rows(rows)


if __name__ == "__main__":
    print(run_demo())
