"""Contractions: matmul, linear, gemm, convolution, einsum, attention."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..registry import OpDef, register_op, shape_of


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul`` (= ONNX MatMul): batched, broadcasting, 1-D operands promoted."""
    return torch.matmul(a, b)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` with weight ``[out, in]``: the nn.Linear form pruning reads."""
    return F.linear(x, weight, bias)


def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None, alpha: float = 1.0, beta: float = 1.0,
         trans_a: bool = False, trans_b: bool = False) -> torch.Tensor:
    """ONNX Gemm / ATen addmm: ``alpha * op(a) @ op(b) + beta * c`` on 2-D operands."""
    a = a.t() if trans_a else a
    b = b.t() if trans_b else b
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=(1,), padding=(0,),
         dilation=(1,), groups: int = 1, transposed: bool = False, output_padding=(0,)) -> torch.Tensor:
    """N-d convolution or transposed convolution with symmetric padding (asymmetric pads become a ``pad``)."""
    return torch.convolution(x, weight, bias, list(stride), list(padding), list(dilation), transposed,
                             list(output_padding), groups)


def einsum(*operands: torch.Tensor, equation: str) -> torch.Tensor:
    return torch.einsum(equation, *operands)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Scaled dot-product attention, ``softmax(q k^T * scale + mask) v`` (torch's SDPA)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


def grouped_heads(q_shape: Sequence, k_shape: Sequence) -> bool:
    """Whether ``k`` holds fewer heads (dim -3) than ``q``: grouped-query attention, which the ``sdpa`` op
    computes only under ``enable_gqa`` (torch's fused kernels, e.g. ATen's CPU flash attention, take
    such inputs without the flag)."""
    heads_q, heads_k = (s[-3] if len(s) >= 3 else None for s in (q_shape, k_shape))
    return isinstance(heads_q, int) and isinstance(heads_k, int) and heads_k < heads_q


def _matmul_flops(node) -> int:
    a, b = (shape_of(v) for v in node.inputs[:2])
    out = shape_of(node.output)
    k = a[-1]
    return 2 * math.prod(out) * k


def _linear_flops(node) -> int:
    w = shape_of(node.inputs[1])
    out = shape_of(node.output)
    return 2 * math.prod(out) * w[1] + (math.prod(out) if node.inputs[2:3] and node.inputs[2] is not None else 0)


def _gemm_flops(node) -> int:
    a = shape_of(node.inputs[0])
    k = a[0] if node.attrs["trans_a"] else a[1]
    return 2 * math.prod(shape_of(node.output)) * k


def _conv_flops(node) -> int:
    w = shape_of(node.inputs[1])
    if node.attrs["transposed"]:
        x = shape_of(node.inputs[0])
        return 2 * math.prod(x) * math.prod(w[1:])
    return 2 * math.prod(shape_of(node.output)) * math.prod(w[1:])


def _sdpa_flops(node) -> int:
    q, k = shape_of(node.inputs[0]), shape_of(node.inputs[1])
    v_dim = shape_of(node.inputs[2])[-1]
    return 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v_dim)


def _einsum_flops(node) -> int:
    eq = node.attrs["equation"].replace(" ", "")
    lhs = eq.split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for term, v in zip(lhs, node.inputs):
        if "..." in term:
            return 2 * math.prod(shape_of(node.output))
        for letter, d in zip(term, shape_of(v)):
            sizes[letter] = d
    return 2 * math.prod(sizes.values())


register_op(OpDef("matmul", matmul, category="matmul", flops=_matmul_flops, doc=matmul.__doc__))
register_op(OpDef("linear", linear, category="matmul", flops=_linear_flops, doc=linear.__doc__))
register_op(OpDef("gemm", gemm, category="matmul", flops=_gemm_flops, doc=gemm.__doc__))
register_op(OpDef("conv", conv, category="conv", flops=_conv_flops, doc=conv.__doc__, channels_last_kernel=True))
register_op(OpDef("einsum", einsum, category="matmul", flops=_einsum_flops))
register_op(OpDef("sdpa", sdpa, category="attention", flops=_sdpa_flops, doc=sdpa.__doc__))
