"""Canonicalisation: turn opaque nodes into canonical ops once the graph shows they fit."""
from __future__ import annotations

from dataclasses import dataclass

from graphopt.frontends.onnx import reconvert_opaque
from graphopt.ir import Graph, Node, TensorType, Type, Value
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass

from .cleanup import is_graph_output, replace_value


@register_pass
@dataclass
class RefineOpaqueOnnx(Pass):
    """Re-import ``onnx.opaque`` nodes whose shape-like inputs have become constants.

    The ONNX front end maps Reshape, Expand, Slice, Pad, Range, TopK and the
    like to canonical ops only when their shape, axes or count inputs are known
    at load time. Constant folding computes many of them later (exporters build
    shapes as ``Shape→Gather→Concat``); this pass then retries the front end's
    own conversion, with its check that the IR's types agree with ONNX's, and
    swaps the canonical nodes in. Only nodes with a constant input are tried,
    and a node is retried only when its inputs have changed since its last
    failed attempt.
    """

    name = "refine_onnx_opaque"
    kind = PassKind.EXACT

    def call(self, graph: Graph) -> PassResult:
        refined = 0
        for node in graph.nodes:
            if node.op != "onnx.opaque" or not any(v is not None and v.is_constant for v in node.inputs):
                continue
            key = _input_key(node)
            if node.meta.get("refine_tried") == key:
                continue
            outputs = reconvert_opaque(node)
            if outputs is None:
                node.meta["refine_tried"] = key
                continue
            _swap_in(node, outputs)
            refined += 1
        return PassResult(graph, bool(refined), {"nodes_refined": refined})


def _input_key(node: Node) -> tuple:
    """What a retry depends on: which values the node reads, whether they are constant, and their types."""
    return tuple(None if v is None else (v.name, v.is_constant, v.type) for v in node.inputs)


def _swap_in(node: Node, outputs: list[Value | None]) -> None:
    """Replace the opaque node by the canonical values; they take over its output names."""
    for old, new in zip(node.outputs, outputs):
        if new is None:
            continue
        new.type = _merged_type(new.type, old.type)
        renamed = is_graph_output(old)
        replace_value(old, new)
        if not renamed:
            old.name, new.name = new.name, old.name
    node.graph.remove_node(node)


def _merged_type(new: Type, old: Type) -> Type:
    """The canonical value's type, with ONNX's sizes and symbol names where the IR knows less."""
    if not (isinstance(new, TensorType) and isinstance(old, TensorType)) or new.shape is None or old.shape is None:
        return new
    return TensorType(new.dtype, tuple(a if isinstance(a, int) else b for a, b in zip(new.shape, old.shape)))
