"""Lowering (O3) against eager, inductor and onnxruntime: CPU latency at batch 1 and 8, compile time.

For each model and batch size, the ways to run it:

- ``eager``: the model as written;
- ``inductor``: ``torch.compile(model)``, the default backend;
- ``onnxruntime``: ``torch.onnx.export`` (legacy exporter), ``ORT_ENABLE_ALL``, the session and run
  options of graphopt's onnxruntime regions, called through ``InferenceSession.run`` on numpy views
  of the torch inputs, its outputs wrapped as torch tensors;
- ``graphopt-O3``: ``torch.compile(model, backend="graphopt", options={"level": "O3"})``: O2, then
  each region lowered to the backend the measured cost model picks (``--backends``);
- ``graphopt-export``: graphopt's Python API, ``graphopt.optimize(graphopt.capture(model, inputs), "O3")``
  emitted back to a ``GraphModule``: the same pipeline and cost models as graphopt-O3, captured once
  through ``torch.export``, so a call runs no Dynamo (guards, parameter fetches) and no AOTAutograd
  wrappers. It shows what the torch.compile entry costs graphopt-O3 per call;
- ``compile-floor``: ``torch.compile`` with a backend that computes nothing (it returns the outputs of
  its first call): what any torch.compile backend pays per call before its code runs (Dynamo's guards
  on every parameter and its frame handling). Not a way to run the model, a reference line.

Each way of each model and batch size runs in a process of its own, one process at a time: it
builds the model, prepares the way, checks its outputs against eager, and times it alone
(``--repeats`` samples, each the mean of at least ``SAMPLE_MS`` of back-to-back calls, under
``torch.no_grad()`` on 2 threads). Timed in one process, the ways skewed each other: every
``torch.compile`` of one model adds a cache entry to the same ``forward`` code object, and which
entry Dynamo meets first moved a backend that computes nothing between 0.07 and 0.13 ms per call
on MobileNetV2; processes alive side by side charged each other for their spinning thread pools
(inductor's GPT-2 at 1.5 ms instead of 0.6). The load of this shared machine drifts by more than
that (one way, one process after another: 0.33 to 0.51 ms), so every way gets ``--rounds``
processes, in rounds over all models with the ways' order rotated each round: "ms" and "IQR" are
over all rounds' samples, "process spread" is how far the processes' own medians disagree.
×: against eager; "prepare s" is the export or the first, compiling, call, in the first round:
with ``--cold`` inductor and graphopt start from empty caches, otherwise both reuse what earlier
runs left. The graphopt row also lists the backends its regions went to. Prints the tables and
writes them to ``benchmarks/results/lowering_compare.md``.

With ``--tuned-malloc`` the script runs under ``report.TUNED_MALLOC`` (glibc keeps freed memory
instead of page-faulting it in again on every large tensor) and writes
``lowering_compare_tuned_malloc.md``: the allocator is the same for every way, but it changes
eager's and inductor's times much more than onnxruntime's.

With ``--frozen-guards`` every ``torch.compile`` way (inductor, graphopt, the floor) is compiled with
``options={"guard_filter_fn": graphopt.frozen_module_guards}``, which drops Dynamo's guards on module
attributes, and the results file gets a ``_frozen_guards`` suffix; ``--frozen-guards model`` takes
``graphopt.frozen_model_guards``, which drops the guards on globals too (suffix ``_frozen_model_guards``).

With ``--anchored`` the inductor, graphopt-O3 and graphopt-export processes also time eager and the
onnxruntime export, in turns with their own way (``report.time_in_turns``): neither adds a Dynamo cache
entry, so they skew nothing, and the ratios to them come out of one process, where the machine's load
cancels. The "same-process ratios" table gives them, pooled over rounds by geometric mean; O3 ÷ inductor goes
through eager (each process's O3 ÷ eager over inductor's ÷ eager), and so does export ÷ inductor. The
file gets an ``_anchored`` suffix.

    python benchmarks/lowering_compare.py [--models a,b] [--batches 1,8] [--repeats 10] [--rounds 3]
        [--cold] [--tuned-malloc] [--frozen-guards [modules|model]] [--anchored]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

import graphopt
from graphopt import frozen_model_guards, frozen_module_guards
from graphopt.backends._onnxruntime import inference_session
from graphopt.backends.base import cache_dir
from graphopt.models import MODEL_CASES
from graphopt.testing import flatten_outputs, max_rel_error
from report import (Timing, batch_sizes, failure_cell, geomean, machine, restart_with_tuned_malloc, run_child, time_alone,
                    time_in_turns)

RESULTS = Path(__file__).resolve().parent / "results" / "lowering_compare.md"
THREADS = 2
WARMUP = 3
SAMPLE_MS = 20.0
"""The least time one sample spans (calls are repeated back to back until it does)."""
WAYS = ("eager", "inductor", "onnxruntime", "graphopt-O3", "graphopt-export", "compile-floor")
ANCHORS = ("eager", "inductor", "onnxruntime")
"""The ways graphopt's own are measured against ("best other")."""
GRAPHOPT_WAYS = ("graphopt-O3", "graphopt-export")
GUARD_FILTERS = {"modules": frozen_module_guards, "model": frozen_model_guards}
"""``--frozen-guards`` choices."""
SAME_PROCESS = ("eager", "onnxruntime")
"""The ways an ``--anchored`` process times beside its own: they add no Dynamo cache entries."""
MODELS = ("torchvision.resnet18", "torchvision.resnet50", "torchvision.mobilenet_v2", "torchvision.efficientnet_b0",
          "torchvision.convnext_tiny", "timm.vit_tiny_patch16_224", "timm.deit_tiny_patch16_224", "transformers.bert",
          "transformers.gpt2", "transformers.vit", "diffusers.dit")


