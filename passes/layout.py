"""Layout passes: transposes that cancel, channels-last conv regions, token permutations.

A layout transform (a ``permute``, or a ``take`` whose index is a constant
permutation of one dim) is pushed forward through the ops that commute with
it, so that it meets its inverse and both vanish. One engine serves both
kinds (``_propagate``): a transform is held *pending* on the value it would
permute, each op that commutes with it is re-issued on the un-permuted
operands (a *shadow*), a transform that meets a pending one composes with it
(and disappears when the composition is the identity), and every other reader
gets the transform back, built once on the shadow. The originals are then
dead. A rewrite is kept only when it leaves fewer transforms and no more other
nodes, so a transform that cannot meet its inverse is never moved for nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from graphopt.ir import Graph, Node, TensorType, Value
from graphopt.ir.analysis import regions
from graphopt.ir.registry import node_flops
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass


Key = Hashable
Pending = tuple[Value, Key]
Operand = Value | torch.Tensor | None
"""A shadow operand: an existing value, or the data of a new constant."""


@dataclass
class _Shadow:
    """How to re-issue a node on un-permuted operands, and the transform its result then needs."""

    inputs: list[Operand]
    attrs: dict[str, Any]
    key: Key
    output_keys: list[Key] | None = None
    """Per-output keys, for multi-output ops whose outputs need different transforms (``split``)."""


# ------------------------------------------------------------------ helpers
def _shape(v: Value | None) -> tuple | None:
    return v.type.shape if v is not None and isinstance(v.type, TensorType) else None


def _rank(v: Value | None) -> int | None:
    shape = _shape(v)
    return None if shape is None else len(shape)


def _usable_constant(v: Value, inference: bool) -> bool:
    """A constant that may be replaced by a rearranged copy: never a trainable parameter unless ``inference``."""
    return v.is_constant and (inference or not v.is_trainable)


def _constant_data(v: Value, inference: bool) -> torch.Tensor | None:
    """The data of a usable constant, or of a pure unary elementwise op of one (a ``cast`` of a float64 sincos
    table that folding left computed because it is large), computed here; None for anything else."""
    if _usable_constant(v, inference):
        return v.data
    node = v.producer
    if node is None or not _elementwise(node) or len(node.inputs) != 1 or node.opdef.torch_impl is None:
        return None
    x = node.inputs[0]
    return node.opdef.torch_impl(x.data, **node.attrs) if x is not None and _usable_constant(x, inference) else None


def _inverse(perm: Sequence[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _trailing_dims(node: Node) -> int:
    """How many trailing dims ``linear`` and the norms over a ``normalized_shape`` act on; 0 for other ops."""
    if node.op == "linear":
        return 1
    return len(node.attrs["normalized_shape"]) if "normalized_shape" in node.attrs else 0


def _dims_named(node: Node) -> set[int]:
    """The input dims that ``node``'s dim attributes name."""
    dims: set[int] = set()
    for name in node.opdef.dim_attrs:
        value = node.attrs[name]
        dims.update([value] if isinstance(value, int) else value)
    return dims


def _reduces_dims(node: Node) -> bool:
    """A reduction over a given list of ``dims`` (``dims=None`` reduces everything)."""
    return node.opdef.reduction and "dims" in node.opdef.dim_attrs and node.attrs["dims"] is not None


def _permuted_dim_attrs(node: Node, key: Key) -> dict[str, Any]:
    """``node``'s attributes for reading the input before the permute ``key``: each named dim ``d`` becomes ``key[d]``."""
    attrs = dict(node.attrs)
    for name in node.opdef.dim_attrs:
        value = attrs[name]
        attrs[name] = key[value] if isinstance(value, int) else [key[d] for d in value]
    return attrs


def _elementwise(node: Node) -> bool:
    return node.opdef.category == "elementwise" and node.is_pure and len(node.outputs) == 1


class _Kind:
    """A family of layout transforms: how to recognise, compose, build and commute them."""

    pass_name: str

    def key(self, node: Node) -> Key | None:
        raise NotImplementedError

    def compose(self, inner: Key, outer: Key) -> Key | None:
        raise NotImplementedError

    def is_identity(self, key: Key) -> bool:
        raise NotImplementedError

    def build(self, graph: Graph, v: Value, key: Key, before: Node | None) -> Value:
        raise NotImplementedError

    def commute(self, node: Node, pending: list[Pending | None], inference: bool) -> _Shadow | None:
        raise NotImplementedError

    def starts(self, graph: Graph, seed: Key) -> list[list[tuple[Value, Key]]]:
        """Where a region of transforms of class ``seed`` could start early (see ``_hoist``): groups of
        (value, key), each value to be read through a pair ``inverse(key)`` then ``key``."""
        return []


