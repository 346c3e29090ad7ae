"""Passes, named pipelines, and the manager that runs them with instrumentation.

One pass contract (after onnx-ir's ``PassBase``): a pass is a dataclass whose
fields are its typed options, with a class-level ``name`` and ``kind``, and a
``call(graph) -> PassResult``. A pass is **exact** (outputs preserved within
float tolerance) or **lossy** (it names the quality metric it trades); lossy
passes are never part of a named pipeline, only run when asked for by name.

Ordering constraints are declared on the passes: each ``requires`` graph
properties that another pass ``ensures``, and a manager refuses a pass list
that runs a pass before the one it depends on.

Pipelines are plain named lists (``O0``, ``O1``, ...). The manager times each
pass and counts nodes before and after. In verify mode (``GRAPHOPT_DEBUG=1``,
the tests) it checks the IR after every pass and holds each pass to its
``modified`` claim both ways, constant data included; a pass that breaks its
contract is named, with the graph before and after it dumped to ``dump_dir``.
Instruments (after TVM's ``PassInstrument``) hook in around every pass:
``DumpAfter`` prints the graph after named passes, ``TimePasses`` a timing table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TextIO

import torch

from .errors import InvalidOptionError
from .ir import Graph, Value
from .ir.verifier import VerificationError

logger = logging.getLogger(__name__)


class PassKind(enum.Enum):
    EXACT = "exact"
    LOSSY = "lossy"


@dataclass
class PassResult:
    graph: Graph
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class Pass:
    """Base class. Subclasses are dataclasses; their fields are the pass's options."""

    name: ClassVar[str] = ""
    kind: ClassVar[PassKind] = PassKind.EXACT
    quality_metric: ClassVar[str | None] = None
    requires: ClassVar[tuple[str, ...]] = ()
    """Graph properties the pass relies on: a manager that also runs a pass ensuring one must run it first.
    With no such pass in the list, the property is the caller's to vouch for (a pass run on its own)."""
    ensures: ClassVar[tuple[str, ...]] = ()
    """Graph properties that hold once the pass has run."""
    before_level: ClassVar[bool] = False
    """Named after a level (``graphopt.optimize(g, "O2", passes=[...])``, the torch.compile backend's
    ``passes``), the pass still runs before the level's rewrites, on the graph as captured and cleaned up:
    it reads structure those rewrites would blur (step caching finds repeated blocks, which fusion makes
    differ)."""
    analysis: ClassVar[bool] = False
    """The pass annotates and never rewrites: what it ensures describes the graph as it was, so any later
    rewriting pass makes it stale. It reports ``modified=False``: annotations are not changes."""

    def call(self, graph: Graph) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__} does not implement call()")

    def __call__(self, graph: Graph) -> PassResult:
        return self.call(graph)

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


PASSES: dict[str, type[Pass]] = {}
PIPELINES: dict[str, list[str]] = {"O0": []}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name to pipelines, the API and the CLI."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    if cls.kind is PassKind.LOSSY and not cls.quality_metric:
        raise ValueError(f"lossy pass {cls.name} must declare its quality_metric")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"a pass named {cls.name!r} is already registered ({PASSES[cls.name].__name__})")
    PASSES[cls.name] = cls
    return cls


def level_then_passes(level: str, passes: Sequence[str | Pass]) -> list[str | Pass]:
    """``[level, *passes]``, but passes that run ``before_level`` go first, after the level's cleanup (``O1``)
    when it has one: cleanup rewrites every block alike, so it blurs no structure, and what it removes (no-ops,
    the slices a strided write leaves) would otherwise stay inside the regions such a pass wraps, which the
    level's passes do not enter."""
    def first(p: str | Pass) -> bool:
        cls = p if isinstance(p, Pass) else PASSES.get(p)
        return bool(cls is not None and cls.before_level)
    early, late = [p for p in passes if first(p)], [p for p in passes if not first(p)]
    if not early or level == "O0":
        return [*early, level, *late]
    return ["O1", *early, *([] if level == "O1" else [level]), *late]


def register_pipeline(level: str, pass_names: Sequence[str]) -> None:
    """Name a pipeline. Lossy passes are refused: they must be asked for explicitly; so is a wrong order."""
    classes = []
    for name in pass_names:
        cls = PASSES.get(name)  # registered already: looking up must not load the built-ins mid-import
        if cls is None:
            raise KeyError(f"pipeline {level} names pass {name!r}, which is not registered")
        if cls.kind is PassKind.LOSSY:
            raise ValueError(f"pipeline {level} cannot hold lossy pass {name}; ask for it by name instead")
        classes.append(cls)
    check_order(classes)
    PIPELINES[level] = list(pass_names)


