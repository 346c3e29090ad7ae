"""Whole-graph views: a networkx graph for analyses, regions of linked nodes, a structural hash, a deep clone,
and the value keys that hashing and common-subexpression elimination share."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import networkx as nx
import torch

from .graph import Graph, Node, Value


def to_networkx(graph: Graph) -> nx.MultiDiGraph:
    """Nodes are IR nodes (plus ``input:``/``const:``/``output:`` endpoints); edges carry the value."""
    g = nx.MultiDiGraph(name=graph.name)
    for v in graph.inputs:
        g.add_node(f"input:{v.name}", kind="input", type=v.type)
    for v in graph.constants.values():
        g.add_node(f"const:{v.name}", kind="constant", type=v.type)
    for n in graph.nodes:
        g.add_node(n.name, kind="node", op=n.op, node=n)
    for n in graph.nodes:
        for i, v in enumerate(n.inputs):
            if v is not None:
                g.add_edge(_source(v), n.name, value=v.name, index=i)
    for k, v in enumerate(graph.outputs):
        g.add_node(f"output:{k}", kind="output", type=v.type)
        g.add_edge(_source(v), f"output:{k}", value=v.name, index=k)
    return g


def regions(members: Iterable[Node], linked: Callable[[Node, Value], bool]) -> list[list[Node]]:
    """Connected groups of ``members``, in graph order: a node joins its input's producer when
    both are members and ``linked(node, input)`` holds (union-find with path halving)."""
    members = list(members)
    parent = {id(n): n for n in members}

    def root(n: Node) -> Node:
        while parent[id(n)] is not n:
            parent[id(n)] = parent[id(parent[id(n)])]
            n = parent[id(n)]
        return n

    for node in members:
        for v in node.inputs:
            if v is not None and v.producer is not None and id(v.producer) in parent and linked(node, v):
                parent[id(root(node))] = root(v.producer)
    groups: dict[int, list[Node]] = {}
    for node in members:
        groups.setdefault(id(root(node)), []).append(node)
    return list(groups.values())


def _source(v: Value) -> str:
    if v.producer is not None:
        return v.producer.name
    return f"const:{v.name}" if v.is_constant else f"input:{v.name}"


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The elements' bytes in row-major order: equal for tensors of equal dtype, shape and contents.

    Whatever the strides (zero for an expanded tensor, anything for an empty
    one) and lazy conjugate or negative bits, only the values count.
    """
    if t.numel() == 0:
        return b""
    flat = t.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def attr_key(a: Any) -> Any:
    """A hashable key equal for equal attributes; unknown objects compare by identity."""
    if isinstance(a, torch.Tensor):
        return "tensor", a.dtype, tuple(a.shape), tensor_bytes(a)
    if isinstance(a, float):
        return "float", a.hex()  # tells 0.0 from -0.0, and keeps NaN equal to itself
    if isinstance(a, (list, tuple)):
        return "sequence", tuple(attr_key(x) for x in a)
    if isinstance(a, dict):
        return "dict", tuple(sorted((k, attr_key(x)) for k, x in a.items()))
    if a is None or isinstance(a, (bool, int, str, torch.dtype)):
        return type(a).__name__, a
    return "object", id(a)


def structural_hash(graph: Graph) -> str:
    """A hash of ops, attributes, types and wiring that ignores value and node names.

    Constant tensors contribute their type, not their data, so two models with the
    same architecture and different weights hash equal (what lowering caches want).
    """
    h = hashlib.sha256()
    ids: dict[int, str] = {}
    for k, v in enumerate(graph.inputs):
        ids[id(v)] = f"i{k}"
        h.update(f"in {k} {v.type};".encode())
    for k, v in enumerate(graph.constants.values()):
        ids[id(v)] = f"c{k}"
        h.update(f"const {k} {v.type};".encode())
    for j, n in enumerate(graph.nodes):
        for k, out in enumerate(n.outputs):
            ids[id(out)] = f"n{j}.{k}"
        ins = ",".join("_" if v is None else ids.get(id(v), "?") for v in n.inputs)
        attrs = ",".join(f"{key}={_hash_attr(a)}" for key, a in sorted(n.attrs.items()))
        outs = ",".join(str(o.type) for o in n.outputs)
        h.update(f"{n.op}({ins};{attrs})->{outs};".encode())
    h.update(("out " + ",".join(ids.get(id(v), "?") for v in graph.outputs)).encode())
    return h.hexdigest()[:16]


def _hash_attr(a: Any) -> str:
    if isinstance(a, Graph):
        return f"G{structural_hash(a)}"
    if isinstance(a, torch.Tensor):
        return f"T{a.dtype}{list(a.shape)}:{hashlib.sha256(a.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:8]}" if a.numel() <= 4096 else f"T{a.dtype}{list(a.shape)}"
    if hasattr(a, "SerializeToString"):
        return hashlib.sha256(a.SerializeToString()).hexdigest()[:8]
    if isinstance(a, (list, tuple)):
        return "[" + ",".join(_hash_attr(x) for x in a) + "]"
    return repr(a)


def clone(graph: Graph) -> Graph:
    """A structural copy: new nodes and values (region bodies included), constant tensors shared."""
    new = Graph(graph.name)
    new.meta = dict(graph.meta)
    mapping: dict[int, Value] = {}
    for v in graph.inputs:
        nv = new.add_input(v.name, v.type)
        nv.meta = dict(v.meta)
        mapping[id(v)] = nv
    for v in graph.constants.values():
        nv = new.add_constant(v.data, v.name, v.is_parameter)
        nv.type = v.type
        nv.meta = dict(v.meta)
        mapping[id(v)] = nv
    for n in graph.nodes:
        attrs = {k: a.clone() if isinstance(a, Graph) else a for k, a in n.attrs.items()}  # bodies are owned
        nn_ = new.add_node(n.op, [None if v is None else mapping[id(v)] for v in n.inputs], attrs,
                           output_types=[o.type for o in n.outputs], name=n.name,
                           output_names=[o.name for o in n.outputs], meta=dict(n.meta))
        for o, no in zip(n.outputs, nn_.outputs):
            no.meta = dict(o.meta)
            mapping[id(o)] = no
    new.outputs = [mapping[id(v)] for v in graph.outputs]
    return new
