"""Band attention in Triton: the GPU kernel of ``passes/sparse_attention`` (Sparse VideoGen's block-sparse
attention, with its token permutation folded into the loads).

One program computes one tile of query rows of one head (a band's block, or
a part of a block longer than ``MAX_ROWS``, sharing its window), FlashAttention's way
(Dao et al. 2022: an online softmax over key blocks, nothing materialised),
over the head's band of keys and then over the text keys. Each head reads its
tokens through a row of ``order`` (``order[layout[h], i]`` is where token
``i`` of the band's order lives in memory), so temporal heads run on
token-major order without a permuted copy of q, k and v, and the output is
stored straight back in frame-major order.
"""
from __future__ import annotations

import math

import torch

from . import _triton

KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def attend(q, k, v, col_ok, best, total, acc, scale):
    """One key block folded into the running softmax (max, sum, weighted values)."""
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
    s = tl.where(col_ok[None, :], s, float("-inf"))
    new = tl.maximum(best, tl.max(s, 1))
    p = tl.exp(s - new[:, None])
    shrink = tl.exp(best - new)
    return new, total * shrink + tl.sum(p, 1), acc * shrink[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)


@triton.jit
def band_attention_kernel(Q, K, V, TK, TV, O, HEADS, ORDER, LAYOUT, STARTS, scale, tokens, text, window,
                          sq_h, sq_n, sk_h, sk_n, sv_h, sv_n, stk_h, stk_n, stv_h, stv_n, so_h, so_n,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    block = tl.program_id(0)
    head = tl.load(HEADS + tl.program_id(1))
    order = ORDER + tl.load(LAYOUT + head) * tokens
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tokens
    where = tl.load(order + rows, mask=row_ok, other=0)
    d = tl.arange(0, D)
    q = tl.load(Q + head * sq_h + where[:, None] * sq_n + d[None, :], mask=row_ok[:, None], other=0.0)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    start = tl.load(STARTS + block)
    for n in range(0, window, BLOCK_N):
        cols = n + tl.arange(0, BLOCK_N)
        col_ok = cols < window
        at = tl.load(order + start + cols, mask=col_ok, other=0)
        k = tl.load(K + head * sk_h + at[:, None] * sk_n + d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + head * sv_h + at[:, None] * sv_n + d[None, :], mask=col_ok[:, None], other=0.0)
        best, total, acc = attend(q, k, v, col_ok, best, total, acc, scale)
    for n in range(0, text, BLOCK_N):
        cols = n + tl.arange(0, BLOCK_N)
        col_ok = cols < text
        k = tl.load(TK + head * stk_h + cols[:, None] * stk_n + d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(TV + head * stv_h + cols[:, None] * stv_n + d[None, :], mask=col_ok[:, None], other=0.0)
        best, total, acc = attend(q, k, v, col_ok, best, total, acc, scale)
    out = acc / total[:, None]
    tl.store(O + head * so_h + where[:, None] * so_n + d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
'''


MAX_ROWS = 128
"""Query rows per program at most: a band's longer blocks (CPU-sized, up to 1,024 rows) run as several."""


def unavailable(device: torch.device) -> str | None:
    """Why the kernel cannot run on ``device`` here, or None."""
    return _triton.unavailable(device)


def takes(dim: int) -> bool:
    """Whether the kernel takes head dim ``dim`` (``tl.arange`` needs a power of two)."""
    return dim >= 16 and dim & (dim - 1) == 0


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int], window: int, block: int,
                   order: torch.Tensor, layouts: torch.Tensor, text_k: torch.Tensor | None = None,
                   text_v: torch.Tensor | None = None, scale: float | None = None, out: torch.Tensor | None = None,
                   heads: torch.Tensor | None = None) -> torch.Tensor:
    """``q, k, v``: ``[heads, tokens, d]`` (any strides along heads and tokens, d contiguous); head ``h``
    reads token ``i`` of its band order at ``order[layouts[h], i]``; query block ``b`` attends keys
    ``starts[b]:starts[b] + window`` of that order, then every text key (``[heads, text, d]``). Computes
    the ``heads`` listed (all by default) into ``out`` (``[heads, tokens, d]``, any strides, memory order
    like ``q``; a new tensor by default) and returns it."""
    count, tokens, dim = q.shape
    if not takes(dim):
        raise ValueError(f"the Triton band attention takes head dims that are powers of two >= 16, not {dim}")
    if text_k is None or text_v is None:
        text_k = text_v = q.new_zeros(count, 0, dim)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if heads is None:
        heads = torch.arange(count)
    tile = math.gcd(block, MAX_ROWS) if block % 16 == 0 else block  # a program's rows; tiles of a block share its window
    starts = [starts[i * tile // block] for i in range(-(-tokens // tile))]
    kernel = _triton.load_text("band_attention_kernel", KERNEL)
    device = q.device
    kernel[(len(starts), len(heads))](
        q, k, v, text_k, text_v, out, heads.to(device, torch.int32), order.to(device, torch.int32).contiguous(),
        layouts.to(device, torch.int32).contiguous(), torch.tensor(starts, dtype=torch.int32, device=device),
        dim ** -0.5 if scale is None else scale, tokens, text_k.shape[1], window,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        text_k.stride(0), text_k.stride(1), text_v.stride(0), text_v.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=tile, BLOCK_N=16 if _triton.interpreting() else 64, D=dim)
    return out