def check_order(passes: Sequence[Pass | type[Pass]]) -> None:
    """Refuse a pass list that runs a pass before one it ``requires``, or after that one's annotation went stale.

    The list is checked as written: a fixed-point manager repeats it whole, so every round runs in this order.
    """
    ensured_by = {prop: p.name for p in passes for prop in p.ensures}
    holds: set[str] = set()
    annotations: set[str] = set()  # held properties an analysis ensured: the next rewrite outdates them
    outdated_by: dict[str, str] = {}
    for p in passes:
        for prop in p.requires:
            if prop in outdated_by:
                raise InvalidOptionError(f"pass {p.name} requires {prop}, but {outdated_by[prop]} rewrites the "
                                         f"graph after {ensured_by[prop]} annotates it: run {ensured_by[prop]} "
                                         f"after {outdated_by[prop]}")
            if prop in ensured_by and prop not in holds:
                raise InvalidOptionError(f"pass {p.name} requires {prop}, which {ensured_by[prop]} ensures: "
                                         f"run {ensured_by[prop]} before {p.name}")
        if not p.analysis:
            outdated_by.update(dict.fromkeys(annotations, p.name))
            holds -= annotations
            annotations = set()
        holds.update(p.ensures)
        for prop in p.ensures:
            outdated_by.pop(prop, None)
        if p.analysis:
            annotations.update(p.ensures)


def get_pass(name: str) -> type[Pass]:
    _load_builtin_passes()
    if not isinstance(name, str) or name not in PASSES:
        raise InvalidOptionError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def pipeline(level: str) -> list[str]:
    _load_builtin_passes()
    if not isinstance(level, str) or level not in PIPELINES:
        levels = [name for name in PIPELINES if ":" not in name]  # ``target:onnxruntime`` is run by --target
        raise InvalidOptionError(f"unknown level {level!r}; known levels: {', '.join(levels)}")
    return list(PIPELINES[level])


def _load_builtin_passes() -> None:
    import graphopt.backends.lower  # noqa: F401  (registers lower_regions and O3)
    import graphopt.passes  # noqa: F401  (registers the built-in passes and pipelines)


# --------------------------------------------------------------------- running
@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class Report:
    records: list[PassRecord] = field(default_factory=list)

    @property
    def fired(self) -> list[str]:
        """Names of the passes that changed the graph, each once, in first-fired order."""
        return list(dict.fromkeys(r.name for r in self.records if r.modified))

    def to_json(self) -> str:
        return json.dumps([dataclasses.asdict(r) for r in self.records], indent=2)

    def timing_table(self) -> str:
        """Time per pass, all its runs together, slowest first."""
        runs: dict[str, list[float]] = {}
        for r in self.records:
            runs.setdefault(r.name, []).append(r.seconds)
        total = sum(r.seconds for r in self.records)
        rows = [f"{'pass':<28} {'runs':>4} {'ms':>9} {'share':>6}"]
        for name, seconds in sorted(runs.items(), key=lambda item: -sum(item[1])):
            share = sum(seconds) / total if total else 0.0
            rows.append(f"{name:<28} {len(seconds):>4} {sum(seconds) * 1e3:9.2f} {share:6.1%}")
        rows.append(f"{'total':<28} {len(self.records):>4} {total * 1e3:9.2f}")
        return "\n".join(rows)

    def table(self) -> str:
        rows = [f"{'pass':<28} {'ms':>8} {'nodes':>13} changed"]
        for r in self.records:
            rows.append(f"{r.name:<28} {r.seconds * 1e3:8.2f} {r.nodes_before:>6}->{r.nodes_after:<6} "
                        f"{'yes' if r.modified else 'no'}")
        return "\n".join(rows)


def debug_enabled() -> bool:
    return os.environ.get("GRAPHOPT_DEBUG", "") not in ("", "0")


class PassContractError(AssertionError):
    """A pass left an invalid graph or misreported ``modified``: a bug in that pass, not a user error."""


