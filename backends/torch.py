"""torch as a backend: eager (the always-available fallback) and inductor.

Both accept every node with a torch implementation. Eager runs the region's
emitted ``GraphModule`` op by op; inductor compiles that module, fusing and
generating C++ (CPU) or Triton (GPU) kernels of its own.
"""
from __future__ import annotations

import torch

from graphopt import _torch_private
from graphopt.ir import Node

from .base import Backend, Kernel, random_inputs, register_backend
from .region import Region


def _has_torch_impl(node: Node) -> bool:
    return node.op == "torch.opaque" or node.opdef.torch_impl is not None


@register_backend
class EagerBackend(Backend):
    """The region's ops one by one in eager torch: what runs when nothing is lowered."""

    name = "torch"
    compile_seconds = 0.0  # nothing is compiled

    def supports(self, node: Node) -> bool:
        return _has_torch_impl(node)

    def compile(self, region: Region, device: torch.device) -> Kernel:
        return region.graph.to_torch()


@register_backend
class InductorBackend(Backend):
    """The region compiled by torch's inductor (``compile_fx``), as ``torch.compile`` would."""

    name = "inductor"
    compile_seconds = 30.0  # code generation and a C++ build per region: 5 to 35 s here, more when loaded

    def supports(self, node: Node) -> bool:
        return _has_torch_impl(node)

    def compile(self, region: Region, device: torch.device) -> Kernel:
        module = region.graph.to_torch().to(device)
        compiled = _torch_private.inductor_compile(module, random_inputs(region, device))

        def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(compiled(*inputs))

        return run
