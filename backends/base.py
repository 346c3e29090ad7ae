"""What every backend is: a name, the nodes it can take, and ``compile(region) -> callable``.

A backend turns a ``Region`` (a standalone graph) into a function of the
region's input tensors that returns a tuple of its output tensors, in the
order of ``region.graph.inputs`` and ``region.graph.outputs``. Whether a
backend can run here at all (a library missing, no GPU) is a reason string,
so ``explain`` can say why a candidate was not considered.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import torch

from graphopt.ir import Node, ScalarType, TensorType

from .region import Region

Kernel = Callable[..., tuple[torch.Tensor, ...]]
QUICK_COMPILE_SECONDS = 1.0
"""Backends whose ``compile_seconds`` is at most this still take regions once a compile budget is spent."""


class Backend:
    """Base class of the lowering targets; subclasses set ``name`` and implement the three methods."""

    name: ClassVar[str] = ""
    compile_seconds: ClassVar[float] = 1.0
    """About how long compiling a region takes on a CPU, before this machine has timed any: what
    ``lower_regions`` expects when deciding whether a compile fits in its budget. At most
    ``QUICK_COMPILE_SECONDS``: the backend builds no code and tunes nothing."""

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` here (a missing library, no driver), or None."""
        return None

    def supports(self, node: Node) -> bool:
        """Whether ``node`` may be part of a region this backend compiles."""
        raise NotImplementedError

    def compile(self, region: Region, device: torch.device) -> Kernel:
        """A function of the region's inputs (tensors on ``device``) returning a tuple of its outputs."""
        raise NotImplementedError


class CompiledRegion(torch.nn.Module):
    """A compiled region inside an emitted ``GraphModule``: calls the backend's kernel.

    A module, so that the emitter attaches it as a submodule and the kernel's
    own state (sessions, compiled libraries) lives as long as the module.
    """

    def __init__(self, kernel: Kernel, backend: str, region_hash: str):
        super().__init__()
        self.kernel, self.backend, self.region_hash = kernel, backend, region_hash

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.kernel(*inputs))

    __call__ = forward
    """Called straight: a compiled region has no hooks, and ``nn.Module``'s call dispatch cost a few µs per run."""

    def extra_repr(self) -> str:
        return f"backend={self.backend}, region={self.region_hash}"


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    if not cls.name or cls.name in BACKENDS:
        raise ValueError(f"backend {cls.__name__} needs a unique name, got {cls.name!r}")
    BACKENDS[cls.name] = cls
    return cls


def cache_dir(*parts: str) -> Path:
    """graphopt's cache folder (``$GRAPHOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphopt``, else
    ``~/.cache/graphopt``), with ``parts`` below it, created on first use."""
    root = os.environ.get("GRAPHOPT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphopt"
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def static_tensors_only(node: Node) -> bool:
    """Whether every value ``node`` reads and writes is a tensor of static shape (what ahead-of-time
    compilers need: a fixed signature)."""
    values = [v for v in (*node.inputs, *node.outputs) if v is not None]
    return all(isinstance(v.type, TensorType) and v.type.is_static for v in values)


def random_inputs(region: Region, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Random tensors for the region's inputs: normal floats, small non-negative integers, booleans."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for v in region.graph.inputs:
        t = v.type
        if isinstance(t, ScalarType) or not isinstance(t, TensorType) or not t.is_static:
            raise ValueError(f"region input %{v.name} has no static tensor type ({t})")
        if t.dtype.is_floating_point:
            x = torch.randn(t.shape, generator=generator).to(t.dtype)
        elif t.dtype == torch.bool:
            x = torch.rand(t.shape, generator=generator) < 0.5
        else:
            x = torch.randint(0, 2, t.shape, generator=generator).to(t.dtype)
        tensors.append(x.to(device))
    return tensors


def device_of(tensors: Sequence[torch.Tensor]) -> torch.device:
    return next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