# ----------------------------------------------------------------- permutes
class _Permutes(_Kind):
    """``permute`` nodes; the key is the normalised ``dims`` tuple."""

    pass_name = "sink_transposes"

    def key(self, node: Node) -> Key | None:
        if node.op != "permute":
            return None
        dims = node.attrs["dims"]
        return tuple(d % len(dims) for d in dims)

    def compose(self, inner: Key, outer: Key) -> Key | None:
        return tuple(inner[d] for d in outer) if len(inner) == len(outer) else None

    def is_identity(self, key: Key) -> bool:
        return tuple(key) == tuple(range(len(key)))

    def build(self, graph: Graph, v: Value, key: Key, before: Node | None) -> Value:
        meta = {"created_by": self.pass_name}
        return graph.add_node("permute", [v], {"dims": list(key)}, before=before, meta=meta).output

    def commute(self, node: Node, pending: list[Pending | None], inference: bool) -> _Shadow | None:
        key = next(p[1] for p in pending if p is not None)
        rank = len(key)
        x = pending[0]
        if _elementwise(node):
            return self._elementwise(node, pending, key, inference)
        if node.op == "concat" and all(p is not None and p[1] == key for p in pending):
            return _Shadow([p[0] for p in pending], _permuted_dim_attrs(node, key), key)
        if x is None or any(p is not None for p in pending[1:]):
            return None
        if node.opdef.keeps_dims:
            return _Shadow([x[0], *node.inputs[1:]], _permuted_dim_attrs(node, key), key)
        if _reduces_dims(node):
            return self._reduction(node, x[0], key)
        if node.op == "reshape":
            return self._reshape(node, x[0], key)
        trailing = _trailing_dims(node)
        if trailing and all(key[d] == d for d in range(rank - trailing, rank)):
            return _Shadow([x[0], *node.inputs[1:]], dict(node.attrs), key)
        return None

    @staticmethod
    def _elementwise(node: Node, pending: list[Pending | None], key: Key, inference: bool) -> _Shadow | None:
        out_shape = _shape(node.output)
        inv = _inverse(key)
        inputs: list[Operand] = []
        for v, p in zip(node.inputs, pending):
            if p is not None:
                if p[1] != key or _shape(v) != out_shape:
                    return None  # a different permutation, or a broadcast that makes the permute costlier
                inputs.append(p[0])
            elif v is None or _rank(v) == 0:
                inputs.append(v)
            elif _usable_constant(v, inference) and v.data.dim() <= len(key):
                full = v.data.reshape((1,) * (len(key) - v.data.dim()) + tuple(v.data.shape))
                inputs.append(full.permute(inv).contiguous())
            else:
                return None
        return _Shadow(inputs, dict(node.attrs), key)

    @staticmethod
    def _reshape(node: Node, x: Value, key: Key) -> _Shadow | None:
        """A reshape of leading dims the permute leaves in place (batch and heads merged, say) commutes with it."""
        before, after, source = _shape(node.inputs[0]), _shape(node.output), _shape(x)
        if not all(s is not None and all(isinstance(d, int) for d in s) for s in (before, after, source)):
            return None
        common = 0
        while common < min(len(before), len(after)) and before[-1 - common] == after[-1 - common]:
            common += 1
        lead_in, lead_out = len(before) - common, len(after) - common
        if lead_in == 0 or lead_out == 0 or any(key[d] != d for d in range(lead_in)):
            return None
        shape = [*after[:lead_out], *source[lead_in:]]
        return _Shadow([x], {**node.attrs, "shape": shape},
                       (*range(lead_out), *(lead_out + key[d] - lead_in for d in range(lead_in, len(key)))))

    @staticmethod
    def _reduction(node: Node, x: Value, key: Key) -> _Shadow:
        rank = len(key)
        reduced = {d % rank for d in node.attrs["dims"]}
        attrs = {**node.attrs, "dims": sorted(key[d] for d in reduced)}
        if node.attrs["keepdim"]:
            return _Shadow([x], attrs, key)
        kept = [key[i] for i in range(rank) if i not in reduced]
        order = sorted(kept)
        return _Shadow([x], attrs, tuple(order.index(k) for k in kept))


