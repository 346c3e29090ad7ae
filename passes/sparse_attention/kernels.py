"""Band attention: block-sparse attention whose kept key blocks form one run per query block.

After Sparse VideoGen's layout transform both head kinds are bands
(``grid.Band``), so the kernel needs no block index lists: each query block
attends to one contiguous slice of the keys, plus the text keys every video
row sees. On CPU each block is one call of ATen's fused (flash) SDPA kernel on
its slice, so nothing outside the band is computed or materialised; the work
is ``window / tokens`` of dense attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .grid import Band


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: Band,
                   extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None,
                   key_mask: torch.Tensor | None = None, extra_mask: torch.Tensor | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """``q, k, v``: ``[..., tokens, d]`` in the band's token order. Row block ``i`` attends to keys
    ``starts[i]:starts[i] + window`` and to all ``extra_k/extra_v`` (``[..., extra, d]``, text).
    ``key_mask`` and ``extra_mask`` (``[..., 1, tokens]`` and ``[..., 1, extra]``, both or neither, boolean or
    additive) mask keys for every row (a text padding mask)."""
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
