"""Constant folding: compute ahead of time what depends only on constants or on static shapes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.ir import Graph, Node, TensorType, Value
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass


_PROBE_SIZES = (2, 3)  # two sizes for symbolic dims: a result equal under both does not depend on them


@register_pass
@dataclass
class FoldConstants(Pass):
    """Replace pure nodes computable before the model runs by the constants they compute.

    Constant folding (Aho et al., *Compilers*, §8.5.4 and §9.4): a pure node whose
    inputs are all constants is evaluated once with its torch implementation;
    in execution order, so whole constant chains fold in one walk. Shape-only
    ops (``shape``, ``full_like``) fold when the dims they read are static,
    even if other dims are symbolic, and so do ops that merely pick entries
    of a ``shape`` result (``Gather(Shape(x), 1)``) when the entries they pick
    are static: this is what turns ONNX Shape→Gather→Concat→Reshape chains
    into static reshapes.

    Results larger than ``max_output_bytes`` stay computed, so folding never
    bloats a model. Nodes reading a trainable parameter (``is_trainable``: a
    floating-point weight of a torch model) are left alone unless
    ``fold_parameters``: a weight folded into a constant could no longer be
    fine-tuned. Graph outputs are never folded, so each
    output keeps a producing node.
    """

    name = "fold_constants"
    kind = PassKind.EXACT

    max_output_bytes: int = 1 << 20
    fold_parameters: bool = False

    def call(self, graph: Graph) -> PassResult:
        stats = {"nodes_folded": 0, "shape_ops_folded": 0, "skipped_too_large": 0, "constants_dropped": 0}
        read: list[Value] = []
        for node in graph.nodes:
            sizes = _output_sizes(node)
            if not self._foldable(node) or None in sizes:
                continue
            if max(sizes, default=0) > self.max_output_bytes:
                stats["skipped_too_large"] += 1
                continue
            probed = _reads_shapes(node)
            results = _probed_results(node) if probed else _constant_results(node)
            if results is None:
                continue
            for out, data in zip(node.outputs, results):
                out.replace_all_uses_with(_constant_for(graph, node, data, out.name))
            read += [v for v in node.inputs if v is not None and v.is_constant]
            graph.remove_node(node)
            stats["shape_ops_folded" if probed else "nodes_folded"] += 1
        stats["constants_dropped"] = _drop_unread(graph, read)
        modified = bool(stats["nodes_folded"] or stats["shape_ops_folded"])
        return PassResult(graph, modified, stats)

    def _foldable(self, node: Node) -> bool:
        if not node.is_pure or node.opdef.torch_impl is None or any(o.is_graph_output for o in node.outputs):
            return False
        if _reads_shapes(node):
            return True
        constant_inputs = [v for v in node.inputs if v is not None]
        return all(v.is_constant for v in constant_inputs) and (
            self.fold_parameters or not any(v.is_trainable for v in constant_inputs))


def _output_sizes(node: Node) -> list[int | None]:
    """Bytes of each output; None where the size is not static."""
    return [out.type.nbytes if isinstance(out.type, TensorType) else None for out in node.outputs]


def _constant_results(node: Node) -> list[torch.Tensor] | None:
    return _evaluate(node, [None if v is None else v.data for v in node.inputs])


def _reads_shapes(node: Node) -> bool:
    """A shape-only op, or an entry-moving op reading constants and ``shape`` results (one at least): what
    it picks from them is static exactly when it is the same under two probe sizes."""
    if node.opdef.reads_shape_only:
        return True
    if not node.opdef.moves_entries:
        return False
    inputs = [v for v in node.inputs if v is not None]
    shapes = [v for v in inputs if v.producer is not None and v.producer.op == "shape"]
    return bool(shapes) and all(v.is_constant or v in shapes for v in inputs)


def _probed_results(node: Node) -> list[torch.Tensor] | None:
    """Evaluate on stand-ins, twice with different sizes for symbolic dims; fold if both agree."""
    runs = []
    for size in _PROBE_SIZES:
        args = [_probe(v, size) for v in node.inputs]
        if any(a is None for a, v in zip(args, node.inputs) if v is not None):
            return None
        runs.append(_evaluate(node, args))
    first, second = runs
    if first is None or second is None or not all(torch.equal(a, b) for a, b in zip(first, second)):
        return None
    return first


def _probe(v: Value | None, size: int) -> torch.Tensor | None:
    """What a shape-reading op sees for ``v``: its data, the probed result of a ``shape`` node, or a stand-in."""
    if v is None or v.is_constant:
        return None if v is None else v.data
    if v.producer is not None and v.producer.op == "shape":
        shape_node = v.producer
        stand_in = _stand_in(shape_node.inputs[0], size)
        return None if stand_in is None else shape_node.opdef.torch_impl(stand_in, **shape_node.attrs)
    return _stand_in(v, size)


def _stand_in(v: Value | None, size: int) -> torch.Tensor | None:
    """A zero-stride tensor with ``v``'s dtype and shape (symbolic dims set to ``size``), or None if unknown."""
    if v is None or not isinstance(v.type, TensorType) or v.type.shape is None:
        return None
    shape = [d if isinstance(d, int) else size for d in v.type.shape]
    return torch.empty((), dtype=v.type.dtype).expand(shape)


def _evaluate(node: Node, args: list[torch.Tensor | None]) -> list[torch.Tensor] | None:
    """Run the node's torch implementation; None unless every result has exactly the declared type."""
    with torch.no_grad():
        result = node.opdef.torch_impl(*args, **node.attrs)
    results = list(result) if isinstance(result, (tuple, list)) else [result]
    if len(results) != len(node.outputs) or not all(
            isinstance(r, torch.Tensor) and TensorType.of(r) == out.type for r, out in zip(results, node.outputs)):
        return None
    return results


def _constant_for(graph: Graph, node: Node, data: torch.Tensor, name: str) -> Value:
    """The constant holding ``data``: the input it is (``identity``), else a fresh contiguous copy.

    A copy, because a view would alias an input's storage and keep all of it alive.
    """
    for v in node.inputs:
        if v is not None and v.data is data:
            return v
    return graph.add_constant(data.detach().clone(memory_format=torch.contiguous_format), name)


def _drop_unread(graph: Graph, candidates: list[Value]) -> int:
    """Remove the constants among ``candidates`` that nothing reads any more."""
    dropped = 0
    for v in dict.fromkeys(candidates):
        dropped += graph.remove_constant(v)
    return dropped