# ------------------------------------------------------- token permutations
class _TokenPermutations(_Kind):
    """``take`` nodes whose index is a constant permutation of the dim: key ``(axis, perm)``."""

    pass_name = "fold_token_permutations"

    def key(self, node: Node) -> Key | None:
        if node.op != "take":
            return None
        x, index = node.inputs
        shape = _shape(x)
        if shape is None or not index.is_constant or index.data.dim() != 1 or index.data.is_floating_point():
            return None
        axis = node.attrs["axis"] % len(shape)
        size = shape[axis]
        perm = tuple(int(i) % size for i in index.data.tolist()) if isinstance(size, int) else ()
        if len(perm) != size or sorted(perm) != list(range(size)):
            return None
        return axis, perm

    def compose(self, inner: Key, outer: Key) -> Key | None:
        (a, p), (b, q) = inner, outer
        return (a, tuple(p[i] for i in q)) if a == b else None

    def is_identity(self, key: Key) -> bool:
        return key[1] == tuple(range(len(key[1])))

    def build(self, graph: Graph, v: Value, key: Key, before: Node | None) -> Value:
        axis, perm = key
        return permute_tokens(graph, v, perm, axis, before=before)

    def commute(self, node: Node, pending: list[Pending | None], inference: bool) -> _Shadow | None:
        key = next(p[1] for p in pending if p is not None)
        axis = key[0]
        x = pending[0]
        if _elementwise(node):
            return self._elementwise(node, pending, key, inference)
        if node.op == "sdpa":
            return self._attention(node, pending, key)
        rank = _rank(node.inputs[0])
        along_tokens = node.op in ("concat", "slice", "split") and node.attrs["dim"] % rank == axis
        if along_tokens and node.op == "concat":
            return self._concat(node, pending, axis)
        if node.op == "concat" and all(p is not None and p[1] == key for p in pending):
            return _Shadow([p[0] for p in pending], dict(node.attrs), key)  # along other dims, parts alike
        if x is None or any(p is not None for p in pending[1:]):
            return None
        if along_tokens:
            return self._slice(node, x, key) if node.op == "slice" else self._split(node, x, key)
        same = _Shadow([x[0], *node.inputs[1:]], dict(node.attrs), key)
        if node.op == "linear" or (node.op == "matmul" and (_rank(node.inputs[1]) or 3) <= 2):
            return same if axis < rank - 1 else None
        if "normalized_shape" in node.attrs:
            return same if axis < rank - _trailing_dims(node) else None
        if node.opdef.keeps_dims:
            return same if axis not in {d % rank for d in _dims_named(node)} else None
        if node.opdef.reshapes:
            return self._reshape(node, x, key)
        if node.op == "permute":
            dims = [d % rank for d in node.attrs["dims"]]
            return _Shadow([x[0]], dict(node.attrs), (dims.index(axis), key[1]))
        if _reduces_dims(node):
            reduced = {d % rank for d in node.attrs["dims"]}
            if axis in reduced:
                return None
            shift = 0 if node.attrs["keepdim"] else sum(d < axis for d in reduced)
            return _Shadow([x[0]], dict(node.attrs), (axis - shift, key[1]))
        return None

    @staticmethod
    def _elementwise(node: Node, pending: list[Pending | None], key: Key, inference: bool) -> _Shadow | None:
        axis, perm = key
        out_shape = _shape(node.output)
        inputs: list[Operand] = []
        for v, p in zip(node.inputs, pending):
            shape = _shape(v)
            if p is not None:  # broadcasting along other dims is fine (an rms_norm's ``x * rsqrt(...)``)
                if p[1] != key or len(shape) != len(out_shape) or shape[axis] != out_shape[axis]:
                    return None
                inputs.append(p[0])
                continue
            own_axis = None if shape is None else axis - (len(out_shape) - len(shape))
            if v is None or (own_axis is not None and (own_axis < 0 or shape[own_axis] == 1)):
                inputs.append(v)  # constant along the token dim: the permutation does not see it
            elif own_axis is not None and shape[own_axis] == len(perm) and (
                    data := _constant_data(v, inference)) is not None:
                inputs.append(data.index_select(own_axis, torch.tensor(_inverse(perm))))
            else:
                return None
        return _Shadow(inputs, dict(node.attrs), key)

    @staticmethod
    def _reshape(node: Node, x: Pending, key: Key) -> _Shadow | None:
        """A reshape (``squeeze``, ...) that keeps the token dim whole: the dims up to it unchanged, or unit
        dims added or dropped around it (an ``unsqueeze`` of a rotary table)."""
        axis, perm = key
        shape_in, shape_out = _shape(node.inputs[0]), _shape(node.output)
        if shape_out is None:
            return None
        if shape_in[:axis + 1] == shape_out[:axis + 1]:
            return _Shadow([x[0], *node.inputs[1:]], dict(node.attrs), key)
        if [d for d in shape_in if d != 1] != [d for d in shape_out if d != 1]:
            return None
        kept = sum(d != 1 for d in shape_in[:axis])
        return _Shadow([x[0], *node.inputs[1:]], dict(node.attrs),
                       ([i for i, d in enumerate(shape_out) if d != 1][kept], perm))

    @staticmethod
    def _concat(node: Node, pending: list[Pending | None], axis: int) -> _Shadow | None:
        """Concatenating tokens: the result's permutation is the parts' permutations side by side."""
        perm: list[int] = []
        inputs: list[Operand] = []
        for v, p in zip(node.inputs, pending):
            if p is not None and p[1][0] != axis:
                return None
            size = _shape(v)[axis] if _rank(v) is not None else None
            if not isinstance(size, int):
                return None
            perm += [len(perm) + i for i in (p[1][1] if p is not None else range(size))]
            inputs.append(v if p is None else p[0])
        return _Shadow(inputs, dict(node.attrs), (axis, tuple(perm)))

    @staticmethod
    def _slice(node: Node, x: Pending, key: Key) -> _Shadow | None:
        """A slice of tokens that the permutation maps onto itself (e.g. text tokens apart from video tokens)."""
        axis, perm = key
        a = node.attrs
        if a["step"] != 1:
            return None
        start, end, _ = slice(a["start"], a["end"]).indices(len(perm))
        block = _block(perm, start, end)
        return None if block is None else _Shadow([x[0]], dict(a), (axis, block))

    @staticmethod
    def _split(node: Node, x: Pending, key: Key) -> _Shadow | None:
        """Splitting tokens into parts that the permutation maps onto themselves: each part keeps its own."""
        axis, perm = key
        starts = [sum(node.attrs["sizes"][:k]) for k in range(len(node.attrs["sizes"]) + 1)]
        blocks = [_block(perm, start, end) for start, end in zip(starts, starts[1:])]
        if any(b is None for b in blocks):
            return None
        return _Shadow([x[0]], dict(node.attrs), key, [(axis, b) for b in blocks])

    @staticmethod
    def _attention(node: Node, pending: list[Pending | None], key: Key) -> _Shadow | None:
        """Permuting the queries permutes the output rows; permuting keys and values together changes nothing."""
        q, k, v, *mask = pending
        if q is None or q[1] != key or key[0] != _rank(node.inputs[0]) - 2:
            return None
        given = node.inputs[3] if len(node.inputs) > 3 else None
        per_row = given is not None and (_shape(given) or (0, 0))[-2] != 1
        if any(m is not None for m in mask) or (given is not None and (k is not None or per_row)):
            return None  # a mask the same for every query row (a text key mask) only while keys stay put
        if node.attrs["is_causal"]:
            return None
        if (k is None) != (v is None) or (k is not None and (k[1] != v[1] or k[1][0] != _rank(node.inputs[1]) - 2)):
            return None  # keys and values must be permuted together, along their token dim
        kv = list(node.inputs[1:3]) if k is None else [k[0], v[0]]
        return _Shadow([q[0], *kv, *node.inputs[3:]], dict(node.attrs), key)

    def starts(self, graph: Graph, seed: Key) -> list[list[tuple[Value, Key]]]:
        """The values where tokens first appear (graph inputs, and results of nodes none of whose inputs has
        a dim as long as any part of the seed's permutation: a patch embedding's flatten, a rotary table),
        grouped by length, each with the part of the permutation a sequence that long can be (``_parts``)."""
        parts = _parts(seed[1], {d for v in graph.values() for d in _shape(v) or () if isinstance(d, int)})
        lengths = {size for size, _ in parts}
        groups = []
        for size, part in parts:
            group = []
            for v in [*graph.inputs, *(out for n in graph.nodes for out in n.outputs)]:
                axes = [a for a, d in enumerate(_shape(v) or ()) if d == size]
                read = v.producer.inputs if v.producer is not None else ()
                if len(axes) == 1 and not any(lengths & set(_shape(x) or ()) for x in read):
                    group.append((v, (axes[0], part)))
            if group:
                groups.append(group)
        return groups


