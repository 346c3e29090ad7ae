"""graphopt against eager PyTorch and torch.compile on the model zoo: CPU latency, compile time, error.

For each zoo model, four ways to run it:

- ``eager``: the model as written;
- ``graphopt``: ``capture`` → ``optimize(level)`` → ``to_torch`` (an fx GraphModule);
- ``inductor``: ``torch.compile(model)``, the default backend (needs a C++ compiler);
- ``compile-graphopt``: ``torch.compile(model, backend="graphopt", options={"level": level})``.

Latency is the median of ``--repeats`` calls under ``torch.no_grad()`` on
2 threads, timed round-robin so that load from other processes falls on all
ways alike (untimed settling calls spanning ``report.SETTLE_MS`` before each
timed one: one call did not outlast the previous way's spinning OpenMP
threads), with the interquartile
range; ratios are against eager and are summarised by their geometric mean.
"prepare s" is capture + optimisation + emission, or the first (compiling)
call. Prints the tables and writes them to ``benchmarks/results/torch_compare.md``.

    python benchmarks/torch_compare.py [--models a,b] [--repeats 30] [--level O2]
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import graphopt
from graphopt.models import MODEL_CASES
from report import SETTLE_MS, failure_cell, geomean, machine, round_robin
from graphopt.testing import max_rel_error

RESULTS = Path(__file__).resolve().parent / "results" / "torch_compare.md"
THREADS = 2
WARMUP = 3
WAYS = ("eager", "graphopt", "inductor", "compile-graphopt")


@dataclass
class Row:
    model: str
    way: str
    median_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    prepare_s: float | None = None
    max_rel_error: float | None = None
    error: str = ""



def prepare(way: str, model: torch.nn.Module, inputs: tuple, level: str) -> Callable[..., Any]:
    """The callable that runs ``model`` the given way (compiled lazily: the first call compiles)."""
    if way == "eager":
        return model
    if way == "graphopt":
        return graphopt.optimize(graphopt.capture(model, inputs), level).to_torch()
    torch.compiler.reset()
    if way == "inductor":
        return torch.compile(model)
    return torch.compile(model, backend="graphopt", options={"level": level, "fallback": False})


def compare(name: str, repeats: int, level: str) -> list[Row]:
    model, inputs = MODEL_CASES[name].build()
    live: list[tuple[Row, Callable[..., Any]]] = []
    rows = []
    with torch.no_grad():
        reference = model(*inputs)
        for way in WAYS:
            row = Row(name, way)
            rows.append(row)
            try:
                start = time.perf_counter()
                run = prepare(way, model, inputs, level)
                got = run(*inputs)  # the first call: compiles the torch.compile ways
                row.prepare_s = time.perf_counter() - start
                row.max_rel_error = max_rel_error(reference, got)
                live.append((row, run))
            except Exception as exc:  # a way that fails on a model is a result, not a crash
                row.error = failure_cell(exc)
        time_round_robin(live, inputs, repeats)
    return rows


def time_round_robin(live: list[tuple[Row, Callable[..., Any]]], inputs: tuple, repeats: int) -> None:
    timings = round_robin([functools.partial(run, *inputs) for _, run in live], repeats, WARMUP, settle_ms=SETTLE_MS)
    for (row, _), t in zip(live, timings):
        row.q1_ms, row.median_ms, row.q3_ms = t.q1_ms, t.median_ms, t.q3_ms


# -------------------------------------------------------------------- tables

def latency_ratio(row: Row, eager: dict[str, Row]) -> float | None:
    base = eager.get(row.model)
    if row.error or base is None or base.error:
        return None
    return row.median_ms / base.median_ms


def detail_table(rows: list[Row]) -> list[str]:
    eager = {r.model: r for r in rows if r.way == "eager"}
    lines = ["| model | way | ms (median) | IQR ms | ×latency | prepare s | max rel error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.way} | failed: {r.error} | | | | |")
            continue
        ratio = latency_ratio(r, eager)
        lines.append(f"| {r.model} | {r.way} | {r.median_ms:.3f} | {r.q1_ms:.3f}–{r.q3_ms:.3f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} | {r.prepare_s:.2f} | {r.max_rel_error:.1e} |")
    return lines


def summary_table(rows: list[Row]) -> list[str]:
    eager = {r.model: r for r in rows if r.way == "eager"}
    lines = ["| way | models | geomean ×latency | total prepare s | worst max rel error | failures |",
             "|---|---|---|---|---|---|"]
    for way in WAYS:
        done = [r for r in rows if r.way == way and not r.error]
        ratios = [x for x in (latency_ratio(r, eager) for r in done) if x is not None]
        worst = max((r.max_rel_error for r in done), default=0.0)
        lines.append(f"| {way} | {len(done)} | {geomean(ratios):.3f} | {sum(r.prepare_s for r in done):.1f} | "
                     f"{worst:.1e} | {sum(r.way == way and bool(r.error) for r in rows)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated zoo names (default: every model of the zoo)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per way (default 30)")
    parser.add_argument("--level", default="O2", help="graphopt pipeline (default O2)")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (quartiles need two runs)")
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    level = args.level
    names = args.models.split(",") if args.models else [n for n, c in MODEL_CASES.items() if not c.slow]
    header = (f"torch {torch.__version__}, {machine()}, "
              f"{THREADS} threads, {args.repeats} calls; graphopt level {level}")
    rows: list[Row] = []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        rows += compare(name, args.repeats, level)
        print(f"{name}: done", file=sys.stderr, flush=True)
        text = "\n".join([header, "", *summary_table(rows), "", *detail_table(rows)])
        RESULTS.write_text(f"# graphopt against eager and torch.compile\n\n{text}\n")  # a cut-off run keeps its rows
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
