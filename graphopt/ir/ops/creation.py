"""Ops that create tensors from attributes alone, or like another tensor."""
from __future__ import annotations

import torch

from ..registry import OpDef, register_op


def full(shape=(), value: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full(list(shape), value, dtype=dtype)


def full_like(x: torch.Tensor, value: float = 0.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.full_like(x, value, dtype=dtype)


def arange(start: float = 0, end: float = 0, step: float = 1, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.arange(start, end, step, dtype=dtype)


for _fn in (full, full_like, arange):
    register_op(OpDef(_fn.__name__, _fn, category="data", flops=lambda n: 0, reads_shape_only=_fn is full_like))
