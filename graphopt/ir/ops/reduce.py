"""Reductions over a list of dims (``dims=None`` reduces everything)."""
from __future__ import annotations

import torch

from ..registry import OpDef, register_op


def _dims(x: torch.Tensor, dims):
    return list(range(x.dim())) if dims is None else list(dims)


def sum(x: torch.Tensor, dims=None, keepdim: bool = False) -> torch.Tensor:  # noqa: A001
    return torch.sum(x, _dims(x, dims), keepdim=keepdim)


def mean(x: torch.Tensor, dims=None, keepdim: bool = False) -> torch.Tensor:
    return torch.mean(x, _dims(x, dims), keepdim=keepdim)


def amax(x: torch.Tensor, dims=None, keepdim: bool = False) -> torch.Tensor:
    return torch.amax(x, _dims(x, dims), keepdim=keepdim)


def amin(x: torch.Tensor, dims=None, keepdim: bool = False) -> torch.Tensor:
    return torch.amin(x, _dims(x, dims), keepdim=keepdim)


def prod(x: torch.Tensor, dims=None, keepdim: bool = False) -> torch.Tensor:
    for d in sorted((d % max(x.dim(), 1) for d in _dims(x, dims)), reverse=True):
        x = torch.prod(x, d, keepdim=keepdim)
    return x


def var(x: torch.Tensor, dims=None, correction: float = 1.0, keepdim: bool = False) -> torch.Tensor:
    return torch.var(x, _dims(x, dims), correction=correction, keepdim=keepdim)


def any(x: torch.Tensor, dims=None, keepdim: bool = False) -> torch.Tensor:  # noqa: A001
    return torch.any(x, _dims(x, dims), keepdim=keepdim) if x.dim() else x.bool()


def all(x: torch.Tensor, dims=None, keepdim: bool = False) -> torch.Tensor:  # noqa: A001
    return torch.all(x, _dims(x, dims), keepdim=keepdim) if x.dim() else x.bool()


def argmax(x: torch.Tensor, dim: int = 0, keepdim: bool = False) -> torch.Tensor:
    return torch.argmax(x, dim, keepdim)


def argmin(x: torch.Tensor, dim: int = 0, keepdim: bool = False) -> torch.Tensor:
    return torch.argmin(x, dim, keepdim)


def cumsum(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.cumsum(x, dim)


def topk(x: torch.Tensor, k: int = 1, dim: int = -1, largest: bool = True, sorted: bool = True):  # noqa: A002
    values, indices = torch.topk(x, k, dim, largest, sorted)
    return values, indices


for _fn in (sum, mean, amax, amin, prod, var, any, all, argmax, argmin, cumsum):
    register_op(OpDef(_fn.__name__, _fn, category="reduction", row_op=_fn in (sum, mean, amax, amin, var),
                      scan=_fn is cumsum, keeps_dims=_fn is cumsum))
register_op(OpDef("topk", topk, category="reduction", num_outputs=2, scan=True))
