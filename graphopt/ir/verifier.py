"""Structural checks of a graph: the invariants every pass must keep."""
from __future__ import annotations

from .graph import Graph, Node
from .registry import infer_types
from .types import TensorType


class VerificationError(Exception):
    """The graph breaks an IR invariant; the message names the node and the rule."""


def verify(graph: Graph, check_types: bool = False) -> None:
    """Check topological order, that every use is defined, use lists, names and types.

    With ``check_types``, every node of a modelled op whose types are static is
    also re-typed by the op registry and must agree with its recorded types
    (slower: it runs each op on meta tensors). Raises ``VerificationError``
    naming the first broken rule.
    """
    defined: set[int] = set()
    names: set[str] = set()

    def define(v, where: str) -> None:
        if v.name in names:
            raise VerificationError(f"{where}: value name %{v.name} is defined twice")
        names.add(v.name)
        defined.add(id(v))

    for v in graph.inputs:
        define(v, "graph input")
    for key, v in graph.constants.items():
        if v.data is None:
            raise VerificationError(f"constant %{key} has no data")
        if key != v.name:
            raise VerificationError(f"constant %{v.name} is filed under the key {key!r}")
        if isinstance(v.type, TensorType) and v.type.shape is not None and tuple(v.data.shape) != v.type.shape:
            raise VerificationError(f"constant %{v.name}: type {v.type} does not match data shape {tuple(v.data.shape)}")
        define(v, "constant")
    seen_nodes: set[int] = set()
    for node in graph:
        where = f"node {node.name} ({node.op})"
        if node.graph is not graph:
            raise VerificationError(f"{where} does not belong to graph {graph.name}")
        if id(node) in seen_nodes:
            raise VerificationError(f"{where} appears twice in the node list")
        seen_nodes.add(id(node))
        opdef = node.opdef  # raises for unknown ops
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if id(v) not in defined:
                raise VerificationError(f"{where}: input {i} %{v.name} is used before it is defined (or not in the graph)")
            if (node, i) not in v._uses:
                raise VerificationError(f"{where}: input {i} %{v.name} does not list this use")
        expected = opdef.output_count(node.attrs)
        if expected >= 0 and len(node.outputs) != expected:
            raise VerificationError(f"{where}: has {len(node.outputs)} outputs, the op defines {expected}")
        for k, out in enumerate(node.outputs):
            if out.producer is not node or out.index != k:
                raise VerificationError(f"{where}: output {k} %{out.name} does not point back at its producer")
            define(out, where)
        if node.opdef.torch_module is not None and "body" in node.attrs:  # a region, or a region-like op
            _check_region(node, where, check_types)
        if check_types:
            _check_types(node, where)
    for v in graph.values():
        for user, i in v._uses:
            if user.graph is not graph or user.inputs[i] is not v:
                raise VerificationError(f"%{v.name} lists a stale use by {user.name} input {i}")
    for k, v in enumerate(graph.outputs):
        if id(v) not in defined:
            raise VerificationError(f"graph output {k} %{v.name} is not defined in the graph")


def _check_region(node: Node, where: str, check_types: bool) -> None:
    from .region import check_body

    problem = check_body(node)
    if problem is not None:
        raise VerificationError(f"{where}: {problem}")
    try:
        verify(node.attrs["body"], check_types)
    except VerificationError as e:
        raise VerificationError(f"{where}, in its body: {e}") from None


def _check_types(node: Node, where: str) -> None:
    if node.opdef.category == "opaque" or node.opdef.torch_impl is None:
        return
    typed = [v.type for v in (*node.inputs, *node.outputs) if v is not None]
    if not all(isinstance(t, TensorType) and t.is_static for t in typed):
        return
    inferred = infer_types(node)
    recorded = [o.type for o in node.outputs]
    if inferred != recorded:
        shown = ", ".join(str(t) for t in inferred)
        raise VerificationError(f"{where}: recorded types {', '.join(map(str, recorded))} but the op gives {shown}")
