"""Regions: the subgraphs a backend compiles as one unit.

``partition`` splits a graph into convex regions of nodes one predicate
accepts, never cutting a fusion group (``mark_fusion_groups``): a group goes
into a region whole or not at all. ``Region.graph`` is a standalone copy of
the region (its own inputs and outputs, constants shared with the parent), so
a backend sees an ordinary graph, and its structural hash keys compiled code,
timings and tuning records across models.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from graphopt.ir import Graph, Node, Value
from graphopt.ir.region import extract as copy_out
from graphopt.ir.registry import node_bytes, node_flops
from graphopt.passes.fusion_groups import Reachability


@dataclass
class Region:
    """A convex set of nodes of a parent graph, and the standalone graph that computes them."""

    index: int
    nodes: list[Node]
    graph: Graph
    inputs: list[Value] = field(default_factory=list)
    """The parent's values the region reads, in the order of ``graph.inputs``."""
    outputs: list[Value] = field(default_factory=list)
    """The parent's values the region defines and something outside reads, in the order of ``graph.outputs``."""

    @cached_property
    def hash(self) -> str:
        """Structural hash of the region's graph: equal for the same ops, attributes, shapes and dtypes."""
        return self.graph.structural_hash()

    @property
    def flops(self) -> int:
        return sum(node_flops(n) for n in self.graph.nodes)

    @property
    def bytes(self) -> int:
        """Bytes moved if every node reads and writes memory (no fusion)."""
        return sum(node_bytes(n) for n in self.graph.nodes)

    def __repr__(self) -> str:
        return f"Region({self.index}, {len(self.nodes)} nodes, {self.hash})"


def extract(graph: Graph, members: list[Node], index: int = 0) -> Region:
    """The region of ``members`` (in ``graph``'s order) as a standalone graph.

    Its inputs are the non-constant values the members read from outside; its
    outputs, the members' values that a node outside or the graph's outputs read.
    """
    part = copy_out(members, f"{graph.name}.region{index}")
    return Region(index, list(members), part.body, part.inputs, part.outputs)


def partition(graph: Graph, supported: Callable[[Node], bool]) -> list[Region]:
    """Maximal convex regions of supported nodes, fusion groups kept whole, in graph order.

    Greedy in execution order, as TVM's and torch.fx's capability partitioners
    do: each supported unit (a fusion group, or a node in none) joins the
    regions of its producers when the union stays convex (no path leaves it
    and comes back), else the first such region it can join alone, else
    starts a region. Regions without a node that computes something (only
    shape bookkeeping) are still returned; the caller decides what pays.
    """
    nodes = graph.nodes
    order = {id(n): k for k, n in enumerate(nodes)}
    units: dict[object, list[Node]] = {}
    for n in nodes:
        units.setdefault(n.meta.get("fusion_group", ("node", id(n))), []).append(n)
    reach = Reachability(graph)
    region_of: dict[int, int] = {}
    regions: dict[int, list[Node]] = {}
    for unit in sorted(units.values(), key=lambda u: order[id(u[-1])]):
        if not all(supported(n) for n in unit):
            continue
        producers = list(dict.fromkeys(region_of[id(v.producer)] for n in unit for v in n.inputs
                                       if v is not None and v.producer is not None and id(v.producer) in region_of))
        into = _landing(producers, unit, regions, reach)
        target = into[0] if into else max(regions, default=-1) + 1
        regions.setdefault(target, [])
        for r in into[1:]:
            for n in regions.pop(r):
                region_of[id(n)] = target
                regions[target].append(n)
        regions[target].extend(unit)
        region_of.update((id(n), target) for n in unit)
    ordered = sorted((sorted(ns, key=lambda n: order[id(n)]) for ns in regions.values()), key=lambda ns: order[id(ns[0])])
    return [extract(graph, ns, k) for k, ns in enumerate(ordered)]


def _landing(producers: list[int], unit: list[Node], regions: dict[int, list[Node]],
             reach: Reachability) -> list[int]:
    """The regions ``unit`` joins, merged into the first: all its producers' when their union stays
    convex, else the first one it keeps convex alone, else none (it starts a region)."""
    if len(producers) > 1 and reach.is_convex([n for r in producers for n in regions[r]] + unit):
        return producers
    for r in producers:
        if reach.is_convex([*regions[r], *unit]):
            return [r]
    return []
