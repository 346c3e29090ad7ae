"""``SparseVideoAttention``: the module a ``video_sparse_attention`` node becomes.

Per call it counts the sampling step (its memory lives on the emitted
module's ``GraphState``, so each CFG branch and each generation keeps its
own), runs dense for the first ``dense_steps`` calls, profiles the heads
every ``profile_every`` calls after that, and runs the heads of each kind and
band width as one band attention: spatial heads in frame-major order,
temporal heads token-major, dense heads through SDPA. Its inputs hold the
video tokens in one of the two orders (``order``: the graph's layout, see
the pass's ``layout`` option). With torch's kernels the heads of the other
kind are permuted in and back (four gathers of their q, k, v and output per
call); the Triton kernel reads every head through an order table, with no
copies. Text rows attend densely; text keys are seen by every row. While
``timing`` is set (calibration's time model), each call is clocked, the dense
steps apart from the rest.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Hashable
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
    levels: int = 1
    """Band widths profiling may choose per head: ``density``, twice it, ... (below 1)."""
    block: int | None = None
    budget: float = 0.05
    samples: int = 64
    dense_steps: int = 0
    profile_every: int = 1
    first_tokens: int | None = None
    dense_heads: bool = True
    scale: float | None = None
    kernel: str = "auto"
    """``"auto"`` (on a GPU, whichever of Triton's and torch's kernels timed faster on the call's shapes;
    torch's elsewhere), ``"triton"`` or ``"torch"``."""
    order: str = "frame"
    """The order of the video tokens in q, k, v, the key mask and the output: ``"frame"`` or ``"token"``."""

    @property
    def token_major(self) -> bool:
        return self.order == "token"

    @property
    def bands(self) -> tuple[Band, ...]:
        """The bands a head may run, narrowest first (a tuple: part of ``kernel_for``'s key)."""
        bands: list[Band] = []
        for level in range(self.levels):
            band = Band.for_density(self.grid.video, self.density * 2 ** level, self.block)
            if band.window >= self.grid.video and bands:
                break
            if not bands or band.window > bands[-1].window:
                bands.append(band)
        return tuple(bands)


@dataclass
class Memory:
    """What one sparse attention remembers between calls of one generation and branch."""

    calls: int = 0
    heads: int = 0
    head_map: HeadMap | None = None
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    profiles: list[dict[str, int]] = field(default_factory=list)
    kernels: Counter = field(default_factory=Counter)
    """Calls whose sparse heads each kernel ran."""
    seconds: list[float] = field(default_factory=lambda: [0.0, 0.0])
    """While timed: seconds spent in the calls run dense (the first ``dense_steps``) and in the rest."""
    timed_calls: list[int] = field(default_factory=lambda: [0, 0])
    """While timed: how many calls of each of the two."""
    dense_flops: float = 0.0
    """What the calls so far would have cost dense (``4 d`` per query-key pair, as FLOP counters count)."""
    flops: float = 0.0
    """What they cost: sparse heads' video rows see their band and the text keys."""


class SparseVideoAttention(torch.nn.Module):
    """Attention over a video token grid, sparse per head after profiling (Sparse VideoGen)."""

    def __init__(self, settings: Settings, state: Any, key: str):
        super().__init__()
        self.settings = settings
        self.state = state
        self.key = key
        self.timing = False
        """Whether calls are timed (calibration's time model; on CUDA each timed call synchronises)."""

    def set_options(self, **options: Any) -> None:
        self.settings = replace(self.settings, **options)

    def memory(self) -> Memory:
        return self.state.keep(self.key, Memory)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.timing:
            return self.attend(q, k, v, mask)
        sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        out = self.attend(q, k, v, mask)
        sync()
        memory = self.memory()
        ran_dense = memory.calls <= self.settings.dense_steps
        memory.seconds[not ran_dense] += time.perf_counter() - start
        memory.timed_calls[not ran_dense] += 1
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        s = self.settings
        grid = s.grid.for_sequence(q.shape[-2])
        if grid is not s.grid:
            s = replace(s, grid=grid)
        memory = self.memory()
        step = memory.calls
        memory.calls += 1
        memory.heads = q.shape[0] * q.shape[1]
        dense = 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        memory.dense_flops += dense
        if step < s.dense_steps:
            memory.flops += dense
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s.scale)
        flat = [x.flatten(0, 1) for x in (q, k, v)]
        key_mask = None if mask is None else mask.expand(*q.shape[:2], 1, k.shape[-2]).flatten(0, 1)
        stale = memory.head_map is None or len(memory.head_map.kinds) != len(flat[0])  # a new batch size
        if stale or (step - s.dense_steps) % s.profile_every == 0:
            rows = sample_rows(s.grid, s.samples, memory.generator, s.first_tokens)
            memory.head_map = classify_heads(*flat, s.grid, s.bands if s.dense_heads else s.bands[:1], rows,
                                             s.budget if s.dense_heads else float("inf"), s.scale, key_mask,
                                             s.token_major)
            memory.profiles.append(memory.head_map.counts())
        head_map = memory.head_map
        windows = torch.tensor([b.window for b in s.bands], dtype=torch.float64)[head_map.levels.cpu()]
        sparse = (head_map.kinds != DENSE).cpu()  # their video rows skip the keys off their band
        saved = float((grid.video * (1 - (windows + grid.text) / k.shape[2]))[sparse].sum())
        memory.flops += dense * (1 - saved / (q.shape[0] * q.shape[1] * q.shape[2]))
        out = self.run(*flat, head_map.kinds, head_map.levels, key_mask, s)
        return out.unflatten(0, q.shape[:2])

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kinds: torch.Tensor, levels: torch.Tensor,
            key_mask: torch.Tensor | None, s: Settings) -> torch.Tensor:
        """``q, k, v``: ``[heads, tokens, d]``; ``kinds``, ``levels``: each head's kind and band;
        ``s``: this call's settings. Dense heads run as one SDPA, the sparse ones through the kernel
        ``kernel_for`` picks."""
        grid, video, text = s.grid, s.grid.video_span, s.grid.text_span
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        if grid.text:
            out[:, text] = F.scaled_dot_product_attention(q[:, text], k, v, attn_mask=key_mask, scale=s.scale)
        out_video = out[:, video]
        dense = (kinds == DENSE).nonzero().flatten()
        if len(dense) == len(kinds):
            out_video.copy_(F.scaled_dot_product_attention(q[:, video], k, v, attn_mask=key_mask, scale=s.scale))
            return out
        if len(dense):
            mask = None if key_mask is None else key_mask[dense]
            o = F.scaled_dot_product_attention(q[dense][:, video], k[dense], v[dense], attn_mask=mask, scale=s.scale)
            out_video.index_copy_(0, dense, o)
        kernels = {"torch": lambda: self.torch_bands(q, k, v, out_video, kinds, levels, key_mask, s)}
        if key_mask is None and self.triton_usable(q, s):
            kernels["triton"] = lambda: self.triton_bands(q, k, v, out_video, kinds, levels, s)
        chosen = s.kernel if s.kernel in kernels else kernel_for(kernels, (q.dtype, *q.shape, s.bands), q.device)
        kernels[chosen]()
        self.memory().kernels[chosen] += 1
        return out

    def torch_bands(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_video: torch.Tensor,
                    kinds: torch.Tensor, levels: torch.Tensor, key_mask: torch.Tensor | None, s: Settings) -> None:
        """The sparse heads with torch's kernels, one band attention per kind and band width."""
        every_sparse = bool((kinds != DENSE).all())
        for kind in (SPATIAL, TEMPORAL):
            for level, band in enumerate(s.bands):
                heads = ((kinds == kind) & (levels == level)).nonzero().flatten()
                if len(heads) == 0:
                    continue
                every = every_sparse and len(heads) == len(kinds)
                qh, kh, vh = (x if every else x[heads] for x in (q, k, v))
                mh = None if key_mask is None else key_mask if every else key_mask[heads]
                o = self.band(qh, kh, vh, mh, kind == TEMPORAL, band, s)
                if every:
                    out_video.copy_(o)
                else:
                    out_video.index_copy_(0, heads, o)

    def triton_bands(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_video: torch.Tensor,
                     kinds: torch.Tensor, levels: torch.Tensor, s: Settings) -> None:
        """The sparse heads with the Triton kernel: one launch per band width, both kinds in it."""
        for level, band in enumerate(s.bands):
            chosen = (kinds != DENSE) & (levels == level)
            if chosen.any():
                self.triton_band(q, k, v, out_video, chosen, kinds, band, s)

    @staticmethod
    def triton_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_video: torch.Tensor,
                    chosen: torch.Tensor, kinds: torch.Tensor, band: Band, s: Settings) -> None:
        """The ``chosen`` heads (spatial and temporal: the kernel reads each in its order) into ``out_video``."""
        from graphopt.backends import triton_attention

        grid, video, text = s.grid, s.grid.video_span, s.grid.text_span
        text_k, text_v = (k[:, text], v[:, text]) if grid.text else (None, None)
        triton_attention.band_attention(
            q[:, video], k[:, video], v[:, video], band.starts(grid.video), band.window, band.block,
            grid.orders(s.token_major).to(q.device), kinds, text_k, text_v, s.scale, out=out_video,
            heads=chosen.nonzero().flatten())

    @staticmethod
    def band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, temporal: bool,
             band: Band, s: Settings) -> torch.Tensor:
        """The band attention of heads of one kind, with torch's kernels: heads whose band runs in the
        other order than the inputs hold (temporal heads of frame-major inputs) permuted to it and back."""
        grid, video, text = s.grid, s.grid.video_span, s.grid.text_span
        qv, kv, vv = q[:, video], k[:, video], v[:, video]
        permuted = temporal != s.token_major
        if permuted:
            qv, kv, vv = (grid.reorder(x, temporal) for x in (qv, kv, vv))
        masks = (None, None)
        if mask is not None:
            vm = mask[..., video]
            masks = (grid.reorder(vm, temporal, -1) if permuted else vm, mask[..., text])
        o = band_attention(qv, kv, vv, band, k[:, text] if grid.text else None, v[:, text] if grid.text else None,
                           *masks, scale=s.scale)
        return grid.reorder(o, not temporal) if permuted else o

    @staticmethod
    def triton_usable(q: torch.Tensor, s: Settings) -> bool:
        """Whether the Triton kernel is a candidate: ``kernel="triton"`` (an error where it cannot run), or
        ``"auto"`` on a GPU Triton serves, with a head dim it takes."""
        if s.kernel == "torch":
            return False
        from graphopt.backends import triton_attention

        usable = triton_attention.unavailable(q.device) is None and triton_attention.takes(q.shape[-1])
        if s.kernel == "triton" and not usable:
            raise RuntimeError(f"kernel='triton' cannot run here: {triton_attention.unavailable(q.device) or 'head dim'}")
        return usable and (s.kernel == "triton" or q.is_cuda)

    def work(self) -> tuple[float, float]:
        """(dense, done): the FLOPs this attention's calls would have cost dense and what they cost, over the
        memories of every branch since the last reset."""
        memories = self.state.memories_of(self.key)
        return sum(m.dense_flops for m in memories), sum(m.flops for m in memories)

    def timed(self) -> tuple[list[float], list[int]]:
        """Seconds and calls timed, each ``[run dense, the rest]``, over the memories of every branch."""
        memories = self.state.memories_of(self.key)
        seconds = [sum(m.seconds[i] for m in memories) for i in (0, 1)]
        return seconds, [sum(m.timed_calls[i] for m in memories) for i in (0, 1)]

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

    def kernel_calls(self) -> dict[str, int]:
        """Calls whose sparse heads each kernel ran, over every branch."""
        return dict(sum((m.kernels for m in self.state.memories_of(self.key)), Counter()))

    def extra_repr(self) -> str:
        g = self.settings.grid
        return (f"grid={g.frames}x{g.height}x{g.width}, text={g.text}, order={self.settings.order}, "
                f"density={self.settings.density}, budget={self.settings.budget}")


CHOSEN: dict[Hashable, str] = {}
"""The kernel timed fastest for each device, dtype, shape and set of bands in this process."""


def kernel_for(kernels: dict[str, Callable[[], object]], shape: Hashable, device: torch.device) -> str:
    """The kernel to run: the only one, or the one the measured cost model times faster on ``shape``: each
    candidate runs once to warm up (Triton compiles) and once timed, the first time a shape is seen (the
    call's output is then what the last one wrote; both compute the same); later calls reuse the choice,
    as ``LowerRegions`` reuses a region's timed backend."""
    if len(kernels) == 1:
        return next(iter(kernels))
    key = (device, shape)
    if key not in CHOSEN:
        from graphopt.cost_models.measured import time_in_turns

        times = time_in_turns(list(kernels.values()), [], warmup=1, repeats=1, device=device, rounds=1,
                              settle_seconds=0.0)
        CHOSEN[key] = min(zip(kernels, times), key=lambda pair: pair[1][0])[0]
    return CHOSEN[key]
