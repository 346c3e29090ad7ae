"""Regions: a node that holds a subgraph, and the ops that read and write state kept across calls.

A ``region`` node's ``body`` attribute is a ``Graph`` whose inputs are the
node's inputs and whose outputs are its outputs, one for one. Passes may treat
the node as one op (cost it, cache it, lower it) or look inside it; the IR's
checks recurse into the body (verify, hash, clone, print). ``extract`` copies
a set of nodes out as a standalone graph (a backend's region), ``outline``
replaces a convex set by a region node and ``inline`` splices one back, all in
time linear in the set's size.

State is the emitted torch module's, never a global: ``state_load`` reads a
keyed slot (its input is the value while the slot is empty) and
``state_store`` writes one (and passes its value on, so readers order after
it). The slots live on the ``GraphState`` the torch emitter gives each module;
keys are explicit, and a module's ``graphopt_state.branch("uncond")`` keeps one
set of slots per classifier-free-guidance branch. The IR's own reference
semantics (``interpret``) is one call from empty state: loads give their
inputs and stores keep nothing.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .graph import Graph, Node, Value
from .registry import OpDef, register_op
from .types import Type


# ------------------------------------------------------------------ running
def interpret(graph: Graph, inputs: Sequence[Any]) -> list[Any]:
    """Run ``graph`` op by op on its torch implementations: the reference semantics of a body."""
    if len(inputs) != len(graph.inputs):
        raise TypeError(f"graph {graph.name} takes {len(graph.inputs)} inputs, got {len(inputs)}")
    env: dict[int, Any] = {id(v): x for v, x in zip(graph.inputs, inputs)}
    env.update((id(v), v.data) for v in graph.constants.values())
    for node in graph:
        args = [None if v is None else env[id(v)] for v in node.inputs]
        result = node.opdef.torch_impl(*args, **node.attrs)
        several = len(node.outputs) != 1 or callable(node.opdef.num_outputs) and isinstance(result, (tuple, list))
        results = result if several else [result]
        env.update((id(o), r) for o, r in zip(node.outputs, results))
    return [env[id(v)] for v in graph.outputs]


def region(*inputs: torch.Tensor, body: Graph, label: str = "") -> Any:
    """Run the body on the inputs; one output comes back bare, several as a tuple."""
    results = interpret(body, inputs)
    return results[0] if len(results) == 1 else tuple(results)


def _region_types(node: Node) -> list[Type]:
    return [v.type for v in node.attrs["body"].outputs]


def _region_is_pure(node: Node) -> bool:
    return all(n.is_pure for n in node.attrs["body"])


def state_load(default: torch.Tensor, key: str) -> torch.Tensor:
    """The tensor in slot ``key``; ``default`` while the slot is empty (always, outside an emitted module)."""
    return default


def state_store(value: torch.Tensor, key: str) -> torch.Tensor:
    """Keep ``value`` in slot ``key`` for the module's next calls; returns it."""
    return value


def _emit_region(node: Node, emit_body: Any, state: Any) -> torch.nn.Module:
    return emit_body(node.attrs["body"])


register_op(OpDef("region", region, category="opaque", infer=_region_types, pure_when=_region_is_pure,
                  num_outputs=lambda attrs: len(attrs["body"].outputs), torch_module=_emit_region,
                  doc=region.__doc__))
register_op(OpDef("state_load", state_load, category="opaque", pure=False, state_method="load",
                  doc=state_load.__doc__))
register_op(OpDef("state_store", state_store, category="opaque", pure=False, state_method="store",
                  doc=state_store.__doc__))


# ----------------------------------------------------------------- rewriting
@dataclass
class Extraction:
    """A set of nodes copied out as a standalone graph, and how it connects to the graph it came from."""

    body: Graph
    inputs: list[Value]
    """The outer values the set reads (not constants), in the order of ``body.inputs``."""
    outputs: list[Value]
    """The set's values read outside or returned by the graph, in the order of ``body.outputs``."""
    constants: list[Value]
    """The outer constants the set reads; the body has its own, sharing their tensors."""


