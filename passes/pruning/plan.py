"""Choosing channels to remove: ratios, budgets, alignment, and plans that can be saved and re-applied.

A ``PruningPlan`` names groups by their stable labels, not by ids or tensors, so a plan
made on one capture applies to a fresh capture (or ONNX export) of the same model.
"""
from __future__ import annotations

import fnmatch
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from graphopt.errors import InvalidOptionError
from graphopt.ir import Graph
from graphopt.ir.registry import node_flops

from .apply import remove_channels
from .dependency import Group, build_groups
from .importance import LossFn, check_importance, score_groups

RANKINGS = ("layer", "global")
HEADS = ("heads", "head_dim")
TARGETS = ("macs", "params", "latency_ms", "onnxruntime_latency_ms")
LATENCY_TARGETS = {"latency_ms": "torch", "onnxruntime_latency_ms": "onnxruntime"}
ALIGNMENTS = (None, 8, 16)
"""Channel multiples a latency target tries when the caller fixed none: kernels (oneDNN's and
onnxruntime's blocked convolutions) run aligned channel counts much faster than odd ones."""
MAX_RATIO = 0.99  # the largest ratio a budget search tries: min_keep still leaves every group alive

Ratio = float | Mapping[str, float]


@dataclass
class PruningPlan:
    """Group label -> removed group channels, with each group's size to catch a mismatched model."""
    removals: dict[str, list[int]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    heads: str = "heads"

    def to_json(self) -> str:
        groups = {label: {"size": self.sizes[label], "removed": idx} for label, idx in self.removals.items()}
        return json.dumps({"format": "graphopt.pruning_plan", "version": 1, "heads": self.heads,
                           "groups": groups}, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> PruningPlan:
        try:
            data = json.loads(text)
            if data.get("format") != "graphopt.pruning_plan":
                raise KeyError("format")
            groups = data["groups"]
            return cls({k: [int(i) for i in g["removed"]] for k, g in groups.items()},
                       {k: int(g["size"]) for k, g in groups.items()}, str(data.get("heads", "heads")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidOptionError(f"not a pruning plan ({type(e).__name__}: {e}); "
                                     f"pass a file written by PruningPlan.to_json or --plan-out") from None

    @property
    def removed(self) -> int:
        return sum(len(idx) for idx in self.removals.values())

    def apply(self, graph: Graph) -> Graph:
        """Remove the plan's channels from ``graph`` in place (groups are rebuilt from its labels)."""
        groups = build_groups(graph, heads=self.heads)
        by_label = {g.label: g for g in groups}
        removals: dict[int, list[int]] = {}
        for label, idx in self.removals.items():
            group = by_label.get(label)
            if group is None:
                raise InvalidOptionError(f"the plan prunes group {label!r}, which this graph does not have; "
                                         f"apply the plan to the model it was made for")
            if group.size != self.sizes[label]:
                raise InvalidOptionError(f"group {label!r} has {group.size} channels, the plan expects "
                                         f"{self.sizes[label]}; apply the plan to the model it was made for")
            if not group.prunable:
                raise InvalidOptionError(f"group {label!r} cannot be pruned here: {group.reason}")
            if any(not 0 <= i < group.size for i in idx) or group.size - len(set(idx)) < group.min_keep:
                raise InvalidOptionError(f"the plan's indices for group {label!r} are out of range or leave "
                                         f"fewer than {group.min_keep} channels; fix the plan")
            if idx:
                removals[group.id] = sorted(set(idx))
        if removals:
            remove_channels(graph, groups, removals)
        graph.meta["pruning_plan"] = self
        return graph


# ------------------------------------------------------------------ selection
def select(groups: Sequence[Group], scores: Mapping[int, torch.Tensor], ratio: Ratio, *,
           round_to: int | None = None, ranking: str = "layer") -> dict[int, list[int]]:
    """Group id -> the lowest-scoring channels to remove, honouring min_keep and ``round_to``.

    ``ranking="layer"`` removes ``ratio`` of every group; ``"global"`` removes ``ratio`` of
    all prunable channels, wherever the (normalised) scores are lowest.
    """
    candidates = [g for g in groups if g.prunable and g.size > g.min_keep]
    if isinstance(ratio, Mapping):
        counts = {g.id: math.floor(r * g.size) for g, r in _ratios_by_label(groups, ratio)}
    elif ranking == "global":
        counts = _global_counts(candidates, scores, ratio)
    else:
        counts = {g.id: math.floor(ratio * g.size) for g in candidates}
    removals = {}
    for g in candidates:
        keep = aligned_keep(g, g.size - counts.get(g.id, 0), round_to)
        if keep < g.size:
            order = torch.sort(scores[g.id], stable=True).indices
            removals[g.id] = sorted(order[: g.size - keep].tolist())
    return removals


def aligned_keep(group: Group, keep: int, round_to: int | None) -> int:
    """``keep`` moved to the nearest count whose every parameter slice is a multiple of ``round_to``."""
    step = 1
    if round_to and round_to > 1:
        ks = [m.positions.shape[1] for m in group.parameters()] or [1]
        step = math.lcm(*(round_to // math.gcd(round_to, k) for k in ks))
    keep = math.floor(keep / step + 0.5) * step
    keep = max(keep, math.ceil(group.min_keep / step) * step)
    return min(keep, group.size)


def _global_counts(groups: Sequence[Group], scores: Mapping[int, torch.Tensor], ratio: float) -> dict[int, int]:
    budget = math.floor(ratio * sum(g.size for g in groups))
    pool = [(float(s), g.id) for g in groups
            for s in torch.sort(scores[g.id]).values[: g.size - g.min_keep]]
    pool.sort(key=lambda item: item[0])
    counts: dict[int, int] = {}
    for _, gid in pool[:budget]:
        counts[gid] = counts.get(gid, 0) + 1
    return counts


def _ratios_by_label(groups: Sequence[Group], ratios: Mapping[str, float]) -> list[tuple[Group, float]]:
    """(group, ratio) for a dict of labels or glob patterns; the last matching pattern wins."""
    chosen: dict[int, tuple[Group, float]] = {}
    for pattern, r in ratios.items():
        check_ratio(r, f"ratio[{pattern!r}]")
        # a label is also a glob, and its "[0]" a character class: match the label itself first
        matched = [g for g in groups if g.label == pattern or fnmatch.fnmatchcase(g.label, pattern)]
        if not matched:
            sample = ", ".join(g.label for g in groups[:3])
            raise InvalidOptionError(f"ratio names group {pattern!r}, which matches no group label "
                                     f"(labels look like {sample}); see Pruner(graph).table()")
        if len(matched) == 1 and matched[0].label == pattern and not matched[0].prunable:
            raise InvalidOptionError(f"group {pattern!r} cannot be pruned: {matched[0].reason}")
        chosen.update({g.id: (g, r) for g in matched if g.prunable and g.size > g.min_keep})
    return list(chosen.values())


# ------------------------------------------------------------------- checks
def check_ratio(ratio: Any, name: str = "ratio") -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise InvalidOptionError(f"{name} must be a number in [0, 1), got {ratio!r}")


def check_options(*, ratio: Ratio = 0.5, importance: str = "l2", round_to: int | None = None,
                  target: Mapping[str, float] | None = None, heads: str = "heads", ranking: str = "layer",
                  normalize: str = "mean", example_inputs: Any = None) -> None:
    """Refuse bad arguments with one line naming the fix, before any capture or scoring."""
    if isinstance(ratio, Mapping):
        for label, r in ratio.items():
            check_ratio(r, f"ratio[{label!r}]")
    else:
        check_ratio(ratio)
    check_importance(importance, normalize, example_inputs)
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise InvalidOptionError(f"round_to must be a positive integer (e.g. 8), got {round_to!r}")
    if heads not in HEADS:
        raise InvalidOptionError(f"heads must be one of {', '.join(HEADS)}, got {heads!r}")
    if ranking not in RANKINGS:
        raise InvalidOptionError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    if target is not None:
        if not isinstance(target, Mapping) or len(target) != 1 or next(iter(target)) not in TARGETS:
            raise InvalidOptionError(f"target must be one of {{'macs': N}}, {{'params': N}}, {{'latency_ms': T}}, "
                                     f"{{'onnxruntime_latency_ms': T}}, got {target!r}")
        (kind, value), = target.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise InvalidOptionError(f"target {kind} must be a positive number, got {value!r}")
        if isinstance(ratio, Mapping):
            raise InvalidOptionError("a target chooses the ratio itself; pass a per-group ratio or a target, not both")
        if kind in LATENCY_TARGETS and example_inputs is None:
            raise InvalidOptionError(f"target {kind} is measured: pass example_inputs")


# ----------------------------------------------------------------- measures
def count_params(graph: Graph) -> int:
    return sum(v.data.numel() for v in graph.constants.values() if v.is_parameter and v.data is not None)


def count_macs(graph: Graph) -> int:
    """Multiply-accumulates, as half the registry's floating-point operation count."""
    return sum(node_flops(n) for n in graph.nodes) // 2


def measure_latency(graph: Graph, example_inputs: Sequence[Any], runs: int = 9, runtime: str = "torch") -> float:
    """Median milliseconds of the graph on ``example_inputs`` (after two warm-up runs).

    ``runtime`` is ``torch`` (``graph.to_torch()``) or ``onnxruntime`` (``graph.to_onnx()`` in a CPU
    session with onnxruntime's default optimisations and torch's thread count).
    """
    inputs = tuple(example_inputs)
    if runtime == "onnxruntime":
        run = _onnxruntime_runner(graph, inputs)
    else:
        module = graph.to_torch()
        cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)

        def run() -> None:
            module(*inputs)
            if cuda:
                torch.cuda.synchronize()
    times = []
    with torch.no_grad():
        for k in range(runs + 2):
            start = time.perf_counter()
            run()
            if k >= 2:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _onnxruntime_runner(graph: Graph, inputs: tuple) -> Callable[[], Any]:
    from graphopt.backends._onnxruntime import inference_session

    session = inference_session(graph.to_onnx(), threads=torch.get_num_threads())
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feeds)


# ------------------------------------------------------------------- pruner
class Pruner:
    """Research entry point: groups and their importance, plans, and pruning chosen channels.

    >>> pruner = Pruner(graph, importance="l1")
    >>> print(pruner.table())
    >>> plan = pruner.plan(0.3, round_to=8)
    >>> pruner.prune(plan)   # or pruner.prune({"layer1.0.conv1.weight[0]": [0, 5]})
    """

    def __init__(self, graph: Graph, *, importance: str = "l2", example_inputs: Any = None,
                 loss_fn: LossFn | None = None, ignored: Sequence[str] = (), heads: str = "heads",
                 normalize: str = "mean", seed: int = 0):
        check_options(importance=importance, heads=heads, normalize=normalize, example_inputs=example_inputs)
        self.graph = graph
        self.importance, self.example_inputs, self.loss_fn = importance, example_inputs, loss_fn
        self.ignored = resolve_ignored(graph, ignored)
        self.heads, self.normalize, self.seed = heads, normalize, seed
        self._groups: list[Group] | None = None
        self._scores: dict[int, torch.Tensor] | None = None

    @property
    def groups(self) -> list[Group]:
        """The graph's groups, rebuilt after each ``prune``."""
        if self._groups is None:
            self._groups = build_groups(self.graph, ignored=self.ignored, heads=self.heads)
        return self._groups

    @property
    def scores(self) -> dict[int, torch.Tensor]:
        """Group id -> normalised importance per channel."""
        if self._scores is None:
            self._scores = score_groups(self.graph, self.groups, self.importance, example_inputs=self.example_inputs,
                                        loss_fn=self.loss_fn, normalize=self.normalize, seed=self.seed)
        return self._scores

    def group(self, label: str) -> Group:
        for g in self.groups:
            if g.label == label:
                return g
        raise InvalidOptionError(f"no group is labelled {label!r}; see Pruner(graph).table()")

    def plan(self, ratio: Ratio = 0.5, *, round_to: int | None = None, ranking: str = "layer") -> PruningPlan:
        """The channels ``ratio`` removes (see ``select``), as a plan; the graph is left alone."""
        check_options(ratio=ratio, round_to=round_to, ranking=ranking)
        return self._plan(select(self.groups, self.scores, ratio, round_to=round_to, ranking=ranking))

    def plan_for(self, target: Mapping[str, float], *, round_to: int | None = None, ranking: str = "layer",
                 steps: int = 10) -> PruningPlan:
        """The smallest uniform ratio whose pruned graph meets ``target``, found by bisection on clones.

        A latency target is a measurement, so it also picks the channel alignment: with no
        ``round_to`` given it bisects under each of ``ALIGNMENTS`` and keeps the plan that meets
        the target while removing the fewest channels.
        """
        check_options(target=target, round_to=round_to, ranking=ranking, example_inputs=self.example_inputs)
        (kind, limit), = target.items()
        measure = _measure(kind, self.example_inputs)
        if measure(self.graph) <= limit:
            return self._plan({})
        latency = kind in LATENCY_TARGETS
        alignments = ALIGNMENTS if latency and round_to is None else (round_to,)
        met = [self._bisect(measure, limit, kind, align, ranking, min(steps, 6) if latency else steps)
               for align in alignments]
        met = [m for m in met if m is not None]
        if not met:
            raise InvalidOptionError(f"target {kind} <= {limit:g} is out of reach: pruning {MAX_RATIO:.0%} of every "
                                     f"group still misses it; raise the target or ignore fewer layers")
        return min(met, key=lambda plan: plan.removed)

    def _bisect(self, measure: Callable[[Graph], float], limit: float, kind: str, round_to: int | None,
                ranking: str, steps: int) -> PruningPlan | None:
        def trial(ratio: float) -> tuple[PruningPlan, float]:
            plan = self.plan(ratio, round_to=round_to, ranking=ranking)
            return plan, measure(plan.apply(self.graph.clone()))

        best, reached = trial(MAX_RATIO)
        if reached > limit:
            return None
        low, high = 0.0, MAX_RATIO
        for _ in range(steps):
            mid = (low + high) / 2
            plan, value = trial(mid)
            if value <= limit:
                best, high = plan, mid
            else:
                low = mid
        return best

    def prune(self, plan: PruningPlan | Mapping[str, Sequence[int]]) -> PruningPlan:
        """Remove a plan's (or a {label: indices} dict's) channels from the graph in place."""
        if not isinstance(plan, PruningPlan):
            plan = PruningPlan({label: sorted({int(i) for i in idx}) for label, idx in plan.items()},
                               {label: self.group(label).size for label in plan}, self.heads)
        if plan.heads != self.heads:
            raise InvalidOptionError(f"the plan prunes with heads={plan.heads!r}, this pruner {self.heads!r}")
        ignored = {g.label for g in self.groups if not g.prunable}
        touched = sorted(ignored & {label for label, idx in plan.removals.items() if idx})
        if touched:
            raise InvalidOptionError(f"the plan prunes group {touched[0]!r}, which is not prunable: "
                                     f"{self.group(touched[0]).reason}")
        plan.apply(self.graph)
        self._groups = self._scores = None
        return plan

    def table(self, plan: PruningPlan | None = None) -> str:
        """One row per group: size, prunable or why not, importance spread, and what ``plan`` removes."""
        from graphopt.cli import format_table

        rows = []
        for g in self.groups:
            s = self.scores[g.id]
            spread = f"{s.min():.3g} / {s.median():.3g} / {s.max():.3g}" if s.numel() else "-"
            row = [g.label, str(g.size), "yes" if g.prunable else f"no: {g.reason}", spread]
            if plan is not None:
                row.append(str(len(plan.removals.get(g.label, ()))))
            rows.append(row)
        header = ["group", "channels", "prunable", f"{self.importance} min / median / max"]
        if plan is not None:
            header.append("removed")
        return format_table(header, rows, align="<><<>"[: len(header)])

    def __str__(self) -> str:
        return self.table()

    def _plan(self, removals: Mapping[int, Sequence[int]]) -> PruningPlan:
        by_id = {g.id: g for g in self.groups}
        labels = [by_id[i].label for i in removals]
        if len(set(labels)) != len(labels):
            raise RuntimeError(f"two groups share a label among {labels}; plans need unique labels")
        return PruningPlan({by_id[i].label: list(idx) for i, idx in removals.items()},
                           {by_id[i].label: by_id[i].size for i in removals}, self.heads)


def _measure(kind: str, example_inputs: Any) -> Callable[[Graph], float]:
    if kind == "macs":
        return count_macs
    if kind == "params":
        return count_params
    return lambda graph: measure_latency(graph, example_inputs, runtime=LATENCY_TARGETS[kind])


def resolve_ignored(graph: Graph, names: Sequence[str]) -> list[str]:
    """Names build_groups understands: value or node names, a module name standing for its parameters."""
    if isinstance(names, str):
        names = [names]
    node_names = {n.name for n in graph.nodes}
    resolved = []
    for name in names:
        if name in graph.constants or name in node_names:
            resolved.append(name)
            continue
        inside = [c for c in graph.constants if c.startswith(f"{name}.")]
        if not inside:
            raise InvalidOptionError(f"ignored layer {name!r} is neither a parameter, a node nor a module of the "
                                     f"graph; use names like {next(iter(graph.constants), 'fc.weight')!r}")
        resolved += inside
    return resolved


def prune_graph(graph: Graph, example_inputs: Any = None, ratio: Ratio = 0.5, importance: str = "l2",
                round_to: int | None = None, ignored: Sequence[str] = (), target: Mapping[str, float] | None = None,
                heads: str = "heads", seed: int = 0, *, ranking: str = "layer", normalize: str = "mean",
                loss_fn: LossFn | None = None) -> PruningPlan:
    """Score, select and remove channels of ``graph`` in place; the plan is also left in ``graph.meta``."""
    check_options(ratio=ratio, importance=importance, round_to=round_to, target=target, heads=heads,
                  ranking=ranking, normalize=normalize, example_inputs=example_inputs)
    pruner = Pruner(graph, importance=importance, example_inputs=example_inputs, loss_fn=loss_fn, ignored=ignored,
                    heads=heads, normalize=normalize, seed=seed)
    plan = (pruner.plan_for(target, round_to=round_to, ranking=ranking) if target is not None
            else pruner.plan(ratio, round_to=round_to, ranking=ranking))
    return pruner.prune(plan)
