"""Value types of the IR: tensors with static or symbolic shapes, scalars, and the rest.

A dimension is an ``int`` when known, or a ``str`` naming a symbol (``"batch"``,
``"s0"``, ``"2*s0"``) when it is not. A shape of ``None`` means the rank is unknown.
Dtypes are ``torch.dtype``: the IR treats torch tensors as its data format.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

Dim = Union[int, str]


@dataclass(frozen=True)
class TensorType:
    dtype: torch.dtype
    shape: tuple[Dim, ...] | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    @property
    def numel(self) -> int | None:
        """Element count, or None when any dimension is symbolic."""
        return math.prod(self.shape) if self.is_static else None

    @property
    def itemsize(self) -> int:
        return dtype_itemsize(self.dtype)

    @property
    def nbytes(self) -> int | None:
        n = self.numel
        return None if n is None else n * self.itemsize

    @staticmethod
    def of(t: torch.Tensor) -> "TensorType":
        return TensorType(t.dtype, tuple(int(d) for d in t.shape))

    def __str__(self) -> str:
        dims = "?" if self.shape is None else ",".join(str(d) for d in self.shape)
        return f"{dtype_name(self.dtype)}[{dims}]"


@dataclass(frozen=True)
class ScalarType:
    """A host scalar flowing through the graph (a symbolic size, a step counter)."""

    dtype: torch.dtype

    def __str__(self) -> str:
        return f"scalar<{dtype_name(self.dtype)}>"


@dataclass(frozen=True)
class OpaqueType:
    """A value the IR does not model (an ONNX sequence or optional, a torch object)."""

    description: str = "opaque"

    def __str__(self) -> str:
        return f"opaque<{self.description}>"


Type = Union[TensorType, ScalarType, OpaqueType]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_itemsize(dtype: torch.dtype) -> int:
    if dtype == torch.bool:
        return 1
    return torch.empty((), dtype=dtype).element_size()
