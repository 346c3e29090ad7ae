"""Passes, named pipelines, and the manager that runs them with instrumentation.

One pass contract (after onnx-ir's ``PassBase``): a pass is a dataclass whose
fields are its typed options, with a class-level ``name`` and ``kind``, and a
``call(graph) -> PassResult``. A pass is **exact** (outputs preserved within
float tolerance) or **lossy** (it names the quality metric it trades); lossy
passes are never part of a named pipeline, only run when asked for by name.

Pipelines are plain named lists (``O0``, ``O1``, ...). The manager times each
pass, counts nodes before and after, checks the pass's ``modified`` claim
against the graph's structural hash in debug mode, verifies the graph after
every pass when asked, and keeps a JSON-serialisable report.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import InvalidOptionError
from .ir import Graph

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


def register_pipeline(level: str, pass_names: Sequence[str]) -> None:
    """Name a pipeline. Lossy passes are refused: they must be asked for explicitly."""
    for name in pass_names:
        cls = PASSES.get(name)  # registered already: looking up must not load the built-ins mid-import
        if cls is None:
            raise KeyError(f"pipeline {level} names pass {name!r}, which is not registered")
        if cls.kind is PassKind.LOSSY:
            raise ValueError(f"pipeline {level} cannot hold lossy pass {name}; ask for it by name instead")
    PIPELINES[level] = list(pass_names)


def get_pass(name: str) -> type[Pass]:
    _load_builtin_passes()
    if not isinstance(name, str) or name not in PASSES:
        raise InvalidOptionError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def pipeline(level: str) -> list[str]:
    _load_builtin_passes()
    if not isinstance(level, str) or level not in PIPELINES:
        raise InvalidOptionError(f"unknown level {level!r}; known levels: {', '.join(PIPELINES)}")
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

    def table(self) -> str:
        rows = [f"{'pass':<28} {'ms':>8} {'nodes':>13} changed"]
        for r in self.records:
            rows.append(f"{r.name:<28} {r.seconds * 1e3:8.2f} {r.nodes_before:>6}->{r.nodes_after:<6} "
                        f"{'yes' if r.modified else 'no'}")
        return "\n".join(rows)


def debug_enabled() -> bool:
    return os.environ.get("GRAPHOPT_DEBUG", "") not in ("", "0")


class PassManager:
    """Runs a sequence of passes, optionally to a fixed point.

    ``steps`` holds pass instances, pass names or pipeline levels; ``options``
    maps a pass name to its option values. ``verify`` checks the IR after every
    pass (on by default under ``GRAPHOPT_DEBUG=1`` and in the tests).
    """

    def __init__(self, steps: Iterable[Pass | str], options: dict[str, dict[str, Any]] | None = None,
                 fixed_point: bool = True, max_iterations: int = 4, verify: bool | None = None):
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
                self.passes.append(_instantiate(cls, options.pop(name, {})))
        if options:
            raise InvalidOptionError(f"options given for passes not in the pipeline: {', '.join(sorted(options))}; "
                                     f"add them with passes=[...] or drop their options")
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations
        self.verify = debug_enabled() if verify is None else verify
        self.report = Report()

    def run(self, graph: Graph) -> PassResult:
        modified_any = False
        for _ in range(self.max_iterations if self.fixed_point else 1):
            changed = False
            for p in self.passes:
                graph, modified = self._run_one(p, graph)
                changed |= modified
            modified_any |= changed
            if not changed:
                break
        return PassResult(graph, modified_any)

    def _run_one(self, p: Pass, graph: Graph) -> tuple[Graph, bool]:
        before = len(graph)
        hash_before = graph.structural_hash() if self.verify else None
        start = time.perf_counter()
        result = p.call(graph)
        seconds = time.perf_counter() - start
        if self.verify:
            result.graph.verify()
            changed = result.graph.structural_hash() != hash_before
            if changed and not result.modified:
                raise AssertionError(f"pass {p.name} changed the graph but reported modified=False")
        record = PassRecord(p.name, seconds, before, len(result.graph), result.modified, dict(result.stats))
        self.report.records.append(record)
        if result.modified:
            result.graph.meta.setdefault("passes_applied", []).append(p.name)
        logger.debug("%s: %.2f ms, %d -> %d nodes, modified=%s", p.name, seconds * 1e3, before,
                     len(result.graph), result.modified)
        return result.graph, result.modified


def _check_options(options: Any) -> dict[str, dict[str, Any]]:
    """``options`` must map pass names to ``{option: value}`` dicts."""
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(v, Mapping) for v in options.values()):
        raise InvalidOptionError(f"options must map pass names to {{option: value}} dicts, e.g. "
                                 f"{{'fold_constants': {{'max_output_bytes': 1024}}}}; got {options!r:.100}")
    return {name: dict(values) for name, values in options.items()}


def _instantiate(cls: type[Pass], values: dict[str, Any]) -> Pass:
    valid = cls.option_names()
    unknown = sorted(set(values) - set(valid), key=str)
    if unknown:
        raise InvalidOptionError(f"pass {cls.name} has no option {', '.join(map(str, unknown))}; "
                                 f"its options: {', '.join(valid) or 'none'}")
    return cls(**values)
