"""A region as numbers: the kernel launches it runs as, and the features the learned model reads.

A region runs as kernels. Eager torch launches one per node that computes
something, and each reads and writes all of its tensors; a fusing backend
launches one per fusion group (``mark_fusion_groups``) and one per compute
node in none, and moves only the values that cross a group's boundary. View
nodes (reshape, permute, slice, ...) only relabel memory and are no kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from graphopt.backends.region import Region
from graphopt.ir import Graph, Node, TensorType, Value
from graphopt.ir.registry import node_flops

LIBRARY_CATEGORIES = frozenset({"matmul", "conv", "attention"})
"""Ops a backend hands to a tuned library (BLAS, oneDNN, cuDNN, flash attention): compute-bound at good sizes."""

CATEGORIES = ("elementwise", "reduction", "norm", "matmul", "conv", "attention", "pool", "shape", "data", "opaque")
COMMON_OPS = ("linear", "matmul", "conv", "sdpa", "add", "mul", "relu", "gelu", "silu", "softmax", "layer_norm",
              "batch_norm", "permute", "concat", "max_pool")


@dataclass(frozen=True)
class Launch:
    """One launch: a fusion group or a single node, the work it does and the bytes it moves."""

    nodes: tuple[Node, ...]
    flops: int
    bytes: int

    @property
    def uses_library(self) -> bool:
        return any(n.opdef.category in LIBRARY_CATEGORIES for n in self.nodes)


def launches(graph: Graph, fused: bool) -> list[Launch]:
    """The kernels ``graph`` runs as: one per compute node, or (``fused``) one per fusion group and ungrouped node."""
    units: dict[object, list[Node]] = {}
    for n in graph.nodes:
        if n.opdef.view:
            continue
        group = n.meta.get("fusion_group") if fused else None
        units.setdefault(("node", id(n)) if group is None else ("group", group), []).append(n)
    outputs = {id(v) for v in graph.outputs}
    return [Launch(tuple(ns), sum(node_flops(n) for n in ns), _boundary_bytes(ns, outputs)) for ns in units.values()]


def _boundary_bytes(nodes: list[Node], graph_outputs: set[int]) -> int:
    """Bytes of the distinct values the nodes read from outside, plus those they write that are needed outside
    (or are never read at all: a single eager op writes its output regardless)."""
    inside = {id(n) for n in nodes}
    read = {id(v): v for n in nodes for v in n.inputs
            if v is not None and (v.producer is None or id(v.producer) not in inside)}
    written = [v for n in nodes for v in n.outputs
               if id(v) in graph_outputs or not v.users() or any(id(u) not in inside for u in v.users())]
    return sum(_nbytes(v) for v in (*read.values(), *written))


def _nbytes(v: Value) -> int:
    return (v.type.nbytes or 0) if isinstance(v.type, TensorType) else 0


def region_features(region: Region) -> dict[str, float]:
    """Op mix, work, traffic and sizes of ``region``; the same keys in the same order for every region.

    Sizes are ``log1p``-scaled: they span orders of magnitude and latency
    follows their ratios, not their differences.
    """
    graph = region.graph
    nodes = graph.nodes
    eager, fused = launches(graph, fused=False), launches(graph, fused=True)
    flops = sum(launch.flops for launch in eager)
    fused_bytes = sum(launch.bytes for launch in fused)
    categories = [n.opdef.category for n in nodes]
    activations = [*graph.inputs, *(v for n in nodes for v in n.outputs)]
    return {
        "nodes": len(nodes),
        "view_nodes": sum(n.opdef.view for n in nodes),
        "eager_kernels": len(eager),
        "fused_kernels": len(fused),
        "fusion_groups": len({n.meta["fusion_group"] for n in nodes if "fusion_group" in n.meta}),
        "inputs": len(graph.inputs),  # a call's fixed cost grows with the tensors a runtime binds
        "outputs": len(graph.outputs),
        **{f"category_{c}": categories.count(c) for c in CATEGORIES},
        **{f"op_{o}": sum(n.op == o for n in nodes) for o in COMMON_OPS},
        "log_flops": math.log1p(flops),
        "log_library_flops": math.log1p(sum(launch.flops for launch in eager if launch.uses_library)),
        "log_largest_kernel_flops": math.log1p(max((launch.flops for launch in eager), default=0)),
        "log_eager_bytes": math.log1p(sum(launch.bytes for launch in eager)),
        "log_fused_bytes": math.log1p(fused_bytes),
        "log_input_bytes": math.log1p(sum(map(_nbytes, graph.inputs))),
        "log_output_bytes": math.log1p(sum(map(_nbytes, graph.outputs))),
        "log_constant_bytes": math.log1p(sum(map(_nbytes, graph.constants.values()))),
        "log_largest_tensor": math.log1p(max(map(_nbytes, activations), default=0)),
        "log_intensity": math.log1p(flops / max(fused_bytes, 1)),
        **_contraction_shapes(nodes),
    }


def _contraction_shapes(nodes: list[Node]) -> dict[str, float]:
    """What FLOPs and bytes miss about a conv or a matmul: the library routine a backend picks turns
    on its kind (a depthwise or a 1x1 conv, a stride) and on how many rows a matmul has, and one
    backend's routine can be twice as fast as another's on the same arithmetic (leave-one-model-out
    on two runs of 858 CPU timings: picks the fastest backend 85% and 82% of the time with these, 79%
    and 77% without)."""
    convs = [(n, w) for n in nodes if n.op == "conv" and (w := _static_shape(n.inputs[1])) is not None]
    rows = [math.prod(out[:-1]) for n in nodes
            if n.op in ("linear", "matmul", "gemm") and (out := _static_shape(n.output)) is not None]
    return {
        "conv_depthwise": sum(w[1] == 1 and n.attrs["groups"] > 1 for n, w in convs),
        "conv_pointwise": sum(math.prod(w[2:]) == 1 for _, w in convs),
        "conv_strided": sum(any(s > 1 for s in n.attrs["stride"]) for n, _ in convs),
        "log_conv_kernel_area": math.log1p(max((math.prod(w[2:]) for _, w in convs), default=0)),
        "log_matmul_rows": math.log1p(min(rows, default=0)),
    }


def _static_shape(v: Value) -> tuple[int, ...] | None:
    return tuple(v.type.shape) if isinstance(v.type, TensorType) and v.type.is_static else None
