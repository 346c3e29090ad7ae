"""The Triton band attention on a GPU at CogVideoX-1.5's 720p attention shape, against SDPA and flex_attention.

Batch 2 (the CFG pair), 48 heads of 64, 226 text tokens then 11 frames of 60 x 68 video tokens (45,106 in
all), bf16. At density 0.25 (by ``Band.for_density`` with 128-row blocks): torch's SDPA (dense), torch's
``flex_attention`` compiled with the same mask as a block mask (video rows; text columns kept), and
graphopt's kernel with half the heads spatial and half temporal (the temporal ones read token-major
through the kernel's order table, no permuted copies). Times are CUDA-event medians over ``--repeats``;
run whenever a GPU is at hand (it says so and exits without one).

    python benchmarks/sparse_attention_gpu.py [--density 0.25] [--repeats 20]

Writes ``benchmarks/results/sparse_attention_gpu.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from graphopt.passes.sparse_attention.grid import Band, VideoGrid
from graphopt.passes.sparse_attention.profile import SPATIAL, TEMPORAL

RESULTS = Path(__file__).parent / "results"
GRID = VideoGrid(11, 60, 68, text=226, text_first=True)
BATCH, HEADS, DIM = 2, 48, 64


def cuda_ms(run: Callable[[], object], repeats: int) -> list[float]:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on a GPU")
        sys.exit(0)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from graphopt.backends import triton_attention

    device, dtype = torch.device("cuda"), torch.bfloat16
    tokens, video, text = GRID.tokens, GRID.video_span, GRID.text_span
    q, k, v = (torch.randn(BATCH, HEADS, tokens, DIM, device=device, dtype=dtype) for _ in range(3))
    band = Band.for_density(GRID.video, args.density, block=128)
    starts = torch.tensor(band.starts(GRID.video), device=device)

    def mask_mod(b, h, qi, ki):  # text rows and columns dense; video rows in the band (frame-major)
        qv, kv = qi - GRID.text, ki - GRID.text
        lo = starts[(qv.clamp(min=0)) // band.block]
        return (qi < GRID.text) | (ki < GRID.text) | ((kv >= lo) & (kv < lo + band.window))

    block_mask = create_block_mask(mask_mod, None, None, tokens, tokens, device=device)
    flex = torch.compile(flex_attention)
    flat = [x.flatten(0, 1) for x in (q, k, v)]
    kinds = torch.tensor([SPATIAL, TEMPORAL] * (BATCH * HEADS // 2), device=device)
    orders = GRID.orders().to(device)
    out = torch.empty_like(flat[0])

    def graphopt_band() -> torch.Tensor:
        out[:, text] = F.scaled_dot_product_attention(flat[0][:, text], flat[1], flat[2])
        return triton_attention.band_attention(
            flat[0][:, video], flat[1][:, video], flat[2][:, video], band.starts(GRID.video), band.window,
            band.block, orders, kinds, flat[1][:, text], flat[2][:, text], out=out[:, video])

    runs = {"SDPA (dense)": lambda: F.scaled_dot_product_attention(q, k, v),
            "flex_attention": lambda: flex(q, k, v, block_mask=block_mask),
            "graphopt band (Triton)": graphopt_band}
    times = {name: cuda_ms(run, args.repeats) for name, run in runs.items()}
    dense = statistics.median(times["SDPA (dense)"])
    rows = [{"kernel": name, "ms": round(statistics.median(t), 3), "min-max": f"{min(t):.3f}-{max(t):.3f}",
             "speed-up": round(dense / statistics.median(t), 2)} for name, t in times.items()]
    result = {"device": torch.cuda.get_device_name(), "shape": [BATCH, HEADS, tokens, DIM],
              "density": band.density(GRID.video), "flex sparsity": float(block_mask.sparsity()), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sparse_attention_gpu.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Band attention at CogVideoX-1.5 720p ({result['device']}, bf16)", "",
             f"Shape {result['shape']}, density {result['density']:.3f}.", "", "| kernel | ms | min-max | speed-up |",
             "|---|---|---|---|", *(f"| {r['kernel']} | {r['ms']} | {r['min-max']} | {r['speed-up']} |" for r in rows)]
    (RESULTS / "sparse_attention_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
