"""Horizontal fusion: sibling projections of one input become one wider projection and a split."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from graphopt.ir import Graph, Node, TensorType, Value
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass

from graphopt.ir.analysis import attr_key


@dataclass(frozen=True)
class _Family:
    """Where an op keeps its output features: an axis of its weight (input 1), an axis of its result.

    The bias, when the op has one (input 2), holds one entry per output feature.
    """

    weight_axis: int
    output_axis: int
    has_bias: bool = True


_FAMILIES = {
    "linear": _Family(weight_axis=0, output_axis=-1),  # weight [out, in]
    "matmul": _Family(weight_axis=-1, output_axis=-1, has_bias=False),  # x @ W, W [in, out]
    "conv": _Family(weight_axis=0, output_axis=1),  # weight [out, in / groups, *kernel]
}


@register_pass
@dataclass
class FuseHorizontal(Pass):
    """Merge sibling ``linear``/``matmul``/``conv`` nodes that read one input into one node and a ``split``.

    Horizontal fusion (TASO, Jia et al. 2019, "TASO: optimizing deep learning
    computation with automatic generation of graph substitutions", the
    "concat weights" substitutions; TensorRT's horizontal layer fusion): the
    query/key/value projections of attention or the 1x1 branches of an
    Inception block read the same tensor with different constant weights,
    so one wide GEMM (or convolution) with the weights concatenated along the
    output features computes all of them at once, and a ``split`` hands each
    reader its part. Siblings group when they read the same input value and
    agree on everything but the number of output features: op, attributes,
    weight dtype and trailing weight shape, and whether they have a bias.
    Convolutions fuse only with ``groups=1`` (grouped convolutions'
    channel blocks would interleave) and not transposed; ``matmul`` only with
    a 2-D constant right operand.

    The concatenated weights are new constants, not parameters. In a torch
    graph, weights that are trainable (``is_trainable``) stay separate
    unless ``fuse_trainable``: fine-tuning the fused graph would otherwise
    no longer update the model's own parameters. ONNX graphs hold no
    trainable weights. At least ``min_branches`` siblings make a group.

    Exact up to float rounding: each output feature is the same dot product,
    but a wider GEMM may sum in another order.
    """

    name = "fuse_horizontal"
    kind = PassKind.EXACT
    requires = ("patterns_recognized", "matmuls_as_linear", "biases_folded")  # siblings in their final form

    min_branches: int = 2
    fuse_trainable: bool = False

    def call(self, graph: Graph) -> PassResult:
        groups = [g for g in self._sibling_groups(graph) if len(g) >= max(self.min_branches, 2)]
        for group in groups:
            _fuse(graph, group)
        return PassResult(graph, bool(groups), {"groups_fused": len(groups),
                                               "nodes_merged": sum(len(g) for g in groups)})

    def _sibling_groups(self, graph: Graph) -> list[list[Node]]:
        groups: dict[tuple[Any, ...], list[Node]] = {}
        for node in graph.nodes:
            key = self._group_key(node)
            if key is not None:
                groups.setdefault(key, []).append(node)
        return list(groups.values())

    def _group_key(self, node: Node) -> tuple[Any, ...] | None:
        family = _FAMILIES.get(node.op)
        if family is None or not _fusable_shape(node, family):
            return None
        weight, bias = node.inputs[1], _bias(node, family)
        constants = [v for v in (weight, bias) if v is not None]
        if not all(v.is_constant for v in constants):
            return None
        if not self.fuse_trainable and any(v.is_trainable for v in constants):
            return None
        trailing = _without(tuple(weight.data.shape), family.weight_axis)
        bias_dtype = None if bias is None else bias.data.dtype
        return (node.op, id(node.inputs[0]), attr_key(node.attrs), weight.data.dtype, trailing, bias_dtype)


def _fusable_shape(node: Node, family: _Family) -> bool:
    """Static weights of the expected rank, a tensor result, and conv attributes that fuse."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.data is None or len(node.outputs) != 1:
        return False
    out = node.output.type
    if not isinstance(out, TensorType) or out.shape is None:
        return False
    if node.op == "matmul":
        x = node.inputs[0].type
        return weight.data.dim() == 2 and isinstance(x, TensorType) and x.rank is not None and x.rank >= 2
    if node.op == "linear":
        return weight.data.dim() == 2
    return node.attrs["groups"] == 1 and not node.attrs["transposed"]


def _bias(node: Node, family: _Family) -> Value | None:
    return node.inputs[2] if family.has_bias and len(node.inputs) > 2 else None


def _without(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    axis %= len(shape)
    return shape[:axis] + shape[axis + 1:]


def _fuse(graph: Graph, group: list[Node]) -> None:
    """One node with concatenated weights (and biases) before the first sibling, then a split for the readers."""
    family = _FAMILIES[group[0].op]
    first = group[0]
    weights = [n.inputs[1] for n in group]
    inputs: list[Value | None] = list(first.inputs)
    inputs[1] = _concat_constant(graph, weights, family.weight_axis, "weight")
    if _bias(first, family) is not None:
        inputs[2] = _concat_constant(graph, [_bias(n, family) for n in group], 0, "bias")
    meta = {"created_by": FuseHorizontal.name, "source": first.meta.get("source")}
    fused = graph.add_node(first.op, inputs, dict(first.attrs), before=first, meta=meta)
    sizes = [int(w.data.shape[family.weight_axis]) for w in weights]
    rank = len(fused.output.type.shape)
    split = graph.add_node("split", [fused.output], {"dim": family.output_axis % rank, "sizes": sizes},
                           after=fused, meta={"created_by": FuseHorizontal.name})
    replaced = [v for n in group for v in (n.inputs[1], _bias(n, family)) if v is not None]
    for node, part in zip(group, split.outputs):
        node.output.replace_by(part)
        graph.remove_node(node)
    _drop_unread(graph, replaced)


def _drop_unread(graph: Graph, constants: list[Value]) -> None:
    """Remove the weights the fused node replaced, unless something else still reads them."""
    for v in dict.fromkeys(constants):
        graph.remove_constant(v)


def _concat_constant(graph: Graph, parts: list[Value], axis: int, hint: str) -> Value:
    data = torch.cat([v.data.detach() for v in parts], axis)
    return graph.add_constant(data, f"{parts[0].name}_fused_{hint}")
