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
    inside = {id(n) for n in members}
    sub = Graph(f"{graph.name}.region{index}")
    mapping: dict[int, Value] = {}
    inputs: list[Value] = []
    for node in members:
        for v in node.inputs:
            if v is None or id(v) in mapping or (v.producer is not None and id(v.producer) in inside):
                continue
            if v.is_constant:
                c = sub.add_constant(v.data, v.name, v.is_parameter)
                c.type = v.type
                mapping[id(v)] = c
            else:
                mapping[id(v)] = sub.add_input(v.name, v.type)
                inputs.append(v)
    for node in members:
        copy = sub.add_node(node.op, [None if v is None else mapping[id(v)] for v in node.inputs], dict(node.attrs),
                            output_types=[o.type for o in node.outputs], name=node.name,
                            output_names=[o.name for o in node.outputs], meta=dict(node.meta))
        for o, co in zip(node.outputs, copy.outputs):
            mapping[id(o)] = co
    graph_outputs = {id(v) for v in graph.outputs}
    outputs = [o for node in members for o in node.outputs
               if id(o) in graph_outputs or any(id(u) not in inside for u in o.users())]
    sub.outputs = [mapping[id(o)] for o in outputs]
    return Region(index, list(members), sub, inputs, outputs)


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
