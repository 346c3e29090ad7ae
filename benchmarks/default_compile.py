"""``torch.compile(model, backend="graphopt")`` with no options against eager, inductor and onnxruntime (CPU).

What a user who types the one-liner gets: graphopt's default level (O3: the rewrites, then each region
lowered to the backend it measures fastest, within ``lower_regions``' compile budget) with cold caches and
no learned cost model, as on a machine that never ran graphopt. For each model and batch size, one
process per way:

- ``graphopt``: ``torch.compile(model, backend="graphopt")``, no options;
- ``graphopt-O2``: ``options={"level": "O2"}``, the default before (rewrites, then torch's kernels);
- ``inductor``: ``torch.compile(model)``.

Each process also builds eager and onnxruntime (``torch.onnx.export``, as ``lowering_compare.py``'s
onnxruntime way) and times its way in turns with them (``report.time_in_turns``: ``--repeats`` samples
of at least ``SAMPLE_MS`` each; "IQR": their interquartile range over the median, round 1), so the
ratios to eager and onnxruntime come out of one process, where the shared machine's drifting load
cancels; ÷ inductor goes through eager (graphopt's ÷ eager over inductor's ÷ eager). "best other" is the
fastest of eager, inductor and onnxruntime. Rounds repeat every process (``--rounds``); ratios are
geometric means over rounds, with the lowest and highest round beside them. "compile s" is the first call's wall time in round 1 (Dynamo, AOTAutograd and graphopt or
inductor); graphopt's own INFO line (logger ``graphopt.compile_backend``) gives its regions' backends.
The table (and the raw results, ``default_compile.json``) is rewritten after every model, so an interrupted
run leaves what it measured.

    python benchmarks/default_compile.py [--models a,b] [--batches 1,8] [--repeats 10] [--rounds 2]
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

import lowering_compare

from graphopt.backends.lower import LowerRegions
from graphopt.models import MODEL_CASES
from graphopt.testing import flatten_outputs, max_rel_error
from lowering_compare import MODELS, SAMPLE_MS, THREADS, WARMUP, batched, empty_caches, onnxruntime_runner
from report import batch_sizes, failure_cell, geomean, machine, restart_with_tuned_malloc, run_child, time_in_turns

RESULTS = Path(__file__).resolve().parent / "results" / "default_compile.md"
WAYS = ("graphopt", "graphopt-O2", "inductor")
COMPILE_LINE = re.compile(r"graphopt: compiled \S+ in ([\d.]+) s(?:: (.*))?")


class _Lines(logging.Handler):
    """Keeps the messages of graphopt's compile log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def compiled_way(model: torch.nn.Module, way: str) -> Any:
    torch.compiler.reset()
    if way == "inductor":
        return torch.compile(model)
    if way == "graphopt-O2":
        return torch.compile(model, backend="graphopt", options={"level": "O2"})
    return torch.compile(model, backend="graphopt")


def measure(name: str, batch: int, way: str, repeats: int, threads: int = THREADS) -> dict[str, Any]:
    """One way of one model and batch size, compiled, checked and timed in turns with eager and onnxruntime."""
    torch.set_num_threads(threads)
    lowering_compare.THREADS = threads  # the onnxruntime export's intra-op threads
    model, inputs = MODEL_CASES[name].build()
    inputs = batched(inputs, batch)
    result: dict[str, Any] = {}
    lines = _Lines()
    logger = logging.getLogger("graphopt.compile_backend")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    with torch.no_grad():
        reference = flatten_outputs(model(*inputs))
        runs = {"eager": model}
        try:
            runs["onnxruntime"] = onnxruntime_runner(model, inputs)
        except Exception as exc:  # the exporter fails on this model: no onnxruntime column
            result["onnxruntime_error"] = failure_cell(exc)
        try:
            start = time.perf_counter()
            compiled = compiled_way(model, way)
            got = flatten_outputs(compiled(*inputs))
            result["compile_s"] = time.perf_counter() - start
        except Exception as exc:
            result["error"] = failure_cell(exc)
            return result
        result["max_rel_error"] = max_rel_error(reference[:len(got)], got)
        result["graphopt_lines"] = [m for m in lines.messages if COMPILE_LINE.match(m)]
        samples = time_in_turns([functools.partial(f, *inputs) for f in (compiled, *runs.values())], repeats, WARMUP,
                                SAMPLE_MS)
    medians = [statistics.median(s) for s in samples]
    result["ms"] = dict(zip((way, *runs), medians))
    q1, _, q3 = statistics.quantiles(samples[0], n=4, method="inclusive")
    result["iqr"] = (q3 - q1) / medians[0]
    result["ratio"] = {other: medians[0] / m for other, m in zip(runs, medians[1:])}
    return result


