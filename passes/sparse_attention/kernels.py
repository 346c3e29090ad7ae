"""Band attention: block-sparse attention whose kept key blocks form one run per query block.

After Sparse VideoGen's layout transform both head kinds are bands
(``grid.Band``), so the kernel needs no block index lists: each query block
attends to one contiguous slice of the keys, plus the text keys every video
row sees. On CPU each block is one call of ATen's fused (flash) SDPA kernel on
its slice, so nothing outside the band is computed or materialised; the work
is ``window / tokens`` of dense attention. Text keys are attended once for
all rows and merged into each block's result through the two log-sum-exps
(exact: the keys are disjoint), where ATen's CPU kernel returns them; else
each block's slice is joined with the text keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from graphopt._torch_private import attention_with_logsumexp

from .grid import Band


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: Band,
                   extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None,
                   key_mask: torch.Tensor | None = None, extra_mask: torch.Tensor | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """``q, k, v``: ``[..., tokens, d]`` in the band's token order. Row block ``i`` attends to keys
    ``starts[i]:starts[i] + window`` and to all ``extra_k/extra_v`` (``[..., extra, d]``, text).
    ``key_mask`` and ``extra_mask`` (``[..., 1, tokens]`` and ``[..., 1, extra]``, both or neither, boolean or
    additive) mask keys for every row (a text padding mask)."""
    if extra_k is not None and key_mask is None:
        merged = _band_then_text(q, k, v, band, extra_k, extra_v, scale)
        if merged is not None:
            return merged
    tokens = q.shape[-2]
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    for i, start in enumerate(band.starts(tokens)):
        rows = slice(i * band.block, min((i + 1) * band.block, tokens))
        keys = slice(start, start + band.window)
        kb, vb = k[..., keys, :], v[..., keys, :]
        mask = None if key_mask is None else key_mask[..., keys]
        if extra_k is not None:
            kb, vb = torch.cat([kb, extra_k], -2), torch.cat([vb, extra_v], -2)
            if mask is not None:
                mask = torch.cat([mask, extra_mask], -1)
        out[..., rows, :] = F.scaled_dot_product_attention(q[..., rows, :], kb, vb, attn_mask=mask, scale=scale)
    return out


def _band_then_text(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: Band, extra_k: torch.Tensor,
                    extra_v: torch.Tensor, scale: float | None) -> torch.Tensor | None:
    """The band and the text keys attended apart and merged by log-sum-exp; None where the kernel that
    returns log-sum-exps does not run."""
    if q.dim() < 3:
        return None
    shape = q.shape
    q, k, v, extra_k, extra_v = (x.reshape(-1, *x.shape[-3:]) for x in (q, k, v, extra_k, extra_v))  # 4-D
    text = attention_with_logsumexp(q, extra_k, extra_v, scale)
    if text is None:
        return None
    tokens = q.shape[-2]
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    for i, start in enumerate(band.starts(tokens)):
        rows = slice(i * band.block, min((i + 1) * band.block, tokens))
        keys = slice(start, start + band.window)
        out[..., rows, :], lse[..., rows] = attention_with_logsumexp(q[..., rows, :], k[..., keys, :],
                                                                     v[..., keys, :], scale)
    text_out, text_lse = text
    band_share = torch.sigmoid(lse - text_lse)  # of each row's softmax mass: e^lse / (e^lse + e^text_lse)
    merged = text_out.lerp_(out, band_share[..., None].to(out.dtype))  # one pass over the rows
    return merged.reshape(*shape[:-1], v.shape[-1])


def band_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: Band,
                             extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None,
                             scale: float | None = None) -> torch.Tensor:
    """Dense attention under the band's boolean mask: what ``band_attention`` computes, spelled out."""
    tokens = q.shape[-2]
    mask = band.mask(torch.arange(tokens, device=q.device), tokens)
    if extra_k is not None:
        mask = torch.cat([mask, mask.new_ones(tokens, extra_k.shape[-2])], -1)
        k, v = torch.cat([k, extra_k], -2), torch.cat([v, extra_v], -2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