@dataclass
class Row:
    model: str
    batch: int
    way: str
    median_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    prepare_s: float | None = None
    max_rel_error: float | None = None
    chosen: str = ""
    error: str = ""
    samples_ms: list[float] = field(default_factory=list)
    process_ms: list[float] = field(default_factory=list)
    """The median of each process's samples (one process per round)."""
    same_process: dict[str, list[float]] = field(default_factory=dict)
    """``--anchored``: for each of ``SAME_PROCESS``, this way's median over that way's, one per process."""

    def add_round(self, other: Row) -> None:
        """Pool another process's samples of this way into this row; a failure in any round fails the row."""
        self.error = self.error or other.error
        if self.prepare_s is None:
            self.prepare_s, self.max_rel_error, self.chosen = other.prepare_s, other.max_rel_error, other.chosen
        if other.samples_ms:
            self.samples_ms += other.samples_ms
            self.process_ms.append(statistics.median(other.samples_ms))
            for anchor, ratios in other.same_process.items():
                self.same_process.setdefault(anchor, []).extend(ratios)
            timing = Timing.of(self.samples_ms)
            self.q1_ms, self.median_ms, self.q3_ms = timing.q1_ms, timing.median_ms, timing.q3_ms

    @property
    def process_spread(self) -> float:
        """(slowest - fastest process median) / median: how far the rounds disagree."""
        return (max(self.process_ms) - min(self.process_ms)) / self.median_ms


def batched(inputs: tuple, batch: int) -> tuple:
    """The inputs repeated ``batch`` times along dim 0 (every zoo model takes batch-first tensors)."""
    return tuple(x.repeat(batch, *[1] * (x.dim() - 1)) if isinstance(x, torch.Tensor) and x.dim() else x
                 for x in inputs)


