"""``graphopt demo``'s sparse-attention part: the band attention kernel against dense SDPA on CPU, the
trained moving-digits video DiT sampled with head-kind sparse attention against dense sampling, and the
token-major layout's permutations folded across a transformer's layers."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SPARSE = {"density": 0.25, "dense_steps": 10}
LAYOUT_LAYERS = 8


@dataclass
class SparseAttentionRow:
    tokens: int
    density: float
    dense_ms: float
    band_ms: float
    steps: int
    clips: int
    psnr: float
    ssim: float
    kept: float
    kinds: dict[str, int]
    layout: tuple[int, int, int]
    """``layout_permutations(LAYOUT_LAYERS)``."""


def run_sparse_attention_demo(quick: bool = False) -> SparseAttentionRow:
    """The kernel at 4,096 tokens (``quick``: 2,048), 4 heads of 64; then 4 clips (``quick``: 2) of 50 steps."""
    from . import diffusers as gd
    from .moving_digits import load_moving_digits_pipeline
    from .passes.sparse_attention.grid import Band
    from .passes.sparse_attention.kernels import band_attention
    from .quality import psnr, ssim

    tokens = 2048 if quick else 4096
    q, k, v = (torch.randn(1, 4, tokens, 64) for _ in range(3))
    band = Band.for_density(tokens, SPARSE["density"])
    dense_ms, band_ms = _timed_in_turns([lambda: F.scaled_dot_product_attention(q, k, v),
                                         lambda: band_attention(q, k, v, band)], repeats=5)

    pipe = load_moving_digits_pipeline()
    labels, steps = ([0, 3] if quick else [0, 3, 5, 8]), 50

    def sample() -> torch.Tensor:
        return pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))

    reference = sample()
    gd.optimize(pipe, sparse_attention=SPARSE)
    clips = sample()
    kept = pipe.graphopt.denoiser.attention_kept()
    kinds = {kind: sum(r[kind] for r in gd.report(pipe)["sparse_attention"]) for kind in ("spatial", "temporal", "dense")}
    gd.restore(pipe)
    return SparseAttentionRow(tokens, band.density(tokens), dense_ms, band_ms, steps, len(labels),
                              psnr(clips, reference), ssim(clips, reference), kept, kinds,
                              layout_permutations(LAYOUT_LAYERS))


def layout_permutations(layers: int) -> tuple[int, int, int]:
    """``layout="token"`` on a small diffusers CogVideoX transformer of ``layers`` layers (captured, not run):
    attentions replaced, token permutations placed around them, and those ``fold_token_permutations`` left."""
    import graphopt

    from .models import build_cogvideox

    model, inputs = build_cogvideox(latent_frames=3, layers=layers)
    graph = graphopt.optimize(graphopt.capture(model, inputs), "O1", passes=["sparse_video_attention"],
                              options={"sparse_video_attention": {"layout": "token", "dense_layers": 0}})
    stats = next(r.stats for r in graph.meta["report"].records if r.name == "sparse_video_attention")
    return stats["attention_replaced"], stats["layout_permutations_placed"], stats["layout_permutations_left"]


def _timed_in_turns(runs: list, repeats: int) -> list[float]:
    """Median milliseconds of each run, timed one after the other, round after round."""
    times: list[list[float]] = [[] for _ in runs]
    for run in runs:
        run()
    for _ in range(repeats):
        for run, ts in zip(runs, times):
            start = time.perf_counter()
            run()
            ts.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(ts) for ts in times]


def format_sparse_attention_row(row: SparseAttentionRow) -> str:
    from .cli import format_table

    kernel = format_table(("attention, CPU", "tokens", "density", "ms", "speed-up"), [
        ("dense SDPA", str(row.tokens), "1.00", f"{row.dense_ms:.1f}", "1.00x"),
        ("graphopt band", str(row.tokens), f"{row.density:.2f}", f"{row.band_ms:.1f}",
         f"{row.dense_ms / row.band_ms:.2f}x")])
    heads = sum(row.kinds.values())
    share = ", ".join(f"{kind} {n / max(heads, 1):.0%}" for kind, n in row.kinds.items())
    return "\n".join([
        kernel,
        f"sparse_video_attention: trained moving-digits video DiT (Wan transformer), {row.clips} clips of "
        f"{row.steps} steps against dense sampling: PSNR {row.psnr:.1f} dB, SSIM {row.ssim:.3f}, "
        f"{row.kept:.0%} of the attention FLOPs computed; heads profiled as {share}.",
        f"layout='token' on a {LAYOUT_LAYERS}-layer CogVideoX transformer: {row.layout[1]} token permutations placed "
        f"around its {row.layout[0]} attentions, {row.layout[2]} left after fold_token_permutations "
        f"(the region starts where the tokens appear and ends before the output)."])
