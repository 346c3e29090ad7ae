"""graphopt against other ONNX graph optimizers on the model zoo: node counts, onnxruntime latency, time, error.

Each zoo model is exported with ``torch.onnx.export`` (the TorchScript exporter,
``dynamo=False``, and the dynamo exporter where it works), then rewritten by

- ``onnxslim``: ``onnxslim.slim(model)``;
- ``onnxsim``: onnx-simplifier's ``simplify(model)`` (constant folding and
  shape inference), where it is installed;
- ``ort-extended``: onnxruntime's own offline optimisation at
  ``ORT_ENABLE_EXTENDED``, saved with ``SessionOptions.optimized_model_filepath``;
  it writes onnxruntime's contrib ops (FusedConv, SkipLayerNormalization, ...);
- ``graphopt``: ``load_onnx`` → ``optimize(level)`` → ``to_onnx()``, standard ONNX;
- ``graphopt-ort``: the same graph → ``to_onnx(target="onnxruntime")``, with
  onnxruntime's contrib ops, the like-for-like rival of ``ort-extended``;
- ``ort-all``: onnxruntime's offline optimisation at ``ORT_ENABLE_ALL``, which
  adds the NCHWc layout for this CPU (the saved model is valid on this kind of
  CPU only);
- ``graphopt-ort-cpu``: the same graph → ``to_onnx(target="onnxruntime-cpu")``,
  also with the NCHWc layout for this CPU, the like-for-like rival of ``ort-all``.

Every variant runs in onnxruntime on the CPU with the same session options
(2 intra-op threads, no spinning between runs) and ``ORT_DISABLE_ALL``, so the models are compared as
written; ``ort-best`` is the original under ``ORT_ENABLE_ALL``, onnxruntime's
best at load time. Latency is the median of ``--repeats`` runs, with the
interquartile range; ratios are against the original, summarised by their
geometric mean. A third table counts, over all exports, how often each
graphopt pass fired. Prints the tables and writes them to
``benchmarks/results/onnx_compare.md``.

    python benchmarks/onnx_compare.py [--models a,b] [--repeats 30] [--exporters legacy,dynamo] [--level O2]
"""
from __future__ import annotations

import argparse
import functools
import io
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import graphopt
from graphopt.models import MODEL_CASES
from graphopt.passes.targets import optimize_for_target
from report import Timing, failure_cell, geomean, machine, round_robin

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_compare.md"
THREADS = 2
WARMUP = 3
VARIANTS = ("original", "ort-best", "onnxslim", "onnxsim", "ort-extended", "graphopt", "graphopt-ort", "ort-all",
            "graphopt-ort-cpu")
OFFLINE_TOOLS = ("onnxslim", "onnxsim", "ort-extended", "graphopt", "graphopt-ort", "ort-all", "graphopt-ort-cpu")


# ------------------------------------------------------------------ exporting
def export(model: torch.nn.Module, inputs: tuple, exporter: str) -> onnx.ModelProto:
    """The model as ``torch.onnx.export`` writes it; inputs are named ``input_0``, ``input_1``, ..."""
    names = [f"input_{k}" for k in range(len(inputs))]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            buffer = io.BytesIO()
            torch.onnx.export(model, inputs, buffer, dynamo=False, input_names=names)
            return onnx.load_from_string(buffer.getvalue())
        program = torch.onnx.export(model, inputs, dynamo=True, input_names=names, verbose=False)
        return program.model_proto


# ------------------------------------------------------------------ optimizers
def run_onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def run_onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim's own check found the simplified model's outputs differ")
    return simplified


def run_ort_offline(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(level)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


@dataclass
class GraphoptRun:
    """One graphopt optimisation of an export, emitted for each target, with its pass report."""

    seconds: float
    standard: onnx.ModelProto
    onnxruntime: onnx.ModelProto
    onnxruntime_cpu: onnx.ModelProto
    report: object


def run_graphopt(model: onnx.ModelProto, level: str) -> GraphoptRun:
    start = time.perf_counter()
    graph = graphopt.optimize(graphopt.load_onnx(model), level)
    standard = graph.to_onnx()
    seconds = time.perf_counter() - start
    ort_graph, cpu_graph = (optimize_for_target(graph, target) for target in ("onnxruntime", "onnxruntime-cpu"))
    return GraphoptRun(seconds, standard, ort_graph.to_onnx(target="onnxruntime"),
                       cpu_graph.to_onnx(target="onnxruntime-cpu"), graph.meta["report"])


# ------------------------------------------------------------------- measuring
def session_options(level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    # Sessions are timed in turn: threads spinning after one session's run would steal cores from the next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@dataclass
class Row:
    model: str
    exporter: str
    variant: str
    nodes: int | None = None
    timing: Timing | None = None
    optimize_s: float | None = None
    max_diff: float | None = None
    error: str = ""


@dataclass
class Candidate:
    """One variant ready to time: its model and the level onnxruntime loads it at."""

    row: Row
    model: onnx.ModelProto
    level: ort.GraphOptimizationLevel


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def max_abs_diff(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    if len(reference) != len(got) or any(r.shape != g.shape for r, g in zip(reference, got)):
        return math.inf
    diffs = [0.0 if r.size == 0 else float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64))))
             for r, g in zip(reference, got)]
    return max(diffs, default=0.0)


