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

from graphopt.ir import Graph, Node, TensorType, Value
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass

CLEANUP_PIPELINE = ["fold_constants", "refine_onnx_opaque", "eliminate_noops", "cse", "dce"]
"""Folding first (it turns shape computations into constants, which makes
reshapes static and no-ops visible), then re-importing the ONNX nodes that
folding made canonical, then no-ops, then merging and sweeping."""


# ------------------------------------------------------------------ helpers
_IMPURE_ONNX_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                              "Multinomial", "Bernoulli", "Dropout", "If", "Loop", "Scan"})
"""Standard ONNX ops that draw random numbers or run subgraphs; every other one is a function of its inputs."""


def is_pure(node: Node) -> bool:
    """Whether a node may be removed, merged or evaluated ahead of time.

    Dropout is registered impure because training-mode dropout draws random
    numbers; in inference mode, or with ``p=0``, it is deterministic. An
    ``onnx.opaque`` node is pure when it is a standard ONNX op that neither
    draws random numbers nor runs a subgraph; custom domains are not trusted.
    """
    if node.op == "dropout":
        return not node.attrs.get("training", False) or node.attrs.get("p", 0.5) == 0
    if node.op == "onnx.opaque":
        return node.attrs.get("domain", "") in ("", "ai.onnx") and node.attrs.get("op_type") not in _IMPURE_ONNX_OPS
    return node.opdef.pure


def is_trainable(v: Value) -> bool:
    """A parameter fine-tuning could change, which passes must keep a value of its own.

    Only floating-point tensors have gradients, so integer parameters (shape and
    index tensors) are as fixed as any constant; and an ONNX model is an
    inference artifact whose initializers are all constants.
    """
    if not v.is_parameter or v.data is None or not (v.data.is_floating_point() or v.data.is_complex()):
        return False
    return v.graph is None or v.graph.meta.get("source") != "onnx"


def is_graph_output(v: Value) -> bool:
    return v.graph is not None and any(out is v for out in v.graph.outputs)


def is_unused(node: Node) -> bool:
    return not any(out.uses() or is_graph_output(out) for out in node.outputs)


def can_replace(old: Value, new: Value) -> bool:
    """Whether every use of ``old`` may read ``new`` instead.

    A graph output may only move to a value that a node produces and no other
    output holds: an emitted ONNX model names each output once, never after an
    input or an initializer.
    """
    return not is_graph_output(old) or (new.producer is not None and not is_graph_output(new))


def replace_value(old: Value, new: Value) -> None:
    """Replace ``old`` by ``new`` everywhere; a graph output keeps its name, so the model's interface is unchanged."""
    was_output = is_graph_output(old)
    old.replace_all_uses_with(new)
    if was_output:
        old.name, new.name = new.name, old.name