def regions(lines: list[str]) -> tuple[float, str]:
    """graphopt's own compile seconds and its regions' backends, summed over its compile lines."""
    seconds, chosen = 0.0, Counter()
    for line in lines:
        match = COMPILE_LINE.match(line)
        seconds += float(match.group(1))
        for backend, n in re.findall(r"(\w+) x(\d+)", match.group(2) or ""):
            chosen[backend] += int(n)
    return seconds, ", ".join(f"{b}×{n}" for b, n in chosen.most_common()) or "none"


def table(results: dict[tuple[str, int, str], list[dict[str, Any]]], names: list[str], batches: list[int]) -> list[str]:
    lines = ["| model | batch | eager ms | onnxruntime ms | graphopt ms | graphopt ÷ eager | ÷ inductor | ÷ onnxruntime "
             "| ÷ best other (rounds' range) | graphopt IQR | O2 ÷ best other | graphopt compile s (own) "
             "| inductor compile s | regions → backend | max rel error |", "|" + "---|" * 15]
    summary: dict[int, dict[str, list[float]]] = {b: {} for b in batches}

    def pooled(name: str, batch: int, way: str, other: str) -> list[float]:
        return [r["ratio"][other] for r in results.get((name, batch, way), []) if other in r.get("ratio", {})]

    for batch in batches:
        for name in names:
            rounds = {way: results.get((name, batch, way), []) for way in WAYS}
            ok = {way: [r for r in rs if "error" not in r] for way, rs in rounds.items()}
            if not rounds["graphopt"]:
                continue
            if not ok["graphopt"]:
                lines.append(f"| {name} | {batch} | failed: {rounds['graphopt'][0]['error']} |" + " |" * 13)
                continue
            first = ok["graphopt"][0]
            inductor = geomean(pooled(name, batch, "inductor", "eager"))

            def against_best(way: str) -> list[float]:
                """Per round: the way's time over the fastest other's, the largest of its ratios (÷ inductor
                through eager)."""
                return [max(r["ratio"]["eager"], r["ratio"].get("onnxruntime", 0.0),
                            r["ratio"]["eager"] / inductor if not math.isnan(inductor) else 0.0) for r in ok[way]]

            vs_eager = geomean(pooled(name, batch, "graphopt", "eager"))
            vs_ort = geomean(pooled(name, batch, "graphopt", "onnxruntime"))
            best, best_o2 = against_best("graphopt"), against_best("graphopt-O2")
            own, chosen = regions(first.get("graphopt_lines", []))
            ind_compile = ok["inductor"][0]["compile_s"] if ok["inductor"] else math.nan
            eager_ms = statistics.median(r["ms"]["eager"] for r in ok["graphopt"])
            ort_ms = [r["ms"]["onnxruntime"] for r in ok["graphopt"] if "onnxruntime" in r["ms"]]
            graphopt_ms = statistics.median(r["ms"]["graphopt"] for r in ok["graphopt"])
            stats = summary[batch]
            for key, value in (("eager", vs_eager), ("inductor", vs_eager / inductor), ("onnxruntime", vs_ort),
                               ("best", geomean(best)), ("O2 best", geomean(best_o2)),
                               ("compile", first["compile_s"]), ("inductor compile", ind_compile)):
                if not math.isnan(value):
                    stats.setdefault(key, []).append(value)
            lines.append(
                f"| {name} | {batch} | {eager_ms:.2f} | {statistics.median(ort_ms) if ort_ms else math.nan:.2f} "
                f"| {graphopt_ms:.2f} | {vs_eager:.2f} | {vs_eager / inductor:.2f} | {vs_ort:.2f} "
                f"| {geomean(best):.2f} ({min(best):.2f}–{max(best):.2f}) | {first['iqr']:.0%} | {geomean(best_o2):.2f} "
                f"| {first['compile_s']:.1f} ({own:.1f}) | {ind_compile:.1f} | {chosen} | {first['max_rel_error']:.1e} |")
    lines += ["", "| batch | models | graphopt ÷ eager | ÷ inductor | ÷ onnxruntime | ÷ best other | O2 ÷ best other "
              "| graphopt compile s (median, max) | inductor compile s (median, max) |", "|" + "---|" * 9]
    for batch, stats in summary.items():
        if not stats.get("best"):
            continue
        compile_s, ind = stats.get("compile", [math.nan]), stats.get("inductor compile", [math.nan])
        lines.append(f"| {batch} | {len(stats['best'])} | {geomean(stats['eager']):.2f} "
                     f"| {geomean(stats.get('inductor', [])):.2f} | {geomean(stats.get('onnxruntime', [])):.2f} "
                     f"| {geomean(stats['best']):.2f} | {geomean(stats.get('O2 best', [])):.2f} "
                     f"| {statistics.median(compile_s):.1f}, {max(compile_s):.1f} "
                     f"| {statistics.median(ind):.1f}, {max(ind):.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    parser.add_argument("--batches", type=batch_sizes, default=[1, 8], help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=10, help="samples per way and process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per way, model and batch")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"torch and onnxruntime threads (default {THREADS}); 1 where other jobs share the cores: "
                             "torch's OpenMP threads wait on each other at every op when one is descheduled")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["name"], spec["batch"], spec["way"], spec["repeats"], spec["threads"])))
        return 0
    unknown = sorted(set(args.models.split(",")) - set(MODEL_CASES))
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; zoo names: {', '.join(sorted(MODEL_CASES))}")
    restart_with_tuned_malloc()
    caches = empty_caches()
    names = args.models.split(",")
    results: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    header = ["# torch.compile(backend=\"graphopt\") with its default options against eager, inductor and onnxruntime",
              "", f"{machine()}, {args.threads} thread{'s' * (args.threads > 1)}, torch {torch.__version__}, onnxruntime {ort.__version__}; "
              f"graphopt's default: O3, lower_regions' compile budget {LowerRegions.compile_budget_s:g} s per graph; "
              f"caches: {caches}; each way in a process of its own, timed in turns with eager and onnxruntime "
              f"({args.repeats} samples of ≥ {SAMPLE_MS:g} ms each), {args.rounds} rounds; the machine was shared "
              f"with other jobs (noisy: compare the ratios, not the ms). Compile s: round 1, cold; (own): "
              f"graphopt's own share, from its log line.", ""]
    for batch in args.batches:
        for round_ in range(args.rounds):
            for name in names:
                for way in WAYS[round_ % len(WAYS):] + WAYS[:round_ % len(WAYS)]:
                    result = run_child(__file__, {"name": name, "batch": batch, "way": way, "repeats": args.repeats,
                                                  "threads": args.threads})
                    results.setdefault((name, batch, way), []).append(
                        result if isinstance(result, dict) else {"error": result})
                text = "\n".join([*header, *table(results, names, args.batches), ""])
                RESULTS.write_text(text)
                RESULTS.with_suffix(".json").write_text(json.dumps(
                    [{"model": n, "batch": b, "way": w, "rounds": rs} for (n, b, w), rs in results.items()], indent=1))
                print(f"batch {batch} round {round_ + 1} {name} done", flush=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