def compare(name: str, exporter: str, repeats: int, level: str, reports: list) -> list[Row]:
    model, inputs = MODEL_CASES[name].build()
    try:
        original = export(model, inputs, exporter)
    except Exception as exc:  # an exporter that cannot handle the model is a result, not a crash
        return [Row(name, exporter, "original", error=failure_cell(exc))]
    disabled = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    candidates = [Candidate(Row(name, exporter, "original", len(original.graph.node), optimize_s=0.0), original, disabled),
                  Candidate(Row(name, exporter, "ort-best"), original, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)]
    rows = [c.row for c in candidates]

    def add(variant: str, make: Callable[[], tuple[onnx.ModelProto, float]]) -> None:
        row = Row(name, exporter, variant)
        rows.append(row)
        try:
            optimized, row.optimize_s = make()
            row.nodes = len(optimized.graph.node)
            candidates.append(Candidate(row, optimized, disabled))
        except Exception as exc:
            row.error = failure_cell(exc)

    levels = ort.GraphOptimizationLevel
    tools = {"onnxslim": run_onnxslim, "onnxsim": run_onnxsim,
             "ort-extended": lambda m: run_ort_offline(m, levels.ORT_ENABLE_EXTENDED),
             "ort-all": lambda m: run_ort_offline(m, levels.ORT_ENABLE_ALL)}
    for variant, tool in tools.items():
        add(variant, lambda tool=tool: _timed(tool, copy_model(original)))  # tools may rewrite their argument
    try:
        run = run_graphopt(copy_model(original), level)
        reports.append(run.report)
        add("graphopt", lambda: (run.standard, run.seconds))
        add("graphopt-ort", lambda: (run.onnxruntime, run.seconds))
        add("graphopt-ort-cpu", lambda: (run.onnxruntime_cpu, run.seconds))
    except Exception as exc:
        rows += [Row(name, exporter, v, error=failure_cell(exc)) for v in ("graphopt", "graphopt-ort", "graphopt-ort-cpu")]
    time_candidates(candidates, {f"input_{k}": t.numpy() for k, t in enumerate(inputs)}, repeats)
    return rows


def _timed(tool: Callable[[onnx.ModelProto], onnx.ModelProto], model: onnx.ModelProto) -> tuple[onnx.ModelProto, float]:
    start = time.perf_counter()
    optimized = tool(model)
    return optimized, time.perf_counter() - start


def time_candidates(candidates: list[Candidate], feeds: dict[str, np.ndarray], repeats: int) -> None:
    """Time the variants round-robin, so that load from other processes falls on all of them alike.

    Fills in each row's timing and its largest output difference from the first candidate's (the original).
    """
    live = []
    outputs: dict[int, list[np.ndarray]] = {}
    for c in candidates:
        try:
            session = ort.InferenceSession(c.model.SerializeToString(), session_options(c.level),
                                           providers=["CPUExecutionProvider"])
            session_feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
            for _ in range(WARMUP):
                outputs[id(c)] = session.run(None, session_feeds)
            live.append((c, session, session_feeds))
        except Exception as exc:
            c.row.error = failure_cell(exc)
    timings = round_robin([functools.partial(session.run, None, session_feeds) for _, session, session_feeds in live],
                          repeats, warmup=0)  # warmed up above, while collecting the outputs
    reference = outputs.get(id(candidates[0]))
    for (c, _, _), timing in zip(live, timings):
        c.row.timing = timing
        c.row.max_diff = max_abs_diff(reference, outputs[id(c)]) if reference is not None else math.nan



# -------------------------------------------------------------------- tables

def ratios(rows: list[Row], variant: str) -> tuple[list[float], list[float]]:
    """Node and latency ratios of ``variant`` against the original of the same export."""
    originals = {(r.model, r.exporter): r for r in rows if r.variant == "original" and not r.error}
    nodes, latency = [], []
    for r in rows:
        base = originals.get((r.model, r.exporter))
        if r.variant != variant or r.error or base is None:
            continue
        if r.nodes is not None:
            nodes.append(r.nodes / base.nodes)
        latency.append(r.timing.median_ms / base.timing.median_ms)
    return nodes, latency