def _parts(perm: tuple[int, ...], sizes: set[int]) -> list[tuple[int, tuple[int, ...]]]:
    """``(size, part)``: each block of ``size`` positions that ``perm`` maps onto itself while fixing every
    position outside it, renumbered from 0 (the video tokens of a permuted joint text-and-video sequence)."""
    moved = [i for i, j in enumerate(perm) if i != j]
    if not moved:
        return []
    parts = []
    for size in sorted(s for s in sizes if moved[-1] - moved[0] < s <= len(perm)):
        for start in range(max(0, moved[-1] + 1 - size), min(moved[0], len(perm) - size) + 1):
            part = _block(perm, start, start + size)
            if part is not None and (size, part) not in parts:
                parts.append((size, part))
    return parts


def _block(perm: tuple[int, ...], start: int, end: int) -> tuple[int, ...] | None:
    """``perm`` restricted to positions ``start:end``, renumbered from 0; None if it reaches outside them."""
    block = perm[start:end]
    if any(not start <= j < end for j in block):
        return None
    return tuple(j - start for j in block)


PERMUTES = _Permutes()
TOKEN_PERMUTATIONS = _TokenPermutations()


# ------------------------------------------------------------------- engine
def _propagate(graph: Graph, kind: _Kind, seeds: Collection[Key], inference: bool) -> None:
    """Hold every transform with a key in ``seeds`` pending, shadow what commutes, rebuild the rest (see
    module doc)."""
    pending: dict[int, Pending] = {}
    built: dict[tuple[int, Key], Value] = {}
    bypassed: list[Node] = []

    def materialize(p: Pending, before: Node | None) -> Value:
        shadow, key = p
        if kind.is_identity(key):
            return shadow
        if (id(shadow), key) not in built:
            built[id(shadow), key] = kind.build(graph, shadow, key, before)
        return built[id(shadow), key]

    def settle(node: Node, results: list[Pending]) -> None:
        """The node's results are ``results``: equal to their shadows outright when the key is the identity."""
        for out, p in zip(node.outputs, results):
            if kind.is_identity(p[1]) and out.can_be_replaced_by(p[0]):
                out.replace_by(p[0])
            else:
                pending[id(out)] = p
        bypassed.append(node)

    for node in graph.nodes:
        ins = [None if v is None else pending.get(id(v)) for v in node.inputs]
        key = kind.key(node)
        if key is not None and ins[0] is not None and (combined := kind.compose(ins[0][1], key)) is not None:
            settle(node, [(ins[0][0], combined)])
        elif key in seeds and ins[0] is None:
            settle(node, [(node.inputs[0], key)])
        elif any(p is not None for p in ins):
            shadow = kind.commute(node, ins, inference) if node.is_pure else None
            if shadow is not None:
                outputs = _issue(graph, node, shadow, kind.pass_name).outputs
                settle(node, list(zip(outputs, shadow.output_keys or [shadow.key] * len(outputs))))
            else:
                for i, p in enumerate(ins):
                    if p is not None:
                        node.replace_input(i, materialize(p, node))
    for out in list(graph.outputs):
        if id(out) in pending:
            rebuilt = materialize(pending[id(out)], None)
            if out.can_be_replaced_by(rebuilt):
                out.replace_by(rebuilt)
    for node in reversed(bypassed):
        if node.graph is not None and node.is_unused:
            graph.remove_node(node)
    for node in reversed(graph.nodes):  # transforms that only fed bypassed ones (the first of a hoisted pair)
        if kind.key(node) is not None and node.is_unused:
            graph.remove_node(node)
    graph.remove_unused_constants()