@dataclass(frozen=True, eq=False)
class Fingerprint:
    """What a pass's ``modified`` claim is checked against, cheaply.

    The structural hash ignores constant data on purpose (lowering caches share
    kernels across weights), so each constant adds its name, value object, tensor
    and version counter: an in-place write bumps ``Tensor._version``, a
    replacement is another object. The objects are held, not their ids, so a
    freed tensor's address reused by its replacement cannot pass for it.
    Inference tensors keep no version counter: only their replacement shows.
    """

    structure: str
    constants: tuple[tuple[str, Value, torch.Tensor, int | None], ...]

    @classmethod
    def of(cls, graph: Graph) -> Fingerprint:
        return cls(graph.structural_hash(), tuple(
            (name, v, v.data, None if v.data.is_inference() else v.data._version)
            for name, v in graph.constants.items()))

    def differs(self, other: Fingerprint) -> str | None:
        """What changed from ``self`` to ``other``, in a few words; None when nothing did."""
        if self.structure != other.structure:
            return "the graph structure"
        if [c[0] for c in self.constants] != [c[0] for c in other.constants]:
            return "the set of constants"
        for (name, v, data, version), (_, v2, data2, version2) in zip(self.constants, other.constants):
            if v is not v2 or data is not data2:
                return f"constant %{name} (replaced)"
            if version != version2:
                return f"constant %{name} (written in place)"
        return None


class Instrument:
    """Hooks a manager calls around every pass it runs, after TVM's ``PassInstrument``.

    ``step`` counts the passes run so far (the pass's index in the report), across fixed-point rounds.
    """

    def check(self, passes: Sequence[Pass]) -> None:
        """Refuse, as an ``InvalidOptionError``, a setting that cannot apply to the passes a manager runs."""

    def before_pass(self, step: int, p: Pass, graph: Graph) -> None:
        """Called just before ``p`` runs on ``graph``."""

    def after_pass(self, step: int, p: Pass, graph: Graph, record: PassRecord) -> None:
        """Called once ``p`` has run (and been verified); ``graph`` is its result."""

    def after_run(self, report: Report) -> None:
        """Called when the manager's run is done."""


class DumpAfter(Instrument):
    """Print the graph after every run of the named passes (to stderr), or write it to ``folder``,
    one file per run: ``{step:03d}-{pass}.txt``. ``label`` names the graph in what is printed."""

    def __init__(self, passes: Iterable[str], folder: str | os.PathLike | None = None, stream: TextIO | None = None,
                 label: str = "graph"):
        if isinstance(passes, str) or not all(isinstance(name, str) for name in passes):
            raise InvalidOptionError(f"dump_after must be a list of pass names, got {passes!r}")
        self.passes = list(passes)
        self.folder = None if folder is None else Path(folder)
        self.stream, self.label = stream, label

    def check(self, passes: Sequence[Pass]) -> None:
        run = [p.name for p in passes]
        missing = [name for name in self.passes if name not in run]
        if missing:
            raise InvalidOptionError(f"dump_after names {', '.join(missing)}, which this pipeline does not run; "
                                     f"it runs: {', '.join(dict.fromkeys(run)) or 'no passes'}")

    def after_pass(self, step: int, p: Pass, graph: Graph, record: PassRecord) -> None:
        if p.name not in self.passes:
            return
        if self.folder is None:
            print(f"// {self.label} after {p.name} (step {step})\n{graph}", file=self.stream or sys.stderr)
        else:
            _write_dump(self.folder, f"{step:03d}-{p.name}.txt", str(graph))


class TimePasses(Instrument):
    """Print a table of the time spent in each pass, all its runs together, at the end of a run (to stderr)."""

    def __init__(self, stream: TextIO | None = None, label: str = "graph"):
        self.stream, self.label = stream, label

    def after_run(self, report: Report) -> None:
        print(f"// pass times for {self.label}\n{report.timing_table()}", file=self.stream or sys.stderr)


