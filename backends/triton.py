"""The Triton backend: one generated kernel per fusion group of a region, torch for the rest.

A region (``partition``) holds whole fusion groups (``mark_fusion_groups``) and
nodes in none. Each group that ``triton_codegen`` can lower becomes one Triton
kernel; every other node runs its op's torch implementation. Steps run in
dependency order with each group as one step, an order that exists because
groups are convex.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from graphlib import TopologicalSorter
from typing import Any

import torch

from graphopt.ir import Graph, Node, Value

from . import _triton
from .base import Backend, Kernel, register_backend, static_tensors_only
from .region import Region, extract
from .triton_codegen import KernelSource, Unsupported, generate

logger = logging.getLogger(__name__)


@dataclass
class GroupKernel:
    """One fusion group lowered to Triton, with what a benchmark compares it against."""

    group: int
    region: Region
    """The group as a standalone region of the compiled region's graph."""
    source: KernelSource
    kernel: Kernel
    """The Triton kernel: the group's inputs in, its outputs out."""
    reference: Kernel
    """The torch ops it replaces, same signature."""


@dataclass(frozen=True)
class _Step:
    run: Kernel
    reads: tuple[Value | None, ...]
    writes: tuple[Value, ...]


@register_backend
class TritonBackend(Backend):
    """Generated Triton kernels for fusion groups: elementwise chains, row reductions, matmul epilogues."""

    name = "triton"
    compile_seconds = 5.0  # a JIT compile per fusion group

    def unavailable(self, device: torch.device) -> str | None:
        return _triton.unavailable(device)

    def supports(self, node: Node) -> bool:
        return node.opdef.torch_impl is not None and static_tensors_only(node)

    def kernels(self, region: Region, device: torch.device) -> list[GroupKernel]:
        """The region's fusion groups that lower to Triton, as kernels; the others are left out (logged).

        A convolution stays with torch (cuDNN does it better than a generated kernel);
        the pointwise epilogue of its group still becomes one kernel when two or more ops long.
        """
        members: dict[int, list[Node]] = {}
        for node in region.graph.nodes:
            if "fusion_group" in node.meta:
                members.setdefault(node.meta["fusion_group"], []).append(node)
        kernels = []
        for group, nodes in members.items():
            if nodes[0].opdef.category == "conv":
                nodes = nodes[1:]
            sub = extract(region.graph, nodes, group)
            try:
                if len(nodes) < 2:
                    raise Unsupported("a convolution with a one-op epilogue")
                source = generate(sub.graph, _triton.MATMUL_TILES)
            except Unsupported as reason:
                logger.debug("fusion group %d of %s stays in torch: %s", group, region, reason)
                continue
            kernels.append(GroupKernel(group, sub, source, _triton_kernel(sub.graph, source, device),
                                       _program(sub.graph, [_torch_step(n) for n in sub.graph.nodes], device)))
        return kernels

    def compile(self, region: Region, device: torch.device) -> Kernel:
        position = {id(n): k for k, n in enumerate(region.graph.nodes)}
        kernels = self.kernels(region, device)
        grouped = {id(n) for k in kernels for n in k.region.nodes}
        steps = [(position[id(k.region.nodes[0])], _Step(k.kernel, tuple(k.region.inputs), tuple(k.region.outputs)))
                 for k in kernels]
        steps += [(position[id(n)], _torch_step(n)) for n in region.graph.nodes if id(n) not in grouped]
        return _program(region.graph, _schedule(steps), device)


def _torch_step(node: Node) -> _Step:
    impl, attrs = node.opdef.torch_impl, node.attrs

    def run(*inputs: Any) -> tuple[torch.Tensor, ...]:
        out = impl(*inputs, **attrs)  # type: ignore[misc]
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return _Step(run, node.inputs, tuple(node.outputs))


def _triton_kernel(graph: Graph, source: KernelSource, device: torch.device) -> Kernel:
    """The group's inputs in, fresh outputs out; inputs made contiguous, as the kernel's indices assume."""
    launch = _triton.Launcher(source)
    position = {v.name: k for k, v in enumerate(graph.inputs)}
    constants = {name: graph.constants[name].data.to(device).contiguous()  # type: ignore[union-attr]
                 for name in source.inputs if name in graph.constants}
    outputs = [(v.type.shape, v.type.dtype) for v in graph.outputs]  # type: ignore[union-attr]

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = [inputs[position[name]].contiguous() if name in position else constants[name]
                for name in source.inputs]
        results = tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype in outputs)
        launch(*args, *results)
        return results

    return run


def _schedule(steps: list[tuple[int, _Step]]) -> list[_Step]:
    """The steps in dependency order, ties broken by their place in the graph (a group's is its first node's)."""
    writer = {id(v): k for k, (_, s) in enumerate(steps) for v in s.writes}
    sorter = TopologicalSorter({k: {writer[id(v)] for v in s.reads if v is not None and id(v) in writer}
                                for k, (_, s) in enumerate(steps)})
    sorter.prepare()
    order: list[int] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda k: steps[k][0])
        order += ready
        sorter.done(*ready)
    return [steps[k][1] for k in order]


def _program(graph: Graph, steps: list[_Step], device: torch.device) -> Kernel:
    """Run ``steps`` over ``graph``'s values: its inputs in, its outputs out."""
    constants = {id(v): v.data.to(device) for v in graph.constants.values()}  # type: ignore[union-attr]

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env: dict[int, Any] = {**constants, **{id(v): x for v, x in zip(graph.inputs, inputs, strict=True)}}
        for step in steps:
            results = step.run(*(None if v is None else env[id(v)] for v in step.reads))
            env.update(zip((id(v) for v in step.writes), results))
        return tuple(env[id(v)] for v in graph.outputs)

    return run
