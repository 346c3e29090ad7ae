"""``SparseVideoAttention``: the module a ``video_sparse_attention`` node becomes.

Per call it counts the sampling step (its memory lives on the emitted
module's ``GraphState``, so each CFG branch and each generation keeps its
own), runs dense for the first ``dense_steps`` calls, profiles the heads
every ``profile_every`` calls after that, and runs each head kind as one
band attention: spatial heads in frame-major order, temporal heads
token-major (permuted in, permuted back), dense heads through SDPA. Text rows
attend densely; text keys are seen by every row.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from .grid import Band, VideoGrid
from .kernels import band_attention
from .profile import DENSE, SPATIAL, TEMPORAL, HeadMap, classify_heads, sample_rows


@dataclass(frozen=True)
class Settings:
    """What one sparse attention does; ``first_tokens`` and ``dense_heads=False`` give SVG's recipe."""

    grid: VideoGrid
    density: float = 0.25
    block: int | None = None
    budget: float = 0.05
    samples: int = 64
    dense_steps: int = 0
    profile_every: int = 1
    first_tokens: int | None = None
    dense_heads: bool = True
    scale: float | None = None

    @property
    def band(self) -> Band:
        return Band.for_density(self.grid.video, self.density, self.block)


@dataclass
class Memory:
    """What one sparse attention remembers between calls of one generation and branch."""

    calls: int = 0
    heads: int = 0
    head_map: HeadMap | None = None
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    profiles: list[dict[str, int]] = field(default_factory=list)


class SparseVideoAttention(torch.nn.Module):
    """Attention over a video token grid, sparse per head after profiling (Sparse VideoGen)."""

    def __init__(self, settings: Settings, state: Any, key: str):
        super().__init__()
        self.settings = settings
        self.state = state
        self.key = key

    def set_options(self, **options: Any) -> None:
        self.settings = replace(self.settings, **options)

    def memory(self) -> Memory:
        return self.state.keep(self.key, Memory)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = self.settings
        grid = s.grid.for_sequence(q.shape[-2])
        if grid is not s.grid:
            s = replace(s, grid=grid)
        memory = self.memory()
        step = memory.calls
        memory.calls += 1
        memory.heads = q.shape[0] * q.shape[1]
        if step < s.dense_steps:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s.scale)
        flat = [x.flatten(0, 1) for x in (q, k, v)]
        key_mask = None if mask is None else mask.expand(*q.shape[:2], 1, k.shape[-2]).flatten(0, 1)
        if memory.head_map is None or (step - s.dense_steps) % s.profile_every == 0:
            rows = sample_rows(s.grid, s.samples, memory.generator, s.first_tokens)
            memory.head_map = classify_heads(*flat, s.grid, s.band, rows, s.budget if s.dense_heads else float("inf"),
                                             s.scale, key_mask)
            memory.profiles.append(memory.head_map.counts())
        out = self.run(*flat, memory.head_map.kinds, key_mask, s)
        return out.unflatten(0, q.shape[:2])

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kinds: torch.Tensor,
            key_mask: torch.Tensor | None, s: Settings) -> torch.Tensor:
        """``q, k, v``: ``[heads, tokens, d]``; ``kinds``: each head's kind; ``s``: this call's settings."""
        grid, band = s.grid, s.band
        video, text = grid.video_span, grid.text_span
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        if grid.text:
            out[:, text] = F.scaled_dot_product_attention(q[:, text], k, v, attn_mask=key_mask, scale=s.scale)
        out_video = out[:, video]
        for kind in (SPATIAL, TEMPORAL, DENSE):
            heads = (kinds == kind).nonzero().flatten()
            if len(heads) == 0:
                continue
            every = len(heads) == len(kinds)
            qh, kh, vh = (x if every else x[heads] for x in (q, k, v))
            mh = None if key_mask is None else key_mask if every else key_mask[heads]
            if kind == DENSE:
                o = F.scaled_dot_product_attention(qh[:, video], kh, vh, attn_mask=mh, scale=s.scale)
            else:
                qv, kv, vv = qh[:, video], kh[:, video], vh[:, video]
                if kind == TEMPORAL:
                    qv, kv, vv = (grid.to_token_major(x) for x in (qv, kv, vv))
                masks = (None, None)
                if mh is not None:
                    vm = mh[..., video]
                    masks = (grid.to_token_major(vm, -1) if kind == TEMPORAL else vm, mh[..., text])
                o = band_attention(qv, kv, vv, band, kh[:, text] if grid.text else None,
                                   vh[:, text] if grid.text else None, *masks, scale=s.scale)
                if kind == TEMPORAL:
                    o = grid.to_frame_major(o)
            if every:
                out_video.copy_(o)
            else:
                out_video.index_copy_(0, heads, o)
        return out

    def head_counts(self) -> dict[str, int]:
        """Heads of each kind over every profile so far (all branches), summed, and the calls made."""
        total: dict[str, int] = {"spatial": 0, "temporal": 0, "dense": 0, "calls": 0, "heads": 0}
        for memory in self.state.memories_of(self.key):
            total["calls"] += memory.calls
            total["heads"] = max(total["heads"], memory.heads)
            for counts in memory.profiles:
                for kind, n in counts.items():
                    total[kind] = total.get(kind, 0) + n
        return total

    def extra_repr(self) -> str:
        g = self.settings.grid
        return (f"grid={g.frames}x{g.height}x{g.width}, text={g.text}, density={self.settings.density}, "
                f"budget={self.settings.budget}")