def _issue(graph: Graph, node: Node, shadow: _Shadow, created_by: str) -> Node:
    inputs = [graph.add_constant(x, f"{node.name}_operand") if isinstance(x, torch.Tensor) else x
              for x in shadow.inputs]
    meta = {**node.meta, "created_by": created_by}
    return graph.add_node(node.op, inputs, shadow.attrs, before=node, meta=meta)


def _count(graph: Graph, kind: _Kind) -> tuple[int, int]:
    transforms = sum(kind.key(n) is not None for n in graph.nodes)
    return transforms, len(graph) - transforms


def _hoist(graph: Graph, start: list[tuple[Value, Key]]) -> set[Key]:
    """Read each value of ``start`` through ``inverse(key)`` then ``key`` (the graph computes the same), so
    that the second transform can sink from where the tokens first appear: a class of transforms that each
    sit behind an op that does not commute (a residual add of a stream that is not permuted) can then
    meet its inverses, with the region beginning once, at its start, instead of once per layer."""
    for v, key in start:
        axis, perm = key
        insert_token_permutation(graph, insert_token_permutation(graph, v, _inverse(perm), axis), perm, axis)
    return {key for _, key in start}


def _improves(trial: Graph, graph: Graph, kind: _Kind) -> bool:
    """Fewer transforms and no more other nodes."""
    now, then = _count(graph, kind), _count(trial, kind)
    return then[0] < now[0] and then[1] <= now[1]


