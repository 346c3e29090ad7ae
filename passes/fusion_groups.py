"""Fusion groups: mark the sets of nodes that code generation will emit as one kernel.

An analysis pass: it rewrites nothing, it only annotates. Each group gets an
integer id, stored on its nodes as ``node.meta["fusion_group"]`` and described
in ``graph.meta["fusion_groups"] = {id: {"kind": ..., "nodes": [names]}}``.
The annotation describes the graph as it is when the pass runs, so it belongs
at the end of a pipeline, after every pass that changes the graph.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from graphopt.ir import Graph, Node, TensorType
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass


ANCHOR_CATEGORIES = frozenset({"matmul", "conv"})
"""Ops computed by a library call (GEMM, convolution) that can apply an epilogue to their result."""

Shape = tuple[int | str, ...]


def node_role(node: Node) -> str | None:
    """How a node can take part in a fused kernel: ``pointwise``, ``reduction``, ``anchor`` or not at all."""
    if not node.is_pure or len(node.outputs) != 1 or _shape(node) is None:
        return None
    opdef = node.opdef
    category = opdef.category
    if opdef.pointwise or opdef.channelwise:
        return "pointwise"
    if category in ("reduction", "norm") and not opdef.scan:  # a selection or a scan is no plain reduction
        return "reduction"
    if category in ANCHOR_CATEGORIES:
        return "anchor"
    return None


def _shape(node: Node) -> Shape | None:
    t = node.outputs[0].type if node.outputs else None
    return t.shape if isinstance(t, TensorType) else None


def _input_shape(node: Node) -> Shape | None:
    t = node.inputs[0].type if node.inputs and node.inputs[0] is not None else None
    return t.shape if isinstance(t, TensorType) else None


def fits_domain(shape: Shape, domain: Shape) -> bool:
    """Whether a kernel iterating over ``domain`` computes a value of ``shape`` with no extra loop.

    True when the shapes are equal, when ``shape`` broadcasts to ``domain``
    (a per-channel or per-row value), or, for static shapes, when it has no
    more elements (a reduction's result, kept dims or not).
    """
    if shape == domain:
        return True
    if len(shape) <= len(domain) and all(s == 1 or s == d for s, d in zip(reversed(shape), reversed(domain))):
        return True
    static = all(isinstance(d, int) for d in (*shape, *domain))
    return static and math.prod(shape) <= math.prod(domain)  # type: ignore[arg-type]


class Reachability:
    """Whether a set of nodes is convex: no path leaves it and comes back (such a path would need the
    kernel to wait for a node outside it).

    Node order is topological, so a path that returns to the set runs entirely before the set's last
    member: the search walks forward from the set's outside readers and never past that position. Its
    cost is the span of the set, not the graph (bit sets of all ancestors were quadratic in memory: 800 MB
    at 80k nodes).
    """

    def __init__(self, graph: Graph):
        self.position = {id(n): k for k, n in enumerate(graph)}

    def is_convex(self, members: list[Node]) -> bool:
        inside = {id(n) for n in members}
        last = max(self.position[id(n)] for n in members)
        seen: set[int] = set()
        stack = [u for n in members for u in n.users() if id(u) not in inside]
        while stack:
            node = stack.pop()
            if id(node) in seen or self.position[id(node)] > last:
                continue
            seen.add(id(node))
            for user in node.users():
                if id(user) in inside:
                    return False
                stack.append(user)
        return True


@dataclass
class _Group:
    kind: str
    domain: Shape
    members: list[Node]


@register_pass
@dataclass
class MarkFusionGroups(Pass):
    """Annotate convex groups of nodes that one generated kernel can compute (no graph change).

    Greedy producer-consumer fusion in the manner of XLA's and TVM's
    operator fusion (Chen et al. 2018, "TVM", §4.1: injective and reduction
    ops fuse with elementwise neighbours, "out-elemwise-fusable" ops such as
    conv2d take an elementwise epilogue) and Inductor's scheduler. Three kinds,
    formed in this order so epilogues claim their bias, activation and
    residual add first:

    - ``epilogue``: a matmul/linear/gemm/einsum/conv and the pointwise
      consumers that follow it (bias add, batch norm at inference, activation,
      residual add) over the same output domain;
    - ``reduction``: a reduction or norm (sum, mean, softmax, layer norm, ...)
      with its pointwise producers and consumers, and other reductions over
      the same input domain (a decomposed layer norm or softmax);
    - ``elementwise``: maximal chains of pointwise ops, seeded from the last
      one, whose values broadcast to the seed's output shape.

    A node joins a group only if its value fits the group's iteration domain
    (``fits_domain``), the group stays within ``max_group_size`` nodes, and
    the group stays convex (``Reachability``): a kernel cannot wait for a
    node outside it that reads its own results. Groups of one node are not
    recorded; every node is in at most one group. An analysis: it reports
    ``modified=False``, since the graph itself never changes, and the stat
    ``annotations_changed`` says whether the annotations did. Lowering
    requires them fresh, so no rewriting pass may run between the two.
    """

    name = "mark_fusion_groups"
    kind = PassKind.EXACT
    analysis = True
    ensures = ("fusion_groups",)

    max_group_size: int = 16

    def call(self, graph: Graph) -> PassResult:
        if self.max_group_size < 2:
            raise ValueError(f"max_group_size must be at least 2, got {self.max_group_size}")
        groups = _GroupBuilder(graph, self.max_group_size).build()
        table = {k: {"kind": g.kind, "nodes": [n.name for n in g.members]} for k, g in enumerate(groups)}
        stats = {f"{kind}_groups": sum(g.kind == kind for g in groups)
                 for kind in ("epilogue", "reduction", "elementwise")}
        stats["nodes_grouped"] = sum(len(g.members) for g in groups)
        stats["annotations_changed"] = int(self._annotate(graph, table))
        return PassResult(graph, False, stats)

    @staticmethod
    def _annotate(graph: Graph, table: dict[int, dict]) -> bool:
        group_of = {name: k for k, group in table.items() for name in group["nodes"]}
        modified = graph.meta.get("fusion_groups") != table
        for node in graph.nodes:
            old = node.meta.pop("fusion_group", None)
            if node.name in group_of:
                node.meta["fusion_group"] = group_of[node.name]
            modified |= old != node.meta.get("fusion_group")
        graph.meta["fusion_groups"] = table
        return modified


class _GroupBuilder:
    def __init__(self, graph: Graph, max_size: int):
        self.nodes = graph.nodes
        self.max_size = max_size
        self.role = {id(n): node_role(n) for n in self.nodes}
        self.reach = Reachability(graph)
        self.taken: set[int] = set()

    def build(self) -> list[_Group]:
        groups = [self._grow(_Group("epilogue", _shape(n), [n]), consumers_only=True)
                  for n in self._free("anchor")]
        groups += [self._grow(_Group("reduction", _input_shape(n), [n]), consumers_only=False)
                   for n in self._free("reduction") if _input_shape(n) is not None]
        groups += [self._grow(_Group("elementwise", _shape(n), [n]), consumers_only=False)
                   for n in self._free("pointwise", backwards=True)]
        return [g for g in groups if len(g.members) > 1]

    def _free(self, role: str, backwards: bool = False) -> Iterator[Node]:
        """Ungrouped nodes of ``role`` in execution order (or backwards); checked lazily, as groups claim nodes."""
        for n in reversed(self.nodes) if backwards else self.nodes:
            if self.role[id(n)] == role and id(n) not in self.taken:
                yield n

    def _grow(self, group: _Group, consumers_only: bool) -> _Group:
        """Breadth-first from the seed: add each neighbour that may join.

        A seed left alone is released, so that a later group may still take it.
        """
        self.taken.add(id(group.members[0]))
        queue = deque(group.members)
        while queue and len(group.members) < self.max_size:
            for candidate in self._neighbours(queue.popleft(), consumers_only):
                if len(group.members) < self.max_size and self._may_join(group, candidate):
                    group.members.append(candidate)
                    self.taken.add(id(candidate))
                    queue.append(candidate)
        if len(group.members) == 1:
            self.taken.discard(id(group.members[0]))
        group.members.sort(key=lambda n: self.reach.position[id(n)])
        return group

    @staticmethod
    def _neighbours(node: Node, consumers_only: bool) -> list[Node]:
        users = node.users()
        if consumers_only:
            return users
        producers = [v.producer for v in node.inputs if v is not None and v.producer is not None]
        return list(dict.fromkeys([*producers, *users]))

    def _may_join(self, group: _Group, node: Node) -> bool:
        if id(node) in self.taken:
            return False
        role = self.role[id(node)]
        if role == "pointwise":
            fits = fits_domain(_shape(node), group.domain)
        elif role == "reduction" and group.kind == "reduction":
            fits = _input_shape(node) == group.domain
        else:
            return False
        return fits and self.reach.is_convex([*group.members, node])
