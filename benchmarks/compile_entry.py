"""What a call through ``torch.compile`` costs graphopt at O3 beyond its kernels (CPU, batch 1 and 8).

graphopt-O3 through ``torch.compile`` and graphopt's Python API (``graphopt.capture`` → ``optimize(...,
"O3")`` → ``to_torch()``, "export") run the same compiled kernels; a ``torch.compile`` call adds
Dynamo's entry (its frame hook, guards and the fetch of every parameter as a graph input), then
AOTAutograd's runtime wrappers and graphopt's check that the frozen parameters are those compiled in.
To split the difference, each process builds the export module and one ``torch.compile`` way:

- ``graphopt-O3``: ``torch.compile(model, backend="graphopt", options={"level": "O3"})``;
- ``dynamo-floor``: ``torch.compile`` with a backend whose compiled function calls the export module
  on the first inputs, ignoring what Dynamo hands it: Dynamo's entry and graphopt's kernels, nothing
  between them, the least any ``torch.compile`` backend running these kernels could take;

and times it in turns (``report.time_in_turns``) with the export module and onnxruntime's own export
(the way ``lowering_compare.py`` calls onnxruntime). Both ``torch.compile`` ways use
``graphopt.frozen_model_guards`` and the same lowering options as ``lowering_compare.py``. O3 − export is
the whole entry, floor − export Dynamo's share of it (µs, each from one process); the rest is
AOTAutograd's and graphopt's. Runs under ``report.TUNED_MALLOC``; every way and model gets ``--rounds``
processes. Prints the table and writes ``benchmarks/results/compile_entry.md``.

    python benchmarks/compile_entry.py [--models a,b] [--batches 1,8] [--repeats 10] [--rounds 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

import graphopt
from graphopt.models import MODEL_CASES
from graphopt.testing import flatten_outputs, max_rel_error
from lowering_compare import MODELS, SAMPLE_MS, THREADS, WARMUP, batched, exported_runner, onnxruntime_runner
from report import batch_sizes, failure_cell, geomean, machine, restart_with_tuned_malloc, run_child, time_in_turns

RESULTS = Path(__file__).resolve().parent / "results" / "compile_entry.md"
WAYS = ("graphopt-O3", "dynamo-floor")
BACKENDS = ("onnxruntime", "inductor", "torch")


@dataclass
class Turns:
    """One process's medians (ms) of its ``torch.compile`` way, the export module and onnxruntime's export."""

    model: str
    batch: int
    way: str
    way_ms: float | None = None
    export_ms: float | None = None
    onnxruntime_ms: float | None = None
    error: str = ""


def measure(name: str, batch: int, way: str, repeats: int) -> Turns:
    torch.set_num_threads(THREADS)
    model, inputs = MODEL_CASES[name].build()
    inputs = batched(inputs, batch)
    turns = Turns(name, batch, way)
    lowering = {"backends": BACKENDS, "source": name}
    guards = {"guard_filter_fn": graphopt.frozen_model_guards}
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        reference = flatten_outputs(model(*inputs))
        try:
            export = exported_runner(model, inputs, lowering, Path(tmp) / "report.json")
            if way == "graphopt-O3":
                compiled = torch.compile(model, backend="graphopt", options={
                    "level": "O3", "pass_options": {"lower_regions": lowering}, "fallback": False, **guards})
            else:
                compiled = torch.compile(model, backend=_calling(export, inputs), options=guards)
            error = max_rel_error(reference, flatten_outputs(compiled(*inputs)))
            if error > 1e-3:
                raise AssertionError(f"max relative error {error:.1e} against eager")
        except Exception as exc:
            turns.error = failure_cell(exc)
            return turns
        runs = [compiled, export]
        try:
            runs.append(onnxruntime_runner(model, inputs))
        except Exception:  # the exporter fails on this model (GPT-2): no onnxruntime column
            pass
        samples = time_in_turns([functools.partial(f, *inputs) for f in runs], repeats, WARMUP, SAMPLE_MS)
    medians = [statistics.median(s) for s in samples]
    turns.way_ms, turns.export_ms = medians[:2]
    turns.onnxruntime_ms = medians[2] if len(medians) > 2 else None
    return turns


def _calling(module: Callable[..., Any], inputs: tuple) -> Callable[..., Callable[..., Any]]:
    """A ``torch.compile`` backend whose compiled function runs ``module(*inputs)`` whatever it is handed,
    returning its outputs flat, as the Dynamo graph returns them (checked on the first call)."""
    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        out = module(*inputs)
        expected = [tuple(t.shape) for t in flatten_outputs(gm(*example_inputs))]
        got = [tuple(t.shape) for t in flatten_outputs(out)]
        if got != expected:
            raise ValueError(f"the Dynamo graph returns {expected}, the export module {got}")
        if isinstance(out, torch.Tensor):
            return lambda *_: (module(*inputs),)
        if isinstance(out, tuple) and all(isinstance(t, torch.Tensor) for t in out):
            return lambda *_: module(*inputs)
        return lambda *_: tuple(flatten_outputs(module(*inputs)))

    return backend


def measure_in_child(name: str, batch: int, way: str, repeats: int) -> Turns:
    result = run_child(__file__, {"name": name, "batch": batch, "way": way, "repeats": repeats})
    return Turns(**result) if isinstance(result, dict) else Turns(name, batch, way, error=result)


@dataclass
class Summary:
    """A model and batch size over all rounds: medians over processes of each quantity."""

    model: str
    batch: int
    processes: dict[str, list[Turns]] = field(default_factory=dict)

    def over(self, way: str, quantity: Callable[[Turns], float | None]) -> float | None:
        values = [v for t in self.processes.get(way, []) if not t.error and (v := quantity(t)) is not None]
        return statistics.median(values) if values else None

    def extra_us(self, way: str) -> float | None:
        """The way's time beyond the export module's, in the same process (µs)."""
        return self.over(way, lambda t: (t.way_ms - t.export_ms) * 1e3)

    def errors(self) -> str:
        return "; ".join(sorted({f"{t.way}: {t.error}" for ts in self.processes.values() for t in ts if t.error}))


def _per_onnxruntime(ms: Callable[[Turns], float]) -> Callable[[Turns], float | None]:
    """A process's ``ms`` over its onnxruntime export's (None where the exporter failed)."""
    return lambda t: None if t.onnxruntime_ms is None else ms(t) / t.onnxruntime_ms


def table(summaries: list[Summary]) -> list[str]:
    lines = ["| model | batch | export ms | O3 ms | floor ms | O3 − export µs | floor − export µs "
             "| O3 − floor µs | export ÷ onnxruntime | floor ÷ onnxruntime | O3 ÷ onnxruntime |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios: dict[tuple[int, str], list[float]] = {}
    for s in summaries:
        if s.errors():
            lines.append(f"| {s.model} | {s.batch} | failed: {s.errors()} | | | | | | | | |")
            continue
        o3, floor = s.extra_us("graphopt-O3"), s.extra_us("dynamo-floor")
        cells = [s.over("graphopt-O3", lambda t: t.export_ms), s.over("graphopt-O3", lambda t: t.way_ms),
                 s.over("dynamo-floor", lambda t: t.way_ms), o3, floor, o3 - floor]
        against = {"export": s.over("graphopt-O3", _per_onnxruntime(lambda t: t.export_ms)),
                   "dynamo-floor": s.over("dynamo-floor", _per_onnxruntime(lambda t: t.way_ms)),
                   "graphopt-O3": s.over("graphopt-O3", _per_onnxruntime(lambda t: t.way_ms))}
        for way, r in against.items():
            if r is not None:
                ratios.setdefault((s.batch, way), []).append(r)
        lines.append(f"| {s.model} | {s.batch} | {cells[0]:.3f} | {cells[1]:.3f} | {cells[2]:.3f} | {cells[3]:.0f} "
                     f"| {cells[4]:.0f} | {cells[5]:.0f} | "
                     + " | ".join("n/a" if r is None else f"{r:.3f}" for r in against.values()) + " |")
    for batch in sorted({s.batch for s in summaries}):
        cells = [ratios.get((batch, way), []) for way in ("export", "dynamo-floor", "graphopt-O3")]
        lines.append(f"| geomean ({len(cells[0])} models) | {batch} | | | | | | | "
                     + " | ".join(f"{geomean(c):.3f}" for c in cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    parser.add_argument("--batches", type=batch_sizes, default=[1, 8], help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=10, help="samples per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per way, model and batch")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1:
        parser.error("--repeats and --rounds must be at least 1")
    unknown = sorted(set(args.models.split(",")) - set(MODEL_CASES))
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; zoo names: {', '.join(sorted(MODEL_CASES))}")
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(dataclasses.asdict(measure(spec["name"], spec["batch"], spec["way"], spec["repeats"]))))
        return 0
    restart_with_tuned_malloc()
    batches = args.batches
    summaries = [Summary(name, batch) for name in args.models.split(",") for batch in batches]
    for round_ in range(args.rounds):
        for s in summaries:
            for way in WAYS[round_ % 2:] + WAYS[:round_ % 2]:
                s.processes.setdefault(way, []).append(measure_in_child(s.model, s.batch, way, args.repeats))
            print(f"round {round_ + 1}:", table([s])[2], flush=True)
    header = ["# What torch.compile's entry costs graphopt-O3 (CPU)", "",
              f"{machine()}, {THREADS} threads, torch {torch.__version__}, onnxruntime {ort.__version__}; "
              f"graphopt candidates: {', '.join(BACKENDS)}; Dynamo guards: graphopt.frozen_model_guards; "
              f"{args.rounds} processes per way, each timing its way, the export module and onnxruntime's "
              f"export in turns ({args.repeats} samples of ≥ {SAMPLE_MS:g} ms each); medians over processes.", "",
              "export: graphopt's O3 module called directly; floor: torch.compile whose backend calls that "
              "module; O3: torch.compile(backend=\"graphopt\"). µs: beyond the export module in the same process.",
              ""]
    text = "\n".join([*header, *table(summaries), ""])
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