def onnxruntime_runner(model: torch.nn.Module, inputs: tuple) -> Callable[..., Any]:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, buffer, dynamo=False)
    # As graphopt's onnxruntime regions: workers stop spinning when a run returns. Spinning on, they
    # held the cores long after it and slowed whichever way ran next by up to 2x.
    session = inference_session(buffer.getvalue(), "all", THREADS, config={"session.force_spinning_stop": "1"})
    tensor_positions = [k for k, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
    input_positions = [(i.name, k) for i, k in zip(session.get_inputs(), tensor_positions)]
    # Run options made once, as graphopt's regions make them: a run passed none builds defaults (about
    # 6 µs on HF BERT-tiny at batch 1, its caches cold from the run before).
    run_options = ort.RunOptions()

    def run(*args: Any) -> list[torch.Tensor]:
        # Torch tensors in and out, as every way is called: numpy views of the inputs made per call.
        feeds = {name: args[k].numpy() for name, k in input_positions}
        return [torch.from_numpy(o) for o in session.run(None, feeds, run_options)]

    return run


def prepare(row: Row, model: torch.nn.Module, inputs: tuple, backends: tuple[str, ...],
            report: Path, guards: dict[str, Any]) -> Callable[..., Any]:
    if row.way == "eager":
        return model
    if row.way == "onnxruntime":
        return onnxruntime_runner(model, inputs)
    lowering = {"backends": backends, "source": row.model}
    if row.way == "graphopt-export":
        return exported_runner(model, inputs, lowering, report)
    torch.compiler.reset()
    if row.way == "inductor":
        return torch.compile(model, options=dict(guards))
    if row.way == "compile-floor":
        return torch.compile(model, backend=_floor_backend, options=dict(guards))
    return torch.compile(model, backend="graphopt", options={
        "level": "O3", "pass_options": {"lower_regions": lowering}, "fallback": False, "report": str(report), **guards})


def exported_runner(model: torch.nn.Module, inputs: tuple, lowering: dict[str, Any], report: Path
                    ) -> Callable[..., Any]:
    """The model through graphopt's Python API at O3, as a ``GraphModule``; its lowering decisions are
    written to ``report`` as the torch.compile backend writes them."""
    graph = graphopt.optimize(graphopt.capture(model, inputs), "O3", options={"lower_regions": lowering})
    report.write_text(json.dumps({"graphs": [{"lowering": [{"chosen": d.chosen} for d in graph.meta["lowering"]]}]}))
    return graph.to_torch()


def _floor_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
    outputs = gm(*example_inputs)
    return lambda *_: outputs


def compare(name: str, batch: int, way: str, repeats: int, backends: tuple[str, ...],
            guards: dict[str, Any], anchored: bool = False) -> Row:
    """One way of one model and batch size, prepared, checked and timed in this process."""
    torch.set_num_threads(THREADS)
    model, inputs = MODEL_CASES[name].build()
    inputs = batched(inputs, batch)
    row = Row(name, batch, way)
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        reference = flatten_outputs(model(*inputs))
        report = Path(tmp) / "report.json"
        try:
            start = time.perf_counter()
            run = prepare(row, model, inputs, backends, report, guards)
            got = flatten_outputs(run(*inputs))
            row.prepare_s = time.perf_counter() - start
        except Exception as exc:  # a way that fails on a model is a result, not a crash
            row.error = failure_cell(exc)
            return row
        row.max_rel_error = max_rel_error(reference[:len(got)], got)
        if report.exists():
            chosen = Counter(d["chosen"] or "eager" for g in json.loads(report.read_text())["graphs"]
                             for d in g["lowering"])
            row.chosen = ", ".join(f"{b}×{k}" for b, k in chosen.most_common())
        if not (anchored and way in ("inductor", *GRAPHOPT_WAYS)):
            row.samples_ms = time_alone(functools.partial(run, *inputs), repeats, WARMUP, SAMPLE_MS)
            return row
        anchors = {}
        for anchor in SAME_PROCESS:
            try:
                anchors[anchor] = prepare(Row(name, batch, anchor), model, inputs, backends, report, guards)
            except Exception:  # the export fails on this model (its own row says why)
                pass
        samples = time_in_turns([functools.partial(f, *inputs) for f in (run, *anchors.values())], repeats, WARMUP,
                                SAMPLE_MS)
        row.samples_ms = samples[0]
        row.same_process = {a: [statistics.median(samples[0]) / statistics.median(ts)]
                            for a, ts in zip(anchors, samples[1:])}
    return row


def compare_in_child(name: str, batch: int, way: str, repeats: int, backends: tuple[str, ...],
                     frozen_guards: str | None, anchored: bool) -> Row:
    """:func:`compare` in a fresh process (this script with ``--child``), waited for."""
    result = run_child(__file__, {"name": name, "batch": batch, "way": way, "repeats": repeats,
                                  "backends": backends, "frozen_guards": frozen_guards, "anchored": anchored})
    return Row(**result) if isinstance(result, dict) else Row(name, batch, way, error=result)


def ratio(row: Row, rows: list[Row]) -> float | None:
    eager = next(r for r in rows if r.model == row.model and r.batch == row.batch and r.way == "eager")
    return None if row.error or eager.error else row.median_ms / eager.median_ms


def detail_table(rows: list[Row]) -> list[str]:
    lines = ["| model | batch | way | ms (median) | IQR ms | process spread | ×eager | prepare s | max rel error "
             "| regions → backend |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.batch} | {r.way} | failed: {r.error} | | | | | | |")
            continue
        lines.append(f"| {r.model} | {r.batch} | {r.way} | {r.median_ms:.2f} | {r.q3_ms - r.q1_ms:.2f} | "
                     f"{r.process_spread:.0%} | {ratio(r, rows):.2f} | {r.prepare_s:.1f} | {r.max_rel_error:.1e} "
                     f"| {r.chosen} |")
    return lines


def summary_table(rows: list[Row], batches: list[int]) -> list[str]:
    lines = ["| batch | way | models | geomean ×eager | geomean ×best other | total prepare s | failures |",
             "|---|---|---|---|---|---|---|"]
    for batch in batches:
        for way in WAYS:
            done = [r for r in rows if r.batch == batch and r.way == way and not r.error]
            against_best = []
            for r in done:
                others = [o.median_ms for o in rows if o.model == r.model and o.batch == batch
                          and o.way in ANCHORS and not o.error]
                if way in GRAPHOPT_WAYS and others:
                    against_best.append(r.median_ms / min(others))
            lines.append(f"| {batch} | {way} | {len(done)} | {geomean([ratio(r, rows) for r in done]):.3f} | "
                         f"{geomean(against_best):.3f} | {sum(r.prepare_s for r in done):.1f} | "
                         f"{sum(r.batch == batch and r.way == way and bool(r.error) for r in rows)} |")
    return lines


def empty_caches() -> str:
    """Point inductor and graphopt at fresh cache folders, so that "prepare s" is a cold compile for both;
    the learned cost model moves along (it is trained once per machine, not per model). Says which."""
    learned = cache_dir("learned") / "model.pkl"
    fresh = Path(tempfile.mkdtemp(prefix="lowering-compare-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(fresh / "inductor")
    os.environ["GRAPHOPT_CACHE_DIR"] = str(fresh / "graphopt")
    if not learned.exists():
        return "cold (empty inductor and graphopt caches; no learned cost model)"
    shutil.copy(learned, cache_dir("learned") / "model.pkl")
    return "cold (empty inductor and graphopt caches; graphopt's learned cost model kept)"


def same_process_table(rows: list[Row], batches: list[int]) -> list[str]:
    """``--anchored`` ratios: each graphopt way against onnxruntime and eager timed in its own processes,
    and against inductor through eager; "÷ best other" is the largest of the three (over the fastest way)."""
    def pooled(model: str, batch: int, way: str, anchor: str) -> float:
        row = next((r for r in rows if (r.model, r.batch, r.way) == (model, batch, way)), None)
        return math.nan if row is None or row.error else geomean(row.same_process.get(anchor, []))

    def against(model: str, batch: int, way: str, inductor: float) -> tuple[float, float, float, float]:
        """``way`` ÷ onnxruntime, ÷ eager, ÷ inductor (``inductor``: its ÷ eager), ÷ the best of them."""
        vs_ort, vs_eager = pooled(model, batch, way, "onnxruntime"), pooled(model, batch, way, "eager")
        vs_inductor = vs_eager / inductor
        known = [x for x in (vs_ort, vs_eager, vs_inductor) if not math.isnan(x)]
        return vs_ort, vs_eager, vs_inductor, max(known) if known else math.nan

    lines = ["| model | batch | O3 ÷ onnxruntime | O3 ÷ eager | inductor ÷ eager | O3 ÷ inductor | O3 ÷ best other "
             "| export ÷ onnxruntime | export ÷ best other |", "|---|---|---|---|---|---|---|---|---|"]
    best = {(way, b): [] for way in GRAPHOPT_WAYS for b in batches}
    for model in dict.fromkeys(r.model for r in rows):
        for batch in batches:
            inductor = pooled(model, batch, "inductor", "eager")
            vs_ort, vs_eager, vs_inductor, o3_best = against(model, batch, "graphopt-O3", inductor)
            export_ort, _, _, export_best = against(model, batch, "graphopt-export", inductor)
            for way, ratio_ in (("graphopt-O3", o3_best), ("graphopt-export", export_best)):
                if not math.isnan(ratio_):
                    best[way, batch].append(ratio_)
            lines.append(f"| {model} | {batch} | {vs_ort:.3f} | {vs_eager:.3f} | {inductor:.3f} | {vs_inductor:.3f} "
                         f"| {o3_best:.3f} | {export_ort:.3f} | {export_best:.3f} |")
    for batch in batches:
        lines.append(f"| geomean | {batch} | | | | | {geomean(best['graphopt-O3', batch]):.3f} | "
                     f"| {geomean(best['graphopt-export', batch]):.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    parser.add_argument("--batches", type=batch_sizes, default=[1, 8], help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=10, help="samples per process")
    parser.add_argument("--rounds", type=int, default=3,
                        help="processes per way, model and batch, in rounds over all of them (default 3)")
    parser.add_argument("--backends", default="onnxruntime,inductor,torch",
                        help="graphopt's candidate backends (default: onnxruntime,inductor,torch)")
    parser.add_argument("--cold", action="store_true",
                        help="compile with empty inductor and graphopt caches (graphopt's learned cost model is kept)")
    parser.add_argument("--tuned-malloc", action="store_true",
                        help="run under report.TUNED_MALLOC (results file suffix _tuned_malloc)")
    parser.add_argument("--frozen-guards", nargs="?", const="modules", choices=sorted(GUARD_FILTERS),
                        help="compile with graphopt.frozen_module_guards (modules, the default; suffix _frozen_guards) "
                             "or frozen_model_guards (model; suffix _frozen_model_guards) as guard filter")
    parser.add_argument("--anchored", action="store_true",
                        help="time eager and the onnxruntime export beside inductor and O3 in their processes "
                             "(suffix _anchored)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one way, as compare_in_child asks
    args = parser.parse_args(argv)
    if args.repeats < 2 or args.rounds < 1:
        parser.error("--repeats must be at least 2 (quartiles need two samples) and --rounds at least 1")
    unknown = sorted(set(args.models.split(",")) - set(MODEL_CASES))
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; zoo names: {', '.join(sorted(MODEL_CASES))}")
    if args.child:
        spec = json.loads(args.child)
        guards = {"guard_filter_fn": GUARD_FILTERS[spec["frozen_guards"]]} if spec["frozen_guards"] else {}
        row = compare(spec["name"], spec["batch"], spec["way"], spec["repeats"], tuple(spec["backends"]), guards,
                      spec["anchored"])
        print(json.dumps(dataclasses.asdict(row)))
        return 0
    if args.tuned_malloc:
        restart_with_tuned_malloc()
    caches = empty_caches() if args.cold else "as found (inductor's and graphopt's caches may hold earlier compiles)"
    batches = args.batches
    backends = tuple(args.backends.split(","))
    names = args.models.split(",")
    rows = {(name, batch, way): Row(name, batch, way) for name in names for batch in batches for way in WAYS}
    for round_ in range(args.rounds):  # rounds over everything: slow drifts of the machine's load fall on all ways
        for name in names:
            for batch in batches:
                ways = WAYS[round_ % len(WAYS):] + WAYS[:round_ % len(WAYS)]
                for way in ways:
                    rows[name, batch, way].add_round(
                        compare_in_child(name, batch, way, args.repeats, backends, args.frozen_guards, args.anchored))
                done = [rows[name, batch, way] for way in WAYS]
                print(f"round {round_ + 1}:", *detail_table(done)[2:], sep="\n", flush=True)
    rows = list(rows.values())
    guards = f"graphopt.{GUARD_FILTERS[args.frozen_guards].__name__}" if args.frozen_guards else "all (default)"
    harness = ("each way in a process of its own (inductor, O3 and export timed in turns with eager and the "
               "onnxruntime export)" if args.anchored else "each way alone in a process of its own")
    header = ["# Lowering (O3) against eager, inductor and onnxruntime", "",
              f"{machine()}, {THREADS} threads, torch {torch.__version__}, onnxruntime {ort.__version__}; "
              f"graphopt candidates: {', '.join(backends)}; {harness}, {args.rounds} "
              f"processes (rounds) of {args.repeats} samples of ≥ {SAMPLE_MS:g} ms each; caches: {caches} "
              f"(prepare s: the first round's); "
              f"Dynamo guards: {guards}.", ""]
    same = ["Same-process ratios (--anchored):", "", *same_process_table(rows, batches), ""] if args.anchored else []
    text = "\n".join([*header, *summary_table(rows, batches), "", *same, *detail_table(rows), ""])
    print(text)
    guards_suffix = {None: "", "modules": "_frozen_guards", "model": "_frozen_model_guards"}[args.frozen_guards]
    suffix = "_tuned_malloc" * args.tuned_malloc + guards_suffix + "_anchored" * args.anchored
    results = RESULTS.with_name(f"{RESULTS.stem}{suffix}.md")
    results.parent.mkdir(exist_ok=True)
    results.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
