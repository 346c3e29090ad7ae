"""Canonicalisation: turn opaque nodes into canonical ops once the graph shows they fit."""
from __future__ import annotations

from dataclasses import dataclass

from graphopt.frontends.onnx import reconvert_opaque
from graphopt.ir import Graph, Node, TensorType, Type, Value
from graphopt.ir.registry import infer_types
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass

from .constant_folding import FoldConstants


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
    failed attempt. The canonical node often knows sizes ONNX's inference left
    symbolic; those sizes are pushed on through the nodes downstream, so that
    their shape computations fold in turn.
    """

    name = "refine_onnx_opaque"
    kind = PassKind.EXACT

    max_rounds: int = 64
    """Refinement and folding feed each other (a refined Reshape makes the next
    block's Shape static): each round refines, then folds with ``fold_constants``'
    default options, until a round refines nothing."""

    def call(self, graph: Graph) -> PassResult:
        stats = {"nodes_refined": 0, "values_retyped": 0, "nodes_folded": 0}
        for _ in range(self.max_rounds):
            refined, sharper = _refine_round(graph)
            if not refined:
                break
            stats["nodes_refined"] += refined
            stats["values_retyped"] += propagate_sizes(graph, sharper)
            folded = FoldConstants().call(graph).stats
            stats["nodes_folded"] += folded["nodes_folded"] + folded["shape_ops_folded"]
        return PassResult(graph, bool(stats["nodes_refined"]), stats)


def _refine_round(graph: Graph) -> tuple[int, list[Value]]:
    """Retry every opaque node worth retrying once; the count refined and the values that sharpened."""
    refined = 0
    sharper: list[Value] = []
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
        sharper += _swap_in(node, outputs)
        refined += 1
    return refined, sharper


def _input_key(node: Node) -> tuple:
    """What a retry depends on: which values the node reads, whether they are constant, and their types."""
    return tuple(None if v is None else (v.name, v.is_constant, v.type) for v in node.inputs)


def _swap_in(node: Node, outputs: list[Value | None]) -> list[Value]:
    """Replace the opaque node by the canonical values, which take over its output names.

    Returns the values whose type is now sharper than the opaque node's was.
    """
    sharper = []
    for old, new in zip(node.outputs, outputs):
        if new is None:
            continue
        new.type = _merged_type(new.type, old.type)
        if new.type != old.type:
            sharper.append(new)
        renamed = old.is_graph_output
        old.replace_by(new)
        if not renamed:
            old.name, new.name = new.name, old.name
    node.graph.remove_node(node)
    return sharper


def propagate_sizes(graph: Graph, seeds: list[Value]) -> int:
    """Re-infer the types downstream of ``seeds``, keeping sizes that became known.

    A type only ever sharpens here (a symbolic size becomes a number); a node
    whose inference fails or disagrees keeps its type. Returns how many values
    changed.
    """
    dirty = {id(v) for v in seeds}
    changed = 0
    if not dirty:
        return 0
    for node in graph.nodes:
        if not any(v is not None and id(v) in dirty for v in node.inputs):
            continue
        try:
            types = infer_types(node)
        except Exception:  # an op whose inference needs what is still unknown keeps its types
            continue
        for out, new in zip(node.outputs, types):
            sharp = _sharpened(out.type, new)
            if sharp is not None:
                out.type = sharp
                dirty.add(id(out))
                changed += 1
    return changed


def _sharpened(old: Type, new: Type) -> Type | None:
    """``old`` with the sizes ``new`` knows and it does not, or None when there are none (or they disagree)."""
    if not (isinstance(old, TensorType) and isinstance(new, TensorType)) or old.dtype != new.dtype or new.shape is None:
        return None
    if old.shape is None:
        return new
    if len(old.shape) != len(new.shape):
        return None
    dims = []
    for a, b in zip(old.shape, new.shape):
        if isinstance(a, int) and isinstance(b, int) and a != b:
            return None
        dims.append(a if isinstance(a, int) or not isinstance(b, int) else b)
    sharp = TensorType(old.dtype, tuple(dims))
    return None if sharp == old else sharp


def _merged_type(new: Type, old: Type) -> Type:
    """The canonical value's type, with ONNX's sizes and symbol names where the IR knows less."""
    if not (isinstance(new, TensorType) and isinstance(old, TensorType)) or new.shape is None or old.shape is None:
        return new
    return TensorType(new.dtype, tuple(a if isinstance(a, int) else b for a, b in zip(new.shape, old.shape)))