def detail_table(rows: list[Row]) -> list[str]:
    originals = {(r.model, r.exporter): r for r in rows if r.variant == "original" and not r.error}
    lines = ["| model | export | variant | nodes | ×nodes | ms (median) | IQR ms | ×latency | optimize s | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.exporter} | {r.variant} | failed: {r.error} | | | | | | |")
            continue
        base = originals.get((r.model, r.exporter))
        nodes = "" if r.nodes is None else str(r.nodes)
        node_ratio = "" if r.nodes is None or base is None else f"{r.nodes / base.nodes:.2f}"
        latency_ratio = "" if base is None else f"{r.timing.median_ms / base.timing.median_ms:.2f}"
        optimize = "" if r.optimize_s is None else f"{r.optimize_s:.2f}"
        lines.append(f"| {r.model} | {r.exporter} | {r.variant} | {nodes} | {node_ratio} | "
                     f"{r.timing.median_ms:.3f} | {r.timing.q1_ms:.3f}–{r.timing.q3_ms:.3f} | "
                     f"{latency_ratio} | {optimize} | {r.max_diff:.1e} |")
    return lines


def fewest_nodes(rows: list[Row]) -> dict[str, int]:
    """For each offline tool, on how many exports it wrote the fewest nodes (ties count for each)."""
    wins = dict.fromkeys(OFFLINE_TOOLS, 0)
    exports = {(r.model, r.exporter) for r in rows}
    for key in exports:
        counts = {r.variant: r.nodes for r in rows if (r.model, r.exporter) == key and r.variant in OFFLINE_TOOLS
                  and not r.error and r.nodes is not None}
        if counts:
            best = min(counts.values())
            for variant, nodes in counts.items():
                wins[variant] += nodes == best
    return wins


def summary_table(rows: list[Row]) -> list[str]:
    wins = fewest_nodes(rows)
    exports = len({(r.model, r.exporter) for r in rows if r.variant == "original" and not r.error})
    lines = ["| variant | models | geomean ×nodes | fewest nodes | geomean ×latency | total optimize s | "
             "worst max abs diff | failures |",
             "|---|---|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        done = [r for r in rows if r.variant == variant and not r.error]
        failed = sum(r.variant == variant and bool(r.error) for r in rows)
        nodes, latency = ratios(rows, variant)
        total = sum(r.optimize_s or 0.0 for r in done)
        worst = max((r.max_diff for r in done if r.max_diff is not None), default=0.0)
        node_cell = f"{geomean(nodes):.3f}" if nodes else ""
        win_cell = f"{wins[variant]}/{exports}" if variant in wins else ""
        lines.append(f"| {variant} | {len(done)} | {node_cell} | {win_cell} | {geomean(latency):.3f} | {total:.1f} | "
                     f"{worst:.1e} | {failed} |")
    return lines


def passes_table(reports: list) -> list[str]:
    """How often each graphopt pass fired over the exports, and what it did in all (its summed statistics)."""
    fired: dict[str, int] = {}
    stats: dict[str, dict[str, float]] = {}
    for report in reports:
        for name in report.fired:
            fired[name] = fired.get(name, 0) + 1
        for record in report.records:
            totals = stats.setdefault(record.name, {})
            for key, value in record.stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    totals[key] = totals.get(key, 0) + value
    lines = [f"| pass | exports where it fired (of {len(reports)}) | summed statistics |", "|---|---|---|"]
    for name in sorted(stats, key=lambda n: (-fired.get(n, 0), n)):
        summed = ", ".join(f"{k} {v:g}" for k, v in stats[name].items() if v)
        lines.append(f"| {name} | {fired.get(name, 0)} | {summed} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated zoo names (default: every model of the zoo)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per variant (default 30)")
    parser.add_argument("--exporters", default="legacy,dynamo", help="legacy, dynamo or both (default)")
    parser.add_argument("--level", default="O2", help="graphopt pipeline (default O2)")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (quartiles need two runs)")
    torch.set_num_threads(THREADS)
    level = args.level
    names = args.models.split(",") if args.models else [n for n, c in MODEL_CASES.items() if not c.slow]
    exporters = args.exporters.split(",")
    header = (f"onnxruntime {ort.__version__}, {machine()}, {THREADS} threads, {args.repeats} runs; "
              f"graphopt level {level}; onnxslim {package_version('onnxslim')}; onnxsim {package_version('onnxsim')}; "
              f"torch {torch.__version__}")
    rows: list[Row] = []
    reports: list = []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        for exporter in exporters:
            rows += compare(name, exporter, args.repeats, level, reports)
            print(f"{name} ({exporter}): done", file=sys.stderr, flush=True)
        text = "\n".join([header, "", *summary_table(rows), "", *passes_table(reports), "", *detail_table(rows)])
        RESULTS.write_text(f"# ONNX optimizers compared\n\n{text}\n")  # a cut-off run keeps its rows
    print(text)
    return 0



def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
