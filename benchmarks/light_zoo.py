"""The ONNX model zoo's "light" set (opset 9, shipped in the onnx wheel) through graphopt and its rivals.

Each of the nine CNNs is rewritten by

- ``graphopt``: ``load_onnx`` (which converts opset 9 to 13) → ``optimize("O2")`` → ``to_onnx()``,
  standard ops, what ``graphopt optimize`` writes by default;
- ``graphopt-ort-cpu``: the same graph → ``to_onnx(target="onnxruntime-cpu")`` (contrib ops and
  the NCHWc layout of this CPU), ``graphopt optimize --target onnxruntime-cpu``;
- ``graphopt-fold-all``: O2 with ``fold_constants``' size limit lifted (by default it leaves results
  over 1 MiB computed, so folding never bloats a file), which folds the big weights as onnxslim does;
- ``onnxslim``: the released package, ``onnxslim.slim(model)``;
- ``ort-extended`` / ``ort-all``: onnxruntime's own offline optimization at ``ORT_ENABLE_EXTENDED`` /
  ``ORT_ENABLE_ALL``, saved with ``SessionOptions.optimized_model_filepath`` and loaded from that file
  (onnxruntime keeps the graph inputs of the IR-version-3 initializers it folded away, which then
  become required inputs; those unread inputs are dropped so the saved file runs).

Every variant then runs in onnxruntime on the CPU as written (``ORT_DISABLE_ALL``, the session options
of ``onnx_compare.py``); ``ort-best`` is the original loaded at ``ORT_ENABLE_ALL``, onnxruntime's best
at load time. The variants of a model are timed in turns in one process (median of ``--repeats`` runs,
interquartile range beside it) on the model's own input shape (batch 1); the output difference is the
largest absolute difference from the original's outputs on the same random input. The light models
keep their weights as ConstantOfShape nodes, so "size" shows what folding them costs on disk.
Prints the table and writes ``benchmarks/results/light_zoo.md`` and ``light_zoo.json``.

    python benchmarks/light_zoo.py [--models light_resnet50,...] [--repeats 15]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import graphopt
from graphopt.passes.targets import optimize_for_target
from onnx_compare import (THREADS, WARMUP, copy_model, max_abs_diff, package_version, run_onnxslim, run_ort_offline,
                          session_options)
from report import failure_cell, geomean, machine, round_robin

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("original", "ort-best", "onnxslim", "ort-extended", "ort-all", "graphopt", "graphopt-ort-cpu",
            "graphopt-fold-all")
UNLIMITED = {"fold_constants": {"max_output_bytes": 1 << 62}}


@dataclass
class Row:
    model: str
    variant: str
    nodes: int | None = None
    size_mb: float | None = None
    median_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    optimize_s: float | None = None
    max_diff: float | None = None
    error: str = ""


def graphopt_variants(model: onnx.ModelProto) -> tuple[dict[str, onnx.ModelProto], float, int | None]:
    """Both graphopt outputs, the seconds load + O2 + emit took, and the opset the load converted from."""
    start = time.perf_counter()
    graph = graphopt.optimize(graphopt.load_onnx(model), "O2")
    standard = graph.to_onnx()
    seconds = time.perf_counter() - start
    fold_all = graphopt.optimize(graphopt.load_onnx(model), "O2", options=UNLIMITED).to_onnx()
    cpu_graph = optimize_for_target(graph, "onnxruntime-cpu")
    return ({"graphopt": standard, "graphopt-ort-cpu": cpu_graph.to_onnx(target="onnxruntime-cpu"),
             "graphopt-fold-all": fold_all}, seconds, graph.meta["onnx"].get("converted_from_opset"))


def measure(path: Path, repeats: int) -> tuple[list[Row], int | None]:
    name = path.stem.removeprefix("light_")
    original = onnx.load(path)
    disabled, enabled = ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    candidates: list[tuple[Row, onnx.ModelProto, ort.GraphOptimizationLevel]] = [
        (Row(name, "original", len(original.graph.node), original.ByteSize() / 1e6, optimize_s=0.0), original, disabled),
        (Row(name, "ort-best"), original, enabled)]
    rows = [row for row, _, _ in candidates]

    def add(variant: str, model: onnx.ModelProto, seconds: float) -> None:
        row = Row(name, variant, len(model.graph.node), model.ByteSize() / 1e6, optimize_s=seconds)
        rows.append(row)
        candidates.append((row, model, disabled))

    extended = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    tools = {"onnxslim": run_onnxslim,
             "ort-extended": lambda m: without_unread_inputs(run_ort_offline(m, extended)),
             "ort-all": lambda m: without_unread_inputs(run_ort_offline(m, enabled))}
    for variant, tool in tools.items():
        start = time.perf_counter()
        try:
            optimized = tool(copy_model(original))  # tools may rewrite their argument
            add(variant, optimized, time.perf_counter() - start)
        except Exception as exc:  # a tool that fails on a model is a result, not a crash
            rows.append(Row(name, variant, error=failure_cell(exc)))
    converted_from = None
    try:
        models, seconds, converted_from = graphopt_variants(copy_model(original))
        for variant, model in models.items():
            add(variant, model, seconds)
    except Exception as exc:
        rows += [Row(name, v, error=failure_cell(exc)) for v in ("graphopt", "graphopt-ort-cpu", "graphopt-fold-all")]
    time_in_turns(candidates, repeats)
    order = {v: k for k, v in enumerate(VARIANTS)}
    return sorted(rows, key=lambda r: order[r.variant]), converted_from


def without_unread_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without graph inputs no node reads (see the module docstring: onnxruntime's saved files)."""
    read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    kept = [vi for vi in model.graph.input if vi.name in read]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def time_in_turns(candidates: list, repeats: int) -> None:
    """Time every variant round-robin on one random input; fill in timings and output differences."""
    rng = np.random.default_rng(0)
    live, outputs, feeds = [], {}, None
    for row, model, level in candidates:
        try:
            session = ort.InferenceSession(model.SerializeToString(), session_options(level),
                                           providers=["CPUExecutionProvider"])
            if feeds is None:  # the original's inputs, as onnxruntime sees them (initializers excluded)
                feeds = {i.name: rng.random(i.shape, dtype=np.float32) for i in session.get_inputs()}
            # onnxruntime's saved models list old initializers as inputs, which keep their values unfed
            session_feeds = {i.name: feeds[i.name] for i in session.get_inputs() if i.name in feeds}
            for _ in range(WARMUP):
                outputs[id(row)] = session.run(None, session_feeds)
            live.append((row, functools.partial(session.run, None, session_feeds)))
        except Exception as exc:
            row.error = failure_cell(exc)
    timings = round_robin([run for _, run in live], repeats, warmup=0)
    reference = outputs.get(id(candidates[0][0]))
    for (row, _), timing in zip(live, timings):
        row.median_ms, row.q1_ms, row.q3_ms = timing.median_ms, timing.q1_ms, timing.q3_ms
        row.max_diff = max_abs_diff(reference, outputs[id(row)]) if reference is not None else math.nan