def _cancel_transforms(graph: Graph, kind: _Kind, inference: bool) -> dict[str, int]:
    """Try each class of transforms (equal keys) on a copy, sunk from where it is and, failing that, from
    where its tokens first appear (``_hoist``); keep the tries that remove transforms."""
    seeds = list(dict.fromkeys(k for n in graph.nodes if (k := kind.key(n)) is not None))
    before = _count(graph, kind)
    hoisted = 0
    for seed in seeds:
        if _try(graph, kind, lambda g: {seed}, inference):
            continue
        for i in range(len(kind.starts(graph, seed))):
            if _try(graph, kind, lambda g: {seed, *_hoist(g, kind.starts(g, seed)[i])}, inference):
                hoisted += 1
                break
    after = _count(graph, kind)
    return {"classes_tried": len(seeds), "transforms_before": before[0], "transforms_after": after[0],
            "regions_hoisted": hoisted}


def _try(graph: Graph, kind: _Kind, prepare: Callable[[Graph], set[Key]], inference: bool) -> bool:
    """Sink the seeds ``prepare`` gives (after changing the graph as it does) on a copy; do it on ``graph``
    too when that removes transforms."""
    trial = graph.clone()
    try:
        _propagate(trial, kind, prepare(trial), inference)
    except TypeError:  # a rebuilt node reads a value of unknown rank: it cannot be typed, so leave it
        return False
    if not _improves(trial, graph, kind):
        return False
    _propagate(graph, kind, prepare(graph), inference)
    return True


# ----------------------------------------------------------- the passes
@register_pass
@dataclass
class SinkTransposes(Pass):
    """Push ``permute`` nodes forward through the ops that commute with them, so that pairs cancel.

    Transpose sinking as in onnxruntime's transpose optimizer and TVM's
    ``SimplifyExpr``/layout rewriting (Chen et al. 2018, "TVM", §4.1): a
    permute passes through elementwise ops whose other operands are the same
    permute, 0-d values, or constants (given a permuted copy; right-aligned
    broadcasting is kept by padding the constant to full rank first), through
    ``concat`` of equally permuted inputs, ``softmax``/``log_softmax``/``cumsum``
    and reductions (the dims are renamed), and through ``layer_norm``/``rms_norm``
    and ``linear`` when it leaves their trailing dims in place. A permute may
    have any number of readers: those that commute get shadows, the others get
    the permute back, and the rewrite of a class of equal permutes is kept only
    if it leaves fewer permutes and no other extra node. An elementwise op that
    would broadcast the permuted operand to a larger shape stops the sinking.

    Constants that are trainable parameters of a torch capture are never
    replaced by permuted copies unless ``inference`` is set (see
    ``is_trainable``). Consecutive permutes that do not cancel are composed by
    ``eliminate_noops``.
    """

    name = "sink_transposes"
    kind = PassKind.EXACT

    inference: bool = False

    def call(self, graph: Graph) -> PassResult:
        stats = _cancel_transforms(graph, PERMUTES, self.inference)
        return PassResult(graph, stats["transforms_after"] < stats["transforms_before"], stats)


