"""Normalisations and softmax: row reductions fused with an elementwise epilogue."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import OpDef, register_op


def batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, running_mean: torch.Tensor,
               running_var: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Inference batch norm over dim 1 with running statistics (training BN stays opaque)."""
    return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               normalized_shape=(), eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, list(normalized_shape), weight, bias, eps)


def group_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               num_groups: int = 1, eps: float = 1e-5) -> torch.Tensor:
    return F.group_norm(x, num_groups, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, normalized_shape=(),
             eps: float | None = None) -> torch.Tensor:
    return F.rms_norm(x, list(normalized_shape), weight, eps)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.softmax(x, dim)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.log_softmax(x, dim)


for _fn in (batch_norm, layer_norm, group_norm, rms_norm, softmax, log_softmax):
    register_op(OpDef(_fn.__name__, _fn, category="norm", doc=(_fn.__doc__ or "").strip(),
                      row_op=_fn not in (batch_norm, group_norm), channels_last_kernel=_fn is batch_norm,
                      channelwise=_fn is batch_norm,
                      keeps_dims=_fn in (softmax, log_softmax)))