def table(rows: list[Row]) -> list[str]:
    base = {r.model: r for r in rows if r.variant == "original" and r.median_ms is not None}
    lines = ["| model | variant | nodes | size MB | ms median (IQR) | ×latency | optimize s | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.variant} | failed: {r.error} | | | | | |")
            continue
        ratio = f"{r.median_ms / base[r.model].median_ms:.2f}" if r.model in base else ""
        cells = ["" if r.nodes is None else str(r.nodes), "" if r.size_mb is None else f"{r.size_mb:.1f}",
                 f"{r.median_ms:.2f} ({r.q3_ms - r.q1_ms:.2f})", ratio,
                 "" if r.optimize_s is None else f"{r.optimize_s:.2f}", f"{r.max_diff:.1e}"]
        lines.append(f"| {r.model} | {r.variant} | " + " | ".join(cells) + " |")
    return lines


def summary(rows: list[Row]) -> list[str]:
    base = {r.model: r for r in rows if r.variant == "original" and r.median_ms is not None}
    lines = ["| variant | models | geomean ×nodes | geomean ×latency | worst max abs diff | failures |",
             "|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        done = [r for r in rows if r.variant == variant and not r.error and r.model in base]
        nodes = [r.nodes / base[r.model].nodes for r in done if r.nodes is not None]
        latency = [r.median_ms / base[r.model].median_ms for r in done]
        worst = max((r.max_diff for r in done), default=math.nan)
        failed = sum(r.variant == variant and bool(r.error) for r in rows)
        lines.append(f"| {variant} | {len(done)} | {geomean(nodes):.3f} | {geomean(latency):.3f} | {worst:.1e} | "
                     f"{failed} |".replace("nan", ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated file stems (default: all nine)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per variant (default 10)")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (quartiles need two runs)")
    paths = sorted(LIGHT.glob("light_*.onnx"))
    if args.models:
        paths = [LIGHT / f"{m}.onnx" for m in args.models.split(",")]
    header = (f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, {machine()}, {THREADS} threads, "
              f"{args.repeats} runs in turns; graphopt O2; onnxslim {package_version('onnxslim')}. The CPU is shared "
              f"with other work: compare variants within a model, not across runs.")
    rows: list[Row] = []
    conversions = {}
    start = time.perf_counter()
    for path in paths:
        model_rows, conversions[path.stem] = measure(path, args.repeats)
        rows += model_rows
        print(f"{path.stem}: done", file=sys.stderr, flush=True)
    opsets = ", ".join(f"{k.removeprefix('light_')} {v}" for k, v in conversions.items())
    text = "\n".join([header, "", f"graphopt converted from opset: {opsets}", "", *summary(rows), "",
                      *table(rows), "", f"{time.perf_counter() - start:.0f} s"])
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "light_zoo.md").write_text(f"# ONNX model zoo light set: graphopt against onnxslim and onnxruntime\n\n"
                                          f"{text}\n")
    (RESULTS / "light_zoo.json").write_text(json.dumps({"header": header, "converted_from_opset": conversions,
                                                        "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