@register_pass
@dataclass
class FoldTokenPermutations(Pass):
    """Cancel token permutations (``take`` by a constant permutation of one dim) against their inverses.

    The token-permutation counterpart of ``sink_transposes``: a permutation of
    the token dim commutes with every op that treats tokens independently,
    elementwise ops (other operands constant along that dim, equally permuted,
    or constants given a permuted copy), ``linear``/``matmul`` by a matrix and
    ``layer_norm``/``rms_norm``/``softmax`` over other dims, reductions over
    other dims, reshapes that keep the dims up to the token dim, ``permute``
    (the token dim is renamed) and attention without a mask: permuting the
    queries permutes the output rows, while keys and values permuted together
    give the same output (attention is a set operation over keys, Lee et al.
    2019, "Set Transformer"). Along the token dim itself, a ``concat`` puts
    its parts' permutations side by side (unpermuted parts as identities) and
    a ``slice``/``split`` keeps a part that the permutation maps onto itself:
    text tokens joined to permuted video tokens for attention and split off
    again. Permutations of the same dim compose; the identity vanishes.

    A class of permutations that sinking cannot cancel, because each sits
    behind an op whose other operand is not permuted (the residual add of
    every transformer layer), is tried again from where its tokens first
    appear: the values there (a patch embedding's flatten, rotary tables) are
    read through a permutation and its inverse, and the inverse sinks through
    the whole stack, meeting each layer's permutation on the way. The region
    then begins once and ends once instead of at every layer.

    Used to run attention on a reordered token sequence (e.g. frame-major
    video tokens made token-major) with the reorderings cancelled across the
    token-wise ops around it.
    """

    name = "fold_token_permutations"
    kind = PassKind.EXACT

    inference: bool = False

    def call(self, graph: Graph) -> PassResult:
        stats = _cancel_transforms(graph, TOKEN_PERMUTATIONS, self.inference)
        return PassResult(graph, stats["transforms_after"] < stats["transforms_before"], stats)


def permute_tokens(graph: Graph, value: Value, perm: Sequence[int], dim: int, before: Node | None = None) -> Value:
    """A new ``take(value, perm; axis=dim)`` node: ``out[..., i, ...] = value[..., perm[i], ...]``."""
    index = graph.add_constant(torch.tensor(list(perm), dtype=torch.int64), "token_perm")
    after = None if before is not None or value.producer is None else value.producer
    if before is None and after is None:
        before = graph.nodes[0] if len(graph) else None
    meta = {"created_by": "fold_token_permutations"}
    return graph.add_node("take", [value, index], {"axis": dim}, before=before, after=after, meta=meta).output


def insert_token_permutation(graph: Graph, value: Value, perm: Sequence[int], dim: int) -> Value:
    """Make every reader of ``value`` read it with its tokens (dim ``dim``) reordered by ``perm``.

    The graph then computes something else unless the readers are undone by
    ``insert_inverse_token_permutation`` where the permuted region ends.
    """
    readers = value.uses()
    was_output = any(out is value for out in graph.outputs)
    permuted = permute_tokens(graph, value, perm, dim)
    for node, i in readers:
        node.replace_input(i, permuted)
    if was_output:
        graph.outputs = [permuted if out is value else out for out in graph.outputs]
    return permuted


def insert_inverse_token_permutation(graph: Graph, value: Value, perm: Sequence[int], dim: int) -> Value:
    """Undo ``perm`` on ``value`` for all its readers (the closing half of ``insert_token_permutation``)."""
    return insert_token_permutation(graph, value, _inverse(perm), dim)


# ------------------------------------------------------------ channels last
def _nhwc_capable(node: Node) -> bool:
    """Ops whose torch kernels keep a channels-last input channels-last (4-D results only)."""
    if len(node.outputs) != 1 or _rank(node.output) != 4 or "layout" in node.meta:
        return False
    if node.op == "conv":
        return not node.attrs["transposed"]
    if node.op == "concat":
        return node.attrs["dim"] % 4 == 1
    return node.opdef.channels_last_kernel or _elementwise(node)


def _regions(graph: Graph) -> list[list[Node]]:
    """Connected groups of channels-last-capable nodes linked by 4-D values."""
    return regions((n for n in graph.nodes if _nhwc_capable(n)), lambda node, v: _rank(v) == 4)


def _is_permute(node: Node | None, dims: tuple[int, ...]) -> bool:
    return node is not None and node.op == "permute" and tuple(d % 4 for d in node.attrs["dims"]) == dims


_TO_NHWC, _TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def _reads_outside(v: Value, inside: set[int]) -> list[tuple[Node, int]]:
    """Outside readers that need NCHW memory; a permute to NHWC reads a channels-last tensor as a contiguous view."""
    return [(n, i) for n, i in v.uses() if id(n) not in inside and not _is_permute(n, _TO_NHWC)]


