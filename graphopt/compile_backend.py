"""The torch.compile backend: ``torch.compile(model, backend="graphopt", options={...})``.

Dynamo hands each captured graph to :func:`graphopt_backend`. AOTAutograd lowers
it to core ATen and, when gradients are needed, splits it into a forward and a
backward graph. Each ATen graph goes through the IR: ``from_fx`` -> the pass
pipeline (``O3`` unless ``level`` says otherwise: rewrites, then each region lowered
to the fastest backend within a compile budget) -> ``to_torch``. Each compiled
graph logs one INFO line with its compile time and where its regions went.

Bad options are user errors and raise ``ValueError``. A failure of graphopt on a
graph (conversion, a pass, emission) is logged as a warning and that graph runs
as AOTAutograd produced it, so compilation never fails because of graphopt
(unless ``fallback=False``).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import operator
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import _torch_private
from .errors import InvalidOptionError
from .pass_manager import DumpAfter, Instrument, PassManager, TimePasses, level_then_passes, pipeline

logger = logging.getLogger(__name__)

DEFAULT_LEVEL = "O3"
"""Lowering, not only rewrites: on 11 CPU zoo models at batch 1 with cold caches, O2 (rewrites, then torch's
kernels) ran at 3.4x the time of the fastest of eager, inductor and onnxruntime, this default at 0.49x
inductor's time (1.4x the fastest other, onnxruntime on the small transformers) after a first call of 15 s
(median; inductor's: 73 s) (``benchmarks/results/default_compile.md``). ``{"level": "O2"}`` keeps graphs on
torch's own kernels."""


@dataclass(frozen=True)
class BackendOptions:
    """The ``options`` of ``torch.compile(..., backend="graphopt", options=...)``.

    ``level``: the pipeline to run (default ``O3``: its ``lower_regions`` spends at most
    ``compile_budget_s``, 20 s, per graph compiling and timing candidates; ``O2`` runs the
    rewrites only, on torch's kernels). ``passes``: extra pass names run after it.
    ``freeze``: an inference graph takes the module's parameters and buffers as
    constants, read on its first call (as inductor's ``freezing`` does), so passes
    fold them (batch norm into conv) and lowered kernels own them; recompile after
    changing the weights in place.
    ``pass_options``: ``{pass name: {option: value}}``. ``verify``: check the IR
    after every pass (default: on under ``GRAPHOPT_DEBUG=1``). ``fallback``: run a
    graph unoptimized when graphopt fails on it, instead of raising. ``report``:
    a path where a JSON report of every compiled graph is written.
    ``dump_after``: pass names after which each graph is printed to stderr, or written
    under ``dump_dir``/<graph label>/, which also receives the graph before and after a
    pass that fails verification. ``time_passes``: print each graph's pass times.
    """

    level: str = DEFAULT_LEVEL
    passes: tuple[str, ...] = ()
    pass_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    verify: bool | None = None
    fallback: bool = True
    report: Path | None = None
    freeze: bool = True
    dump_after: tuple[str, ...] = ()
    time_passes: bool = False
    dump_dir: Path | None = None

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        """Check the user's options and build them; every problem is an ``InvalidOptionError``."""
        if options is not None and not isinstance(options, Mapping):
            raise InvalidOptionError(f"graphopt's options are a dict, e.g. {{'level': 'O2'}}; "
                                     f"got {type(options).__name__}")
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise InvalidOptionError(f"unknown graphopt option {', '.join(map(repr, unknown))}; "
                                     f"valid options: {', '.join(valid)}")
        parsed = cls(
            level=_expect(options, "level", str, DEFAULT_LEVEL),
            passes=tuple(_expect_names(options, "passes")),
            pass_options=_expect_pass_options(options.get("pass_options", {})),
            verify=_expect(options, "verify", bool, None),
            fallback=_expect(options, "fallback", bool, True),
            report=_report_path(options.get("report")),
            freeze=_expect(options, "freeze", bool, True),
            dump_after=tuple(_expect_names(options, "dump_after")),
            time_passes=_expect(options, "time_passes", bool, False),
            dump_dir=_dump_dir(options.get("dump_dir")),
        )
        parsed.pass_manager()  # resolves level, pass and option names
        return parsed

    def pass_manager(self, label: str = "graph") -> PassManager:
        """The manager for the graph ``label`` (its dumps go to a folder of that name)."""
        folder = None if self.dump_dir is None else self.dump_dir / label
        watching: list[Instrument] = []
        if self.dump_after:
            watching.append(DumpAfter(self.dump_after, folder, label=label))
        if self.time_passes:
            watching.append(TimePasses(label=label))
        try:
            pipeline(self.level)  # PassManager would take an unknown level for a pass name
            return PassManager(level_then_passes(self.level, self.passes), options=dict(self.pass_options),
                               verify=self.verify, instruments=watching, dump_dir=folder)
        except (KeyError, ValueError) as e:  # unknown names; option values a pass rejects
            raise InvalidOptionError(e.args[0]) from None


def _expect(options: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    value = options.get(name, default)
    if value is not default and not isinstance(value, kind):
        raise InvalidOptionError(f"graphopt option {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _expect_names(options: Mapping[str, Any], name: str) -> list[str]:
    passes = options.get(name, ())
    if isinstance(passes, str) or not isinstance(passes, Sequence) or not all(isinstance(p, str) for p in passes):
        raise InvalidOptionError(f"graphopt option {name!r} must be a list of pass names, got {passes!r}")
    return list(passes)


def _expect_pass_options(pass_options: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(pass_options, Mapping) or not all(isinstance(v, Mapping) for v in pass_options.values()):
        raise InvalidOptionError("graphopt option 'pass_options' must map pass names to {option: value} dicts, "
                                 f"got {pass_options!r}")
    return {name: dict(values) for name, values in pass_options.items()}


def _report_path(report: Any) -> Path | None:
    if report is None:
        return None
    if not isinstance(report, (str, os.PathLike)):
        raise InvalidOptionError(f"graphopt option 'report' must be a path, got {type(report).__name__}")
    path = Path(report).resolve()
    if not path.parent.is_dir():
        raise InvalidOptionError(f"graphopt option 'report': directory {path.parent} does not exist")
    return path


def _dump_dir(folder: Any) -> Path | None:
    if folder is None:
        return None
    if not isinstance(folder, (str, os.PathLike)):
        raise InvalidOptionError(f"graphopt option 'dump_dir' must be a path, got {type(folder).__name__}")
    path = Path(folder).resolve()
    if path.exists() and not path.is_dir():
        raise InvalidOptionError(f"graphopt option 'dump_dir': {path} exists and is not a directory")
    return path


def graphopt_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                     options: Mapping[str, Any] | None = None, mode: str | None = None) -> Callable[..., Any]:
    """A ``torch.compile`` backend; registered under the name ``graphopt`` by an entry point.

    torch.compile hands the options over at the first call only; bad ones raise graphopt's
    ``InvalidOptionError`` (a ``ValueError``) there, not wrapped in ``BackendCompilerFailed``.
    """
    try:
        if mode is not None:
            raise InvalidOptionError(f"graphopt has no torch.compile modes (got mode={mode!r}); "
                                     f"pick a pipeline with options={{'level': ...}}")
        parsed = BackendOptions.parse(options)
    except InvalidOptionError as e:
        raise _torch_private.compile_option_error(e) from None
    compiler = GraphCompiler(parsed)
    return _torch_private.aot_compile(gm, example_inputs, fw_compiler=compiler.for_kind("forward"),
                                      bw_compiler=compiler.for_kind("backward"),
                                      inference_compiler=compiler.for_kind("inference"))


class GraphCompiler:
    """Compiles the ATen graphs AOTAutograd produces for one Dynamo graph."""

    _ids = itertools.count()

    def __init__(self, options: BackendOptions):
        self.options = options
        self.id = next(self._ids)

    def for_kind(self, kind: str) -> Callable[[torch.fx.GraphModule, Sequence[Any]], Callable[..., Any]]:
        def compile_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
            frozen = _torch_private.frozen_input_indices() if kind == "inference" and self.options.freeze else []
            if frozen:
                return _torch_private.boxed(_FrozenInferenceGraph(self, gm, example_inputs, frozen))
            with _torch_private.outside_fake_mode():
                return _torch_private.boxed(self.compile(gm, example_inputs, kind))

        return compile_graph

    def compile(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], kind: str,
                constants: dict[int, torch.Tensor] | None = None) -> Callable[..., Any]:
        """The optimized module for ``gm``, or ``gm`` itself when graphopt fails on it. The callable
        takes all of ``gm``'s inputs; those in ``constants`` (by position) are compiled in and ignored."""
        label = f"graph{self.id}.{kind}"
        try:
            module, entry = self._optimize(gm, example_inputs, constants or {}, label)
        except Exception as exc:
            if not self.options.fallback:
                raise
            logger.warning("graphopt could not optimize %s (%s: %s); running it unoptimized",
                           label, type(exc).__name__, exc)
            module, entry = gm, {"fallback": f"{type(exc).__name__}: {exc}"}
        else:
            logger.info("graphopt: compiled %s in %s", label, compile_summary(entry),
                        extra={"lowering": entry["lowering"]})
        entry = {"graph": label, **entry}
        if self.options.report is not None:
            write_report_entry(self.options.report, entry)
        if module is gm:
            return module
        return _CheckedOnFirstCall(gm, module, label, entry, self.options,
                                   compare=kind == "inference" and _torch_private.reruns_alike(gm))

    def _optimize(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                  constants: dict[int, torch.Tensor], label: str) -> tuple[Callable[..., Any], dict]:
        from .frontends.torch import from_fx

        start = time.perf_counter()
        graph = from_fx(gm, example_inputs, constants)
        nodes_before = len(graph)
        manager = self.options.pass_manager(label)
        graph = manager.run(graph).graph
        module = graph.to_torch().forward  # the bound method: no nn.Module call dispatch per run
        if constants:
            module = _without_inputs(module, set(constants), len(example_inputs))
        entry = {"compile_seconds": round(time.perf_counter() - start, 3),
                 "frozen_inputs": len(constants), "nodes_before": nodes_before, "nodes_after": len(graph), "passes_fired": manager.report.fired,
                 "passes": [dataclasses.asdict(r) for r in manager.report.records],
                 "lowering": [{"region": d.region, "hash": d.hash, "nodes": d.nodes, "chosen": d.chosen,
                               "cost_model": d.cost_model, "seconds": round(d.seconds, 3), "note": d.note}
                              for d in graph.meta.get("lowering", [])]}
        return module, entry


class _FrozenInferenceGraph:
    """An inference graph compiled when first called, with its frozen inputs' real values as constants
    (at compile time AOTAutograd hands over fake tensors only).

    Dynamo reuses a graph for every instance of a module's class whose guards pass, handing over that
    instance's parameters; a graph with another instance's weights compiled in would compute wrong
    outputs. So each call checks that the frozen inputs are the very tensors compiled in (identity,
    as Dynamo's ``ID_MATCH`` guards do) and compiles once more for a new set, keeping the last few.
    """

    max_variants = 8
    """Sets of frozen tensors kept compiled per graph (Dynamo's default recompile limit)."""

    def __init__(self, compiler: GraphCompiler, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 frozen: list[int]):
        self.compiler, self.gm, self.example_inputs, self.frozen = compiler, gm, example_inputs, frozen
        self.variants: dict[tuple[int, ...], tuple[tuple[Any, ...], Callable[..., Any]]] = {}
        self.tensors: tuple[Any, ...] | None = None  # those of the variant in use, and its callable
        self.run: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.tensors is None or not all(map(operator.is_, map(args.__getitem__, self.frozen), self.tensors)):
            self.tensors, self.run = self._variant(args)
        return self.run(*args)

    def _variant(self, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], Callable[..., Any]]:
        tensors = tuple(args[i] for i in self.frozen)
        key = tuple(map(id, tensors))  # the variant holds its tensors, so their ids stay theirs
        if key not in self.variants:
            if len(self.variants) == self.max_variants:
                del self.variants[next(iter(self.variants))]
            constants = {i: args[i].detach() for i in self.frozen if isinstance(args[i], torch.Tensor)}
            with _torch_private.outside_dispatch_modes():
                self.variants[key] = tensors, self.compiler.compile(self.gm, self.example_inputs, "inference",
                                                                    constants)
        return self.variants[key]


class _CheckedOnFirstCall:
    """graphopt's optimized module, trusted only after its first call ran it: a failure of graphopt's
    own output must not reach the user as a crash where eager would have run.

    The first call runs the optimized module; when it raises, or (``compare``: inference graphs that
    neither mutate their inputs nor draw random numbers, so a second run computes the same) its outputs
    differ from the unoptimized graph's beyond float rounding, a warning says so and the unoptimized graph
    runs from then on (``fallback=False`` raises instead). The report entry records the check.
    """

    def __init__(self, gm: torch.fx.GraphModule, module: Callable[..., Any], label: str, entry: dict[str, Any],
                 options: BackendOptions, compare: bool):
        self.gm, self.module, self.label, self.entry, self.options = gm, module, label, entry, options
        self.compare = compare
        self.run: Callable[..., Any] = self._first_call

    def __call__(self, *args: Any) -> Any:
        return self.run(*args)

    def _first_call(self, *args: Any) -> Any:
        from .testing import max_rel_error

        try:
            got = self.module(*args)
        except Exception as exc:
            return self._distrust(f"it raised {type(exc).__name__}: {exc}", exc, args)
        if not self.compare:
            return self._trust("first call ran (outputs not compared: the graph trains, mutates its inputs "
                               "or draws random numbers)", got)
        expected = self.gm(*args)
        try:
            error, tolerance = max_rel_error(expected, got), _check_tolerance(expected)
        except AssertionError as exc:  # output count or shapes differ
            return self._distrust(f"its outputs differ from the unoptimized graph's: {exc}", None, args, expected)
        if not error <= tolerance:
            return self._distrust(f"its outputs differ from the unoptimized graph's by {error:.3g} (relative to "
                                  f"the largest output, tolerance {tolerance:g})", None, args, expected)
        return self._trust(f"first call matched the unoptimized graph (max relative error {error:.2g})", got)

    def _trust(self, note: str, got: Any) -> Any:
        self.run = self.module
        self._record("checked", note)
        return got

    def _distrust(self, problem: str, exc: Exception | None, args: tuple[Any, ...], expected: Any = None) -> Any:
        message = f"graphopt's optimized {self.label} failed its check on the first call: {problem}"
        self._record("fallback", message)
        if not self.options.fallback:
            raise RuntimeError(message) from exc
        logger.warning("%s; running it unoptimized", message)
        self.run = self.gm
        return self.gm(*args) if expected is None else expected

    def _record(self, key: str, note: str) -> None:
        self.entry[key] = note
        if self.options.report is not None:
            write_report_entry(self.options.report)


def _check_tolerance(outputs: Any) -> float:
    """How far an optimized graph's outputs may stray from the unoptimized graph's (relative to the largest):
    reordered float arithmetic, not a wrong graph."""
    from .testing import flatten_outputs

    half = any(t.dtype in (torch.float16, torch.bfloat16) for t in flatten_outputs(outputs))
    return 3e-2 if half else 1e-3


def compile_summary(entry: dict[str, Any]) -> str:
    """A report entry in a few words: ``"12.3 s: 3 regions -> onnxruntime x2, torch x1"``, and how many regions
    the compile budget left unmeasured."""
    decisions = entry["lowering"]
    chosen = collections.Counter(d["chosen"] or "eager" for d in decisions)
    text = f"{entry['compile_seconds']:.1f} s"
    if decisions:
        text += f": {len(decisions)} region{'s' * (len(decisions) != 1)} -> " + ", ".join(
            f"{backend} x{n}" for backend, n in chosen.most_common())
    if unmeasured := sum("compile budget" in d["note"] for d in decisions):
        text += f" ({unmeasured} chosen unmeasured: compile budget spent)"
    return text


def _without_inputs(module: Callable[..., Any], dropped: set[int], arity: int) -> Callable[..., Any]:
    """``module`` called with all of the graph's ``arity`` inputs, skipping those compiled in as constants."""
    kept = [k for k in range(arity) if k not in dropped]

    def run(*args: Any) -> Any:
        return module(*[args[k] for k in kept])

    return run


_report_entries: dict[Path, list[dict[str, Any]]] = {}
"""Entries written so far to each report path by this process: one torch.compile run
can compile several graphs (graph breaks; forward and backward), and its report lists them all."""


def write_report_entry(path: Path, entry: dict[str, Any] | None = None) -> None:
    """Add ``entry`` to the report at ``path`` and write it; without one, write it again (an entry changed)."""
    entries = _report_entries.setdefault(path, [])
    if entry is not None:
        entries.append(entry)
    path.write_text(json.dumps({"graphs": entries}, indent=2))
