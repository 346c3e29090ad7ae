"""Online head profiling: is each head spatial, temporal, or neither (dense)?

Sparse VideoGen's test, made cheaper to trust: a few query rows per head are
attended exactly, once against all keys and once under each head kind's
band; the kind whose sampled output is closer wins. Two choices SVG does not
have: bands of several widths (each twice the last), the narrowest whose
closer kind keeps the sampled error under ``budget`` (relative squared error)
winning, and dense for a head no band fits. Rows are drawn from every frame (SVG
draws from the first 10,000 tokens, so later frames of long videos are never
looked at); ``sample_rows(first=...)`` reproduces SVG's draw for comparison.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .grid import Band, VideoGrid

SPATIAL, TEMPORAL, DENSE = 0, 1, 2
KINDS = ("spatial", "temporal", "dense")


@dataclass
class HeadMap:
    """Each head's kind (``[heads]`` of SPATIAL/TEMPORAL/DENSE), the band it runs (``[heads]``, an index into
    the bands profiled; 0 for dense heads) and the sampled relative errors (``[heads, bands, 2]``: spatial,
    temporal)."""

    kinds: torch.Tensor
    levels: torch.Tensor
    errors: torch.Tensor

    def counts(self) -> dict[str, int]:
        return {name: int((self.kinds == k).sum()) for k, name in enumerate(KINDS)}


def sample_rows(grid: VideoGrid, samples: int, generator: torch.Generator, first: int | None = None) -> torch.Tensor:
    """``samples`` video query rows (frame-major video positions): spread evenly over the frames, at random
    positions within each; or, with ``first``, uniformly among the first ``first`` tokens (SVG's draw)."""
    if first is not None:
        return torch.randint(0, min(first, grid.video), (samples,), generator=generator)
    frames = torch.arange(samples) % grid.frames
    return frames * grid.per_frame + torch.randint(0, grid.per_frame, (samples,), generator=generator)


def classify_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: VideoGrid, bands: Sequence[Band],
                   rows: torch.Tensor, budget: float, scale: float | None = None,
                   mask: torch.Tensor | None = None, token_major: bool = False) -> HeadMap:
    """``q, k, v``: ``[heads, tokens, d]`` over the whole joint sequence, video tokens frame-major (or
    ``token_major``); ``bands``: narrowest first; ``rows``: frame-major video positions to test; ``mask``: an
    additive or boolean key mask ``[heads or 1, 1, tokens]`` in the same order as the keys."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    span, device = grid.video_span, q.device
    positions = grid.token_major_positions.to(device)
    rows = rows.to(device)
    stored = grid.orders(token_major)[0].to(device)  # where frame-major token i is held
    queries = q[:, span][:, stored[rows]]
    scores = (queries @ k.transpose(-1, -2)).float().mul_(scale)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask.float())
    weights = scores.sub_(scores.amax(-1, keepdim=True)).exp_()  # softmax's numerators, shared by every band
    values = v.float()
    exact = (weights @ values) / weights.sum(-1, keepdim=True)
    norm = exact.square().sum((-1, -2)).clamp_min(1e-30)
    errors = torch.empty(len(q), len(bands), 2, device=device)
    keep = torch.ones(len(rows), grid.tokens, dtype=weights.dtype, device=device)
    kept = torch.empty_like(weights)  # one buffer for every band: these are the profile's largest tensors
    held = torch.argsort(stored)  # the frame-major index of the token held at j
    for level, band in enumerate(bands):
        spatial = band.mask(rows, grid.video)[:, held]
        temporal = band.mask(positions[rows], grid.video)[:, positions[held]]
        for kind, video_keys in ((SPATIAL, spatial), (TEMPORAL, temporal)):
            keep[:, span] = video_keys
            torch.mul(weights, keep, out=kept)
            approx = (kept @ values) / kept.sum(-1, keepdim=True).clamp_min(1e-30)
            errors[:, level, kind] = (approx - exact).square().sum((-1, -2)) / norm
    best, kinds = errors.min(-1)  # [heads, bands]
    fits = best <= budget
    levels = torch.where(fits.any(-1), fits.float().argmax(-1), torch.zeros_like(fits[:, 0], dtype=torch.long))
    chosen = kinds.gather(1, levels[:, None]).squeeze(1)
    if budget != float("inf"):
        chosen = torch.where(fits.any(-1), chosen, torch.full_like(chosen, DENSE))
    return HeadMap(chosen, levels, errors)