class PassManager:
    """Runs a sequence of passes, optionally to a fixed point.

    ``steps`` holds pass instances, pass names or pipeline levels; ``options``
    maps a pass name to its option values. ``verify`` checks the IR and each
    pass's ``modified`` claim after every pass (on by default under
    ``GRAPHOPT_DEBUG=1`` and in the tests); a pass that breaks either raises
    ``PassContractError``, with the graph before and after it written to
    ``dump_dir`` (default: ``$GRAPHOPT_DUMP_DIR``) when there is one.
    ``instruments`` are called around every pass.
    """

    def __init__(self, steps: Iterable[Pass | str], options: dict[str, dict[str, Any]] | None = None,
                 fixed_point: bool = True, max_iterations: int = 4, verify: bool | None = None,
                 instruments: Sequence[Instrument] = (), dump_dir: str | os.PathLike | None = None):
        _load_builtin_passes()  # so that the built-in pipeline levels are known below
        options = _check_options(options)
        self.passes: list[Pass] = []
        for step in steps:
            if isinstance(step, Pass):
                self.passes.append(step)
                continue
            if not isinstance(step, str):
                raise InvalidOptionError(f"a pipeline step is a level, a pass name or a Pass instance, "
                                         f"got {type(step).__name__}")
            names = pipeline(step) if step in PIPELINES else [step]
            for name in names:
                cls = get_pass(name)
                self.passes.append(instantiate(cls, options.pop(name, {})))
        if options:
            raise InvalidOptionError(f"options given for passes not in the pipeline: {', '.join(sorted(options))}; "
                                     f"add them with passes=[...] or drop their options")
        check_order(self.passes)
        for instrument in instruments:
            instrument.check(self.passes)
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations
        self.verify = debug_enabled() if verify is None else verify
        self.instruments = list(instruments)
        dump_dir = os.environ.get("GRAPHOPT_DUMP_DIR") if dump_dir is None else dump_dir
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.report = Report()

    def run(self, graph: Graph) -> PassResult:
        modified_any = False
        with _long_lived_objects_frozen():
            for _ in range(self.max_iterations if self.fixed_point else 1):
                changed = False
                for p in self.passes:
                    graph, modified = self._run_one(p, graph)
                    changed |= modified
                modified_any |= changed
                if not changed:
                    break
        for instrument in self.instruments:
            instrument.after_run(self.report)
        return PassResult(graph, modified_any)

    def _run_one(self, p: Pass, graph: Graph) -> tuple[Graph, bool]:
        step = len(self.report.records)
        before = len(graph)
        fingerprint = Fingerprint.of(graph) if self.verify else None
        text_before = str(graph) if self.verify and self.dump_dir else None
        for instrument in self.instruments:
            instrument.before_pass(step, p, graph)
        start = time.perf_counter()
        result = p.call(graph)
        seconds = time.perf_counter() - start
        if fingerprint is not None:
            self._check_contract(step, p, result, fingerprint, text_before)
        record = PassRecord(p.name, seconds, before, len(result.graph), result.modified, dict(result.stats))
        self.report.records.append(record)
        if result.modified:
            result.graph.meta.setdefault("passes_applied", []).append(p.name)
        logger.debug("%s: %.2f ms, %d -> %d nodes, modified=%s", p.name, seconds * 1e3, before,
                     len(result.graph), result.modified)
        for instrument in self.instruments:
            instrument.after_pass(step, p, result.graph, record)
        return result.graph, result.modified

    def _check_contract(self, step: int, p: Pass, result: PassResult, fingerprint: Fingerprint,
                        text_before: str | None) -> None:
        """The pass left a valid graph, and changed it exactly when it says it did."""
        try:
            result.graph.verify()
        except VerificationError as e:
            problem = f"left an invalid graph: {e}"
        else:
            changed = fingerprint.differs(Fingerprint.of(result.graph))
            if changed and not result.modified:
                problem = f"changed the graph but reported modified=False: {changed} changed"
            elif result.modified and not changed:
                problem = "reported modified=True but changed nothing"
            else:
                return
        message = f"pass {p.name} {problem}"
        if text_before is not None:
            stem = f"{step:03d}-{p.name}"
            files = [_write_dump(self.dump_dir, f"{stem}.before.txt", text_before),
                     _write_dump(self.dump_dir, f"{stem}.after.txt", str(result.graph))]
            message += f" (graph before and after it: {files[0]}, {files[1]})"
        raise PassContractError(message)


def _write_dump(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text + "\n")
    return path


@contextlib.contextmanager
def _long_lived_objects_frozen() -> Iterator[None]:
    """Keep the graph out of CPython's cycle collector while passes run.

    Every full collection rescans every live object, and a 40k-node graph is
    millions of them, so collections triggered by the passes' own allocations
    made O2 superlinear (0.71 ms a node at 5k nodes, 1.46 ms at 80k;
    ``benchmarks/ir_scaling.py``). ``gc.freeze`` moves what exists now to a
    generation the collector skips; what the passes allocate is still collected.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _check_options(options: Any) -> dict[str, dict[str, Any]]:
    """``options`` must map pass names to ``{option: value}`` dicts."""
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(v, Mapping) for v in options.values()):
        raise InvalidOptionError(f"options must map pass names to {{option: value}} dicts, e.g. "
                                 f"{{'fold_constants': {{'max_output_bytes': 1024}}}}; got {options!r:.100}")
    return {name: dict(values) for name, values in options.items()}


def instantiate(cls: type[Pass], values: dict[str, Any]) -> Pass:
    """The pass ``cls`` with option ``values``, unknown names rejected in one line."""
    valid = cls.option_names()
    unknown = sorted(set(values) - set(valid), key=str)
    if unknown:
        raise InvalidOptionError(f"pass {cls.name} has no option {', '.join(map(str, unknown))}; "
                                 f"its options: {', '.join(valid) or 'none'}")
    return cls(**values)
