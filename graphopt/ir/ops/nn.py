"""Windowed ops: pooling and resampling."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import OpDef, register_op, shape_of


def max_pool(x: torch.Tensor, kernel_size=(), stride=(), padding=(0,), dilation=(1,),
             ceil_mode: bool = False) -> torch.Tensor:
    """N-d max pooling (1-3 spatial dims) with symmetric padding."""
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel_size)]
    return fn(x, list(kernel_size), list(stride) or None, list(padding), list(dilation), ceil_mode)


def avg_pool(x: torch.Tensor, kernel_size=(), stride=(), padding=(0,), ceil_mode: bool = False,
             count_include_pad: bool = True, divisor_override: int | None = None) -> torch.Tensor:
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel_size)]
    if len(kernel_size) == 1:
        return fn(x, list(kernel_size), list(stride) or None, list(padding), ceil_mode, count_include_pad)
    return fn(x, list(kernel_size), list(stride) or None, list(padding), ceil_mode, count_include_pad,
              divisor_override)


def adaptive_avg_pool(x: torch.Tensor, output_size=()) -> torch.Tensor:
    fn = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(output_size)]
    return fn(x, list(output_size))


def interpolate(x: torch.Tensor, size=None, scale_factor=None, mode: str = "nearest",
                align_corners: bool | None = None) -> torch.Tensor:
    """Resample the spatial dims (``F.interpolate`` semantics)."""
    return F.interpolate(x, size=None if size is None else list(size),
                         scale_factor=None if scale_factor is None else list(scale_factor), mode=mode,
                         align_corners=align_corners)


def _pool_flops(node) -> int:
    return math.prod(shape_of(node.output)) * math.prod(node.attrs["kernel_size"])


register_op(OpDef("max_pool", max_pool, category="pool", flops=_pool_flops, doc=max_pool.__doc__,
                  channels_last_kernel=True))
register_op(OpDef("avg_pool", avg_pool, category="pool", flops=_pool_flops, channels_last_kernel=True))
register_op(OpDef("adaptive_avg_pool", adaptive_avg_pool, category="pool", channels_last_kernel=True))
register_op(OpDef("interpolate", interpolate, category="pool", doc=interpolate.__doc__))