def extract(nodes: Sequence[Node], name: str) -> Extraction:
    """Copy ``nodes`` (in execution order) into a standalone graph; the original is left as it is.

    The body's inputs are the values the set reads from outside, in first-read
    order; its outputs are the set's values read outside or returned.
    """
    members = {id(n) for n in nodes}
    body = Graph(name)
    mapping: dict[int, Value] = {}
    inputs: list[Value] = []
    constants: list[Value] = []
    for node in nodes:
        for v in node.inputs:
            if v is None or id(v) in mapping or (v.producer is not None and id(v.producer) in members):
                continue
            if v.is_constant:
                constants.append(v)
                inner = body.add_constant(v.data, v.name, v.is_parameter)
                inner.type, inner.meta = v.type, dict(v.meta)
            else:
                inner = body.add_input(v.name, v.type)
                inputs.append(v)
            mapping[id(v)] = inner
        copy = body.add_node(node.op, [None if v is None else mapping[id(v)] for v in node.inputs], node.attrs,
                             output_types=[o.type for o in node.outputs], name=node.name,
                             output_names=[o.name for o in node.outputs], meta=dict(node.meta))
        mapping.update((id(o), c) for o, c in zip(node.outputs, copy.outputs))
    outputs = [o for n in nodes for o in n.outputs if o.is_graph_output or any(id(u) not in members for u in o.users())]
    body.outputs = [mapping[id(o)] for o in outputs]
    return Extraction(body, inputs, outputs, constants)


def outline(graph: Graph, nodes: Sequence[Node], label: str = "") -> Node:
    """Replace ``nodes`` (a convex set of ``graph``'s nodes) by one ``region`` node holding them.

    The body is :func:`extract`'s, and the constants the set reads move into it
    (those also read outside stay). The region sits where the last member sat.
    """
    if len({id(n) for n in nodes}) != len(nodes) or not nodes:
        raise ValueError("outline needs a non-empty list of distinct nodes")
    order = {id(n): k for k, n in enumerate(graph)}
    ordered = sorted(nodes, key=lambda n: order[id(n)])
    part = extract(ordered, label or f"{graph.name}_region")
    region_node = graph.add_node("region", part.inputs, {"body": part.body, "label": label},
                                 output_types=[o.type for o in part.outputs], after=ordered[-1],
                                 name=label or "region")
    for old, new in zip(part.outputs, region_node.outputs):
        old.replace_by(new)
    for node in reversed(ordered):
        graph.remove_node(node)
    for v in part.constants:
        graph.remove_constant(v)  # kept when read outside the region too
    _sort_if_needed(graph, region_node)
    return region_node


def inline(node: Node) -> list[Node]:
    """Splice a region's body into its graph in the region's place; the nodes added."""
    graph = node.graph
    if graph is None or node.op != "region":
        raise ValueError(f"inline needs a region node of a graph, got {node.op}")
    body: Graph = node.attrs["body"]
    mapping: dict[int, Value] = {id(v): outer for v, outer in zip(body.inputs, node.inputs)}
    for v in body.constants.values():
        outer = graph.add_constant(v.data, v.name, v.is_parameter)
        outer.type, outer.meta = v.type, dict(v.meta)
        mapping[id(v)] = outer
    added = []
    for inner in body:
        copy = graph.add_node(inner.op, [None if v is None else mapping[id(v)] for v in inner.inputs],
                              inner.attrs, output_types=[o.type for o in inner.outputs], name=inner.name,
                              output_names=[o.name for o in inner.outputs], meta=dict(inner.meta), before=node)
        mapping.update((id(o), c) for o, c in zip(inner.outputs, copy.outputs))
        added.append(copy)
    for out, inner_out in zip(node.outputs, body.outputs):
        out.replace_by(mapping[id(inner_out)])
    graph.remove_node(node)
    return added


def _sort_if_needed(graph: Graph, region_node: Node) -> None:
    """The region sits at its last member: a reader of an earlier member's value that came before it moves."""
    order = {id(n): k for k, n in enumerate(graph)}
    here = order[id(region_node)]
    if any(order[id(u)] < here for u in region_node.users()):
        graph.sort()


def check_body(node: Node) -> str | None:
    """What is wrong with a region node's interface to its body, or None."""
    body = node.attrs["body"]
    if not isinstance(body, Graph):
        return f"its body is a {type(body).__name__}, not a Graph"
    if len(body.inputs) != len(node.inputs):
        return f"it has {len(node.inputs)} inputs, its body {len(body.inputs)}"
    for k, (v, inner) in enumerate(zip(node.inputs, body.inputs)):
        if v is None or v.type != inner.type:
            return f"input {k} is {None if v is None else v.type}, its body takes {inner.type}"
    for k, (out, inner) in enumerate(zip(node.outputs, body.outputs)):
        if out.type != inner.type:
            return f"output {k} is {out.type}, its body gives {inner.type}"
    return None