def same_type(a: Value, b: Value) -> bool:
    """Equal dtype and equal, known shape: then ``b`` can stand for ``a``."""
    return isinstance(a.type, TensorType) and a.type.shape is not None and a.type == b.type


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The elements' bytes in row-major order: equal for tensors of equal dtype, shape and contents.

    Whatever the strides (zero for an expanded tensor, anything for an empty
    one) and lazy conjugate or negative bits, only the values count.
    """
    if t.numel() == 0:
        return b""
    flat = t.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


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
            if is_pure(node) and is_unused(node):
                graph.remove_node(node)
                removed += 1
        constants = graph.remove_unused_constants()
        return PassResult(graph, bool(removed or constants), {"nodes_removed": removed, "constants_removed": constants})


# ---------------------------------------------------------------------- CSE
_COMMUTATIVE = frozenset({"add", "mul", "eq", "ne", "logical_and", "logical_or", "logical_xor",
                          "bitwise_and", "bitwise_or", "bitwise_xor"})


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
            if is_trainable(v) or data.layout != torch.strided or data.numel() * data.element_size() > self.max_bytes:
                continue
            first = first_of.setdefault((data.dtype, tuple(data.shape), tensor_bytes(data)), v)
            if first is not v and can_replace(v, first):
                replace_value(v, first)
                del graph.constants[v.name]
                merged += 1
        return merged

    def _merge_nodes(self, graph: Graph) -> int:
        first_of: dict[tuple[Any, ...], Node] = {}
        merged = 0
        for node in graph.nodes:
            if not node.outputs or not is_pure(node):
                continue
            first = first_of.setdefault(_value_number_key(node), node)
            pairs = list(zip(node.outputs, first.outputs))
            if first is not node and all(can_replace(old, new) for old, new in pairs):
                for old, new in pairs:
                    replace_value(old, new)
                graph.remove_node(node)
                merged += 1
        return merged


def _value_number_key(node: Node) -> tuple[Any, ...]:
    inputs = [None if v is None else id(v) for v in node.inputs]
    if node.op in _COMMUTATIVE and None not in inputs:
        inputs.sort()
    return node.op, tuple(inputs), _attr_key(node.attrs), tuple(out.type for out in node.outputs)


def _attr_key(a: Any) -> Any:
    """A hashable key equal for equal attributes; unknown objects compare by identity."""
    if isinstance(a, torch.Tensor):
        return "tensor", a.dtype, tuple(a.shape), tensor_bytes(a)
    if isinstance(a, float):
        return "float", a.hex()  # tells 0.0 from -0.0, and keeps NaN equal to itself
    if isinstance(a, (list, tuple)):
        return "sequence", tuple(_attr_key(x) for x in a)
    if isinstance(a, dict):
        return "dict", tuple(sorted((k, _attr_key(x)) for k, x in a.items()))
    if a is None or isinstance(a, (bool, int, str, torch.dtype)):
        return type(a).__name__, a
    return "object", id(a)


# ------------------------------------------------------------------ no-ops
_RESHAPES = frozenset({"reshape", "flatten", "squeeze", "unsqueeze"})
_NEUTRAL = {"add": (0, True), "sub": (0, False), "mul": (1, True), "div": (1, False)}  # element, commutative
_WHOLE_DIM_END = 2**31 - 1  # exporters write INT32_MAX or INT64_MAX for "to the end"


def _first_input(node: Node) -> Value | None:
    return node.inputs[0]


def _input_if_same_type(node: Node) -> Value | None:
    return node.inputs[0] if same_type(node.output, node.inputs[0]) else None


def _undo_reshape(node: Node) -> Value | None:
    """A reshape (or squeeze, unsqueeze, flatten) back to the shape of its input, or of the reshape before it."""
    src = node.inputs[0]
    if same_type(node.output, src):
        return src
    inner = src.producer
    if inner is not None and inner.op in _RESHAPES and same_type(node.output, inner.inputs[0]):
        return inner.inputs[0]
    return None


def _identity_permute(node: Node) -> Value | None:
    dims = node.attrs["dims"]
    return node.inputs[0] if [d % len(dims) for d in dims] == list(range(len(dims))) else None


def _inference_dropout(node: Node) -> Value | None:
    return node.inputs[0] if is_pure(node) else None


def _whole_slice(node: Node) -> Value | None:
    """A slice that keeps every element: same type over a static dim, or ``0:end:1`` over any dim."""
    x = node.inputs[0]
    if not same_type(node.output, x):
        return None
    size = x.type.shape[node.attrs.get("dim", 0) % len(x.type.shape)]
    a = node.attrs
    to_end = a.get("start", 0) == 0 and a.get("step", 1) == 1 and a.get("end", 2**63 - 1) >= _WHOLE_DIM_END
    return x if isinstance(size, int) or to_end else None


def _zero_pad(node: Node) -> Value | None:
    """A pad by nothing on every side (a window size that already divides, say)."""
    return node.inputs[0] if not any(node.attrs["pads"]) and same_type(node.output, node.inputs[0]) else None


def _single_concat(node: Node) -> Value | None:
    return node.inputs[0] if len(node.inputs) == 1 else None


def _neutral_operand(node: Node) -> Value | None:
    """``x+0``, ``0+x``, ``x-0``, ``x*1``, ``1*x``, ``x/1`` where the constant changes neither shape nor dtype.

    A trainable parameter is not a constant here: a norm weight that starts at ones
    must survive so the model can still be fine-tuned.
    """
    element, commutative = _NEUTRAL[node.op]
    if node.attrs.get("rounding_mode") is not None:
        return None
    a, b = node.inputs
    for x, c in [(a, b), (b, a)] if commutative else [(a, b)]:
        if c.is_constant and not is_trainable(c) and bool((c.data == element).all()) and same_type(node.output, x):
            return x
    return None


_FORWARDERS: dict[str, Callable[[Node], Value | None]] = {
    "identity": _first_input,
    **dict.fromkeys(_RESHAPES, _undo_reshape),
    **dict.fromkeys(("expand", "broadcast_to", "cast", "repeat"), _input_if_same_type),
    "permute": _identity_permute,
    "dropout": _inference_dropout,
    "slice": _whole_slice,
    "concat": _single_concat,
    "pad": _zero_pad,
    **dict.fromkeys(_NEUTRAL, _neutral_operand),
}
"""For each op, a function giving the value a node of that op merely passes on, or None."""


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
    if inner is None or inner.op not in _RESHAPES:
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
    if mask is None or not mask.is_constant or is_trainable(mask):
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
    whole-dim slices, one-input concats, ``x+0``, ``x-0``, ``x*1``, ``x/1``;
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
            forward = _FORWARDERS.get(node.op)
            src = forward(node) if forward else None
            if src is not None and can_replace(node.output, src):
                inputs = node.inputs
                replace_value(node.output, src)
                graph.remove_node(node)
                removed += 1 + sum(_remove_if_dead(v.producer) for v in inputs if v is not None)
        return PassResult(graph, bool(removed or composed or masks),
                          {"nodes_removed": removed, "pairs_composed": composed, "masks_dropped": masks})


def _remove_if_dead(node: Node | None) -> bool:
    """Remove a producer a rewrite left without readers (the inner half of a cancelled pair)."""
    if node is None or node.graph is None or not is_pure(node) or not is_unused(node):
        return False
    node.graph.remove_node(node)
    return True