def _boundary(graph: Graph, region: list[Node]) -> tuple[list[Value], list[Value]]:
    """4-D activations entering the region, and region results that outside readers need in NCHW (or returned)."""
    inside = {id(n) for n in region}
    entering = list(dict.fromkeys(
        v for n in region for v in n.inputs
        if v is not None and not v.is_constant and _rank(v) == 4
        and (v.producer is None or id(v.producer) not in inside)))
    leaving = [out for n in region for out in n.outputs
               if _reads_outside(out, inside) or any(o is out for o in graph.outputs)]
    return entering, leaving


def _conversion_bytes(values: list[Value]) -> int:
    """A layout conversion reads and writes each value once; none is needed for a permute from NHWC
    (of a contiguous tensor: it is channels-last already, and ``contiguous`` returns it as is)."""
    return sum(2 * (v.type.nbytes or 0) for v in values if not _is_permute(v.producer, _TO_NCHW))


@register_pass
@dataclass
class ChannelsLast(Pass):
    """Run conv regions in NHWC (channels-last) memory format, converting only at region boundaries.

    Layout propagation as in TVM's ``ConvertLayout`` and oneDNN's blocked-format
    propagation (Liu et al. 2019, "Optimizing CNN model inference on CPUs",
    §3.2): convs, batch norms, pools, elementwise ops and channel concats that
    are connected by 4-D values form a region; it gets one conversion per
    entering activation and one back per result read outside. In torch this
    is a memory format, not a permutation: the conversions are
    ``contiguous(x; memory_format)`` nodes (Identity in ONNX), the region's
    nodes are marked ``meta["layout"] = "NHWC"``, and torch's kernels keep a
    channels-last input channels-last, so values and shapes are unchanged
    and no parameter is touched (trainable graphs stay trainable).

    A region is converted only if it has at least ``min_convs`` convs and its
    conv FLOPs per byte of conversion traffic reach ``min_flops_per_byte``: a
    conversion is memory-bound, and channels-last speeds up a conv by a
    fraction of its compute, so the work must outweigh the copies by about the
    machine balance divided by that fraction (10 FLOP/B / 0.2 = 50).
    """

    name = "channels_last"
    kind = PassKind.EXACT

    min_convs: int = 2
    min_flops_per_byte: float = 50.0

    def call(self, graph: Graph) -> PassResult:
        converted = conversions = 0
        for region in _regions(graph):
            convs = [n for n in region if n.op == "conv"]
            entering, leaving = _boundary(graph, region)
            traffic = _conversion_bytes(entering) + _conversion_bytes(leaving)
            if len(convs) < self.min_convs or sum(map(node_flops, convs)) < self.min_flops_per_byte * traffic:
                continue
            conversions += _convert_region(graph, region, entering, leaving)
            converted += 1
        return PassResult(graph, bool(converted), {"regions": converted, "conversions": conversions})


def _convert_region(graph: Graph, region: list[Node], entering: list[Value], leaving: list[Value]) -> int:
    inside = {id(n) for n in region}
    meta = {"created_by": "channels_last", "layout": "NHWC"}
    for node in region:
        node.meta["layout"] = "NHWC"
    for v in entering:
        uses = [(n, i) for n, i in v.uses() if id(n) in inside]
        first = min((n for n, _ in uses), key=graph.nodes.index)
        nhwc = graph.add_node("contiguous", [v], {"memory_format": "channels_last"}, before=first, meta=meta).output
        for n, i in uses:
            n.replace_input(i, nhwc)
    for v in leaving:
        meta_back = {"created_by": "channels_last"}
        nchw = graph.add_node("contiguous", [v], {"memory_format": "contiguous_format"}, after=v.producer,
                              meta=meta_back)
        for n, i in _reads_outside(v, inside):
            if n is not nchw:
                n.replace_input(i, nchw.output)
        if any(o is v for o in graph.outputs):
            _return_instead(graph, v, nchw.output)
    return len(entering) + len(leaving)


def _return_instead(graph: Graph, old: Value, new: Value) -> None:
    """Return ``new`` where the graph returned ``old``, under the output's name."""
    graph.outputs = [new if o is old else o for o in graph.outputs]
    old.name, new.name = new.name, old.name
