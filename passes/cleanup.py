"""Cleanup passes, pipeline O1: dead code, common subexpressions, no-op ops.

All of them are exact: the rewritten graph computes the same outputs, bit for
bit unless a docstring says otherwise. The other members of the pipeline
live in ``constant_folding.py`` (folding) and ``canonicalize.py`` (re-import
of ONNX nodes that folding made canonical).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from graphopt.ir import Graph, Node, Value
from graphopt.ir.analysis import attr_key, tensor_bytes
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass

CLEANUP_PIPELINE = ["fold_constants", "refine_onnx_opaque", "eliminate_noops", "cse", "dce"]
"""Folding first (it turns shape computations into constants, which makes
reshapes static and no-ops visible), then re-importing the ONNX nodes that
folding made canonical, then no-ops, then merging and sweeping."""


# ---------------------------------------------------------------------- DCE
@register_pass
@dataclass
class EliminateDeadCode(Pass):
    """Remove pure nodes whose results nothing reads, then constants nothing reads.

    Dead-code elimination on SSA form (Cytron et al. 1991, "Efficiently computing
    static single assignment form", §7.1; Aho et al., *Compilers*, §8.5.4):
    walking the nodes backwards, a pure node with no live output is dead, and
    removing it can kill its producers within the same walk. Impure nodes
    (opaque calls, training dropout) stay for their effects; a multi-output
    node goes only when all of its outputs are dead.
    """

    name = "dce"
    kind = PassKind.EXACT

    def call(self, graph: Graph) -> PassResult:
        removed = 0
        for node in reversed(graph.nodes):
            if node.is_pure and node.is_unused:
                graph.remove_node(node)
                removed += 1
        constants = graph.remove_unused_constants()
        return PassResult(graph, bool(removed or constants), {"nodes_removed": removed, "constants_removed": constants})


# ---------------------------------------------------------------------- CSE
@register_pass
@dataclass
class EliminateCommonSubexpressions(Pass):
    """Merge pure nodes that compute the same value, and identical small constants.

    Hash-based value numbering (Cocke 1970; Aho et al., *Compilers*, §6.1.2): in
    execution order, a pure node is keyed by its op, the identities of its
    inputs (sorted for commutative ops), its attributes (tensors by bytes,
    floats by bit pattern) and its output types; a node whose key was seen
    before is replaced by the earlier one. Since replacing rewires later
    readers first, one walk merges whole duplicated chains.

    Constants of equal dtype, shape and bytes up to ``max_bytes`` are merged
    first (ONNX exporters repeat initializers), which lets their readers merge.
    Trainable parameters are never merged: equal at initialisation is not
    equal after fine-tuning (see ``is_trainable``).
    """

    name = "cse"
    kind = PassKind.EXACT

    max_bytes: int = 1 << 16

    def call(self, graph: Graph) -> PassResult:
        constants = self._merge_constants(graph)
        nodes = self._merge_nodes(graph)
        return PassResult(graph, bool(constants or nodes), {"constants_merged": constants, "nodes_merged": nodes})

    def _merge_constants(self, graph: Graph) -> int:
        first_of: dict[tuple[Any, ...], Value] = {}
        merged = 0
        for v in list(graph.constants.values()):
            data = v.data
            if v.is_trainable or data.layout != torch.strided or data.numel() * data.element_size() > self.max_bytes:
                continue
            first = first_of.setdefault((data.dtype, tuple(data.shape), tensor_bytes(data)), v)
            if first is not v and v.can_be_replaced_by(first):
                v.replace_by(first)
                graph.remove_constant(v)
                merged += 1
        return merged

    def _merge_nodes(self, graph: Graph) -> int:
        first_of: dict[tuple[Any, ...], Node] = {}
        merged = 0
        for node in graph.nodes:
            if not node.outputs or not node.is_pure:
                continue
            first = first_of.setdefault(_value_number_key(node), node)
            pairs = list(zip(node.outputs, first.outputs))
            if first is not node and all(old.can_be_replaced_by(new) for old, new in pairs):
                for old, new in pairs:
                    old.replace_by(new)
                graph.remove_node(node)
                merged += 1
        return merged


def _value_number_key(node: Node) -> tuple[Any, ...]:
    inputs = [None if v is None else id(v) for v in node.inputs]
    if node.opdef.commutative and None not in inputs:
        inputs.sort()
    return node.op, tuple(inputs), attr_key(node.attrs), tuple(out.type for out in node.outputs)


# ------------------------------------------------------------------ no-ops
_WHOLE_DIM_END = 2**31 - 1  # exporters write INT32_MAX or INT64_MAX for "to the end"


def _first_input(node: Node) -> Value | None:
    return node.inputs[0]


def _input_if_same_type(node: Node) -> Value | None:
    return node.inputs[0] if node.output.same_type_as(node.inputs[0]) else None


def _undo_reshape(node: Node) -> Value | None:
    """A reshape (or squeeze, unsqueeze, flatten) back to the shape of its input, or of the reshape before it."""
    src = node.inputs[0]
    if node.output.same_type_as(src):
        return src
    inner = src.producer
    if inner is not None and inner.opdef.reshapes and node.output.same_type_as(inner.inputs[0]):
        return inner.inputs[0]
    return None


def _identity_permute(node: Node) -> Value | None:
    dims = node.attrs["dims"]
    return node.inputs[0] if [d % len(dims) for d in dims] == list(range(len(dims))) else None


def _inference_dropout(node: Node) -> Value | None:
    return node.inputs[0] if node.is_pure else None


def _whole_slice(node: Node) -> Value | None:
    """A slice that keeps every element: same type over a static dim, or ``0:end:1`` over any dim."""
    x = node.inputs[0]
    if not node.output.same_type_as(x):
        return None
    size = x.type.shape[node.attrs["dim"] % len(x.type.shape)]
    a = node.attrs
    to_end = a["start"] == 0 and a["step"] == 1 and a["end"] >= _WHOLE_DIM_END
    return x if isinstance(size, int) or to_end else None


def _part_of_concat(node: Node) -> Value | None:
    """A unit-step slice that takes exactly one input of the concat it reads, along the concat's dim (a strided
    write that the next write fills, as rotary embeddings interleave halves)."""
    x, a = node.inputs[0], node.attrs
    concat = x.producer
    rank = len(x.type.shape)
    if concat is None or concat.op != "concat" or a["step"] != 1 or concat.attrs["dim"] % rank != a["dim"] % rank:
        return None
    offset = 0
    for part in concat.inputs:
        size = part.type.shape[a["dim"] % rank]
        if not isinstance(size, int):
            return None
        if offset == a["start"]:  # from the part's start, and as long as the part: exactly the part
            return part if node.output.same_type_as(part) else None
        offset += size
    return None


def _slice_forward(node: Node) -> Value | None:
    return _whole_slice(node) or _part_of_concat(node)


def _zero_pad(node: Node) -> Value | None:
    """A pad by nothing on every side (a window size that already divides, say)."""
    return node.inputs[0] if not any(node.attrs["pads"]) and node.output.same_type_as(node.inputs[0]) else None


def _single_concat(node: Node) -> Value | None:
    return node.inputs[0] if len(node.inputs) == 1 else None


def _neutral_operand(node: Node) -> Value | None:
    """``x op e`` for the op's identity element ``e`` (``x+0``, ``x-0``, ``x*1``, ``x/1``), and ``e op x`` when the op
    is commutative, where the constant changes neither shape nor dtype.

    A trainable parameter is not a constant here: a norm weight that starts at ones
    must survive so the model can still be fine-tuned.
    """
    element = node.opdef.identity_element
    if node.attrs.get("rounding_mode") is not None:  # div's alone: x // 1 rounds x
        return None
    a, b = node.inputs
    for x, c in [(a, b), (b, a)] if node.opdef.commutative else [(a, b)]:
        if c.is_constant and not c.is_trainable and bool((c.data == element).all()) and node.output.same_type_as(x):
            return x
    return None


_FORWARDERS: dict[str, Callable[[Node], Value | None]] = {
    "identity": _first_input,
    **dict.fromkeys(("expand", "broadcast_to", "cast", "repeat"), _input_if_same_type),
    "permute": _identity_permute,
    "dropout": _inference_dropout,
    "slice": _slice_forward,
    "concat": _single_concat,
    "pad": _zero_pad,
}
"""For each op, a function giving the value a node of that op merely passes on, or None."""


def _forwarder(node: Node) -> Callable[[Node], Value | None] | None:
    """The function giving the value ``node`` merely passes on, if its op has one."""
    if node.opdef.reshapes:
        return _undo_reshape
    if node.opdef.identity_element is not None:
        return _neutral_operand
    return _FORWARDERS.get(node.op)


def _compose_permutes(node: Node) -> Node | None:
    """``permute(permute(x, p), q)`` becomes ``permute(x, [p[i] for i in q])``."""
    inner = node.inputs[0].producer
    if inner is None or inner.op != "permute":
        return None
    rank = len(node.attrs["dims"])
    p = [d % rank for d in inner.attrs["dims"]]
    node.attrs["dims"] = [p[d % rank] for d in node.attrs["dims"]]
    node.replace_input(0, inner.inputs[0])
    return inner


def _skip_inner_reshape(node: Node) -> Node | None:
    """``reshape(reshape(x, a), b)`` becomes ``reshape(x, b)``: reshapes keep element order."""
    inner = node.inputs[0].producer
    if inner is None or not inner.opdef.reshapes:
        return None
    node.replace_input(0, inner.inputs[0])
    return inner


_COMPOSERS: dict[str, Callable[[Node], Node | None]] = {"permute": _compose_permutes, "reshape": _skip_inner_reshape}
"""For each op, a function that makes a node read past its producer; it returns the bypassed producer."""


def _drop_empty_mask(node: Node) -> bool:
    """Drop an sdpa mask that keeps every score as it is: a constant of all ``True``, or zeros added to
    the scores (HF ViT's exported attention carries an all-``True`` one). The kernel then reads no mask,
    and onnxruntime's lowering needs no NaN guard for fully masked rows."""
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    if mask is None or not mask.is_constant or mask.is_trainable:
        return False
    q, k = node.inputs[0].type.shape, node.inputs[1].type.shape
    scores = (*q[:-1], k[-2])
    shape = mask.type.shape
    if len(shape) > len(scores) or any(m not in (1, s) for m, s in zip(shape[::-1], scores[::-1])):
        return False  # broadcasting the mask would widen the scores: not a mask that changes nothing
    data = mask.data
    if not bool(data.all() if data.dtype == torch.bool else (data == 0).all()):
        return False
    node.set_inputs(node.inputs[:3])
    return True


@register_pass
@dataclass
class EliminateNoOps(Pass):
    """Remove ops that pass their input on unchanged, and fold pairs of layout ops into one.

    Peephole algebraic simplification (McKeeman 1965, "Peephole optimization";
    Aho et al., *Compilers*, §8.7): identity, inference dropout, casts to the
    same dtype, reshapes/expands/repeats to the same shape, identity permutes,
    whole-dim slices, slices that take one input of a concat, one-input concats,
    ``x+0``, ``x-0``, ``x*1``, ``x/1``;
    an attention mask that masks nothing is dropped from its sdpa.
    Consecutive permutes compose into one (cancelling transpose pairs vanish),
    a reshape reads past the reshape-like op before it, and a squeeze/unsqueeze
    pair that restores its input's shape is removed. Every rewrite requires
    the replacement to have the node's output type, dtype and shape.

    ``x+0`` turns ``-0.0`` into ``+0.0``; the two compare equal, so the
    rewrite is exact under ``==``, as in onnxruntime's and onnx-simplifier's.
    """

    name = "eliminate_noops"
    kind = PassKind.EXACT

    def call(self, graph: Graph) -> PassResult:
        removed = composed = masks = 0
        for node in graph.nodes:
            if node.op == "sdpa":
                masks += _drop_empty_mask(node)
            compose = _COMPOSERS.get(node.op)
            bypassed = compose(node) if compose else None
            if bypassed is not None:
                composed += 1
                removed += _remove_if_dead(bypassed)
            forward = _forwarder(node)
            src = forward(node) if forward else None
            if src is not None and node.output.can_be_replaced_by(src):
                inputs = node.inputs
                node.output.replace_by(src)
                graph.remove_node(node)
                removed += 1 + sum(_remove_if_dead(v.producer) for v in inputs if v is not None)
        return PassResult(graph, bool(removed or composed or masks),
                          {"nodes_removed": removed, "pairs_composed": composed, "masks_dropped": masks})


def _remove_if_dead(node: Node | None) -> bool:
    """Remove a producer a rewrite left without readers (the inner half of a cancelled pair)."""
    if node is None or node.graph is None or not node.is_pure or not node.is_unused:
        return False
    node.graph.remove_node(node)
    return True
