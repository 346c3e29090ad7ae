"""Head-kind sparse attention (Sparse VideoGen as the ``sparse_video_attention`` pass), measured on CPU.

Stages (``--stages kernel,e2e,quality``):

- ``kernel``: the band attention kernel against dense SDPA (ATen's flash kernel) and against
  ``flex_attention`` compiled for CPU with the same block mask, over sequence lengths and densities
  (4 heads, d 64, ``--threads`` threads, timed in turns, median of ``--repeats`` and the spread); and
  what profiling (64 rows per head) and the token permutations in and out cost beside dense attention.
- ``e2e``: a diffusers CogVideoX transformer, 2 layers at width 1,024 (16 heads x 64), 13 frames of 32 x 32
  tokens plus 226 text tokens, captured, with ``sparse_video_attention`` at density 0.25 against the eager
  dense transformer: speed-up, relative error, and the share of the dense forward spent in attention; in
  the model's frame-major layout and token-major (``layout="token"``), with the permutations left in the
  graph per layer on deeper transformers.
- ``together``: one calibration of step caching and sparse attention under one budget (PSNR 29, SSIM
  0.9) on the trained moving-digits DiT; the plan against each pass's best setting alone within the
  budget, on clips calibration never saw: quality, block evaluations skipped, attention kept, FLOPs
  speed-up (the calibration's work model) and wall-clock speed-up. ``--size`` samples the trained model at
  more tokens than it was trained at (16,64: 16 frames of 16 x 16), where a sparse call is faster than a
  dense one on a CPU; ``--clips`` keeps such runs short.
- ``quality``: the trained moving-digits video DiT (``graphopt.moving_digits``), 50 steps, 8 clips:
  PSNR/SSIM against dense sampling, the share of attention work kept, and the head kinds, for graphopt's
  profiling and for SVG's recipe (rows drawn from the first tokens only, no dense choice) through the
  same code; plus head classification on planted spatial and temporal heads.

    python benchmarks/sparse_attention_compare.py [--stages kernel,e2e,quality,together] [--threads 2] [--repeats 5]
    python benchmarks/sparse_attention_compare.py --stages quality,together --variant long   # 512 tokens
    python benchmarks/sparse_attention_compare.py --stages together --variant long --size 16,64 --clips 2 --steps 20

Writes ``benchmarks/results/sparse_attention_compare.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))

from graphopt.passes.sparse_attention.grid import Band, VideoGrid  # noqa: E402
from graphopt.passes.sparse_attention.kernels import band_attention  # noqa: E402
from graphopt.passes.sparse_attention.profile import classify_heads, sample_rows  # noqa: E402
from report import machine, time_in_turns  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LENGTHS = (2048, 4096, 8192, 16384)
DENSITIES = (0.125, 0.25, 0.5)
HEADS, DIM = 4, 64


def spread(times: list[float]) -> str:
    return f"{statistics.median(times):.1f} ({min(times):.1f}-{max(times):.1f})"


def flex_band(band: Band, tokens: int) -> Callable[..., torch.Tensor]:
    """``flex_attention`` compiled for CPU, with the band's mask as its block mask: compiled afresh for each
    shape with static shapes (after a shape change torch compiles for dynamic shapes, and this torch's CPU
    flex template then fails to build at 16,384 tokens)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    starts = torch.tensor(band.starts(tokens))

    def mask_mod(b: Any, h: Any, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        lo = starts[q // band.block]
        return (k >= lo) & (k < lo + band.window)

    block_mask = create_block_mask(mask_mod, None, None, tokens, tokens, device="cpu", BLOCK_SIZE=128)
    torch.compiler.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def kernel_stage(repeats: int) -> dict[str, Any]:
    rows, overheads = [], []
    cells = [(n, d) for n in LENGTHS for d in DENSITIES]
    for tokens, density in tqdm(cells, desc="kernel", unit="shape"):
        q, k, v = (torch.randn(1, HEADS, tokens, DIM) for _ in range(3))
        band = Band.for_density(tokens, density)
        runs = {"dense SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
                "graphopt band": lambda: band_attention(q, k, v, band)}
        try:
            flex = flex_band(band, tokens)
            flex(q, k, v)
            runs["flex_attention"] = lambda: flex(q, k, v)
        except Exception as e:  # noqa: BLE001 (a compile failure is a result: the row says so)
            runs["flex_attention"] = None
            print(f"flex_attention at {tokens}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        names = [n for n, r in runs.items() if r is not None]
        times = dict(zip(names, time_in_turns([runs[n] for n in names], repeats, 1, 0.0)))
        dense = statistics.median(times["dense SDPA"])
        row = {"tokens": tokens, "density": round(band.density(tokens), 4), "block": band.block,
               **{f"{n} ms": spread(t) for n, t in times.items()},
               **{f"{n} speed-up": round(dense / statistics.median(t), 2) for n, t in times.items() if n != "dense SDPA"}}
        rows.append(row)
        if abs(density - 0.25) < 1e-9:
            overheads.append(overhead(q, k, v, band, tokens, dense, repeats))
    return {"rows": rows, "overheads": overheads}


def overhead(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: Band, tokens: int, dense_ms: float,
             repeats: int) -> dict[str, Any]:
    """Profiling 64 rows of every head, and the token-major permutation of q, k, v and back of the output,
    against dense attention."""
    frames = 16
    grid = VideoGrid(frames, 1, tokens // frames)
    rows = sample_rows(grid, 64, torch.Generator().manual_seed(0))
    flat = [x[0] for x in (q, k, v)]
    profile = lambda: classify_heads(*flat, grid, [band], rows, 0.05)  # noqa: E731
    permute = lambda: [grid.to_frame_major(grid.to_token_major(x)) for x in (q, k, v)][0]  # noqa: E731
    profile_ms, permute_ms = (statistics.median(t) for t in time_in_turns([profile, permute], repeats, 1, 0.0))
    return {"tokens": tokens, "profile ms": round(profile_ms, 2), "permute ms": round(permute_ms, 2),
            "share of dense": f"{100 * (profile_ms + permute_ms) / dense_ms:.1f} %"}


# ------------------------------------------------------------------ end to end
def cogvideox(frames: int = 13, size: int = 64, text: int = 226) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    from diffusers import CogVideoXTransformer3DModel

    from graphopt.models import KwargsWrapper

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=16, attention_head_dim=64, in_channels=16,
                                        num_layers=2, sample_width=size, sample_height=size,
                                        sample_frames=(frames - 1) * 4 + 1, max_text_seq_length=text,
                                        text_embed_dim=1024).eval()
    inputs = (torch.randn(1, frames, 16, size, size), torch.randn(1, text, 1024), torch.tensor([500]))
    wrapper = KwargsWrapper(model, ("hidden_states", "encoder_hidden_states", "timestep"), {"return_dict": False})
    return wrapper, inputs


def e2e_stage(repeats: int, density: float) -> dict[str, Any]:
    """Dense eager against the captured transformer twice: heads profiled (random weights fit no band, so
    profiling keeps them dense: the cost of asking) and every head sparse (SVG's recipe: the speed at the
    density)."""
    import graphopt
    from graphopt.testing import max_rel_error

    def first(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, (tuple, list)) else out

    bar = tqdm(total=2 + repeats, desc="end to end", unit="step")
    model, inputs = cogvideox()

    def sparse(layout: str, every_head: bool) -> tuple[Any, Any]:
        graph = graphopt.optimize(graphopt.capture(model, inputs), "O1", passes=["sparse_video_attention"],
                                  options={"sparse_video_attention": {"density": density, "dense_layers": 0,
                                                                      "layout": layout}})
        module = graph.to_torch()
        for attention in module.modules():
            if every_head and hasattr(attention, "set_options"):
                attention.set_options(dense_heads=False)
        return graph, module

    with torch.no_grad():
        graph, profiled = sparse("frame", every_head=False)
        stats = next(r.stats for r in graph.meta["report"].records if r.name == "sparse_video_attention" and r.modified)
        _, every = sparse("frame", every_head=True)
        token_graph, token = sparse("token", every_head=True)
        node = graph.find("video_sparse_attention")[0]
        q = torch.randn(1, 16, node.inputs[0].type.shape[-2], 64)
        reference = first(model(*inputs))
        bar.update()
        outs = [first(profiled(*inputs)), first(every(*inputs)), first(token(*inputs))]
        bar.update()
        runs = [lambda: model(*inputs), lambda: profiled(*inputs), lambda: every(*inputs), lambda: token(*inputs),
                lambda: F.scaled_dot_product_attention(q, q, q)]
        times: list[list[float]] = [[] for _ in runs]
        for _ in range(repeats):
            for run, ts in zip(runs, times):
                ts.extend(time_in_turns([run], 1, 0, 0.0, settle_ms=0.0)[0])
            bar.update()
    bar.close()
    dense_ms, attention_ms = statistics.median(times[0]), statistics.median(times[4])
    layers = stats["attention_replaced"]
    common = {"grid": node.attrs["grid"], "text": node.attrs["text"], "tokens": node.inputs[0].type.shape[-2],
              "attention_replaced": layers, "dense ms": spread(times[0]),
              "attention share of dense": f"{100 * layers * attention_ms / dense_ms:.0f} %"}
    token_stats = next(r.stats for r in token_graph.meta["report"].records if r.name == "sparse_video_attention")
    rows = []
    for name, layout, out, ts in (("heads profiled", "frame", outs[0], times[1]),
                                  ("every head sparse", "frame", outs[1], times[2]),
                                  ("every head sparse", "token", outs[2], times[3])):
        left = token_stats["layout_permutations_left"] if layout == "token" else 0
        rows.append({"heads": name, "layout": layout, **common, "graphopt ms": spread(ts),
                     "speed-up": round(dense_ms / statistics.median(ts), 2),
                     "relative error": round(float(max_rel_error(reference, out)), 4),
                     "finite": bool(torch.isfinite(out).all()), "permutations in the graph": left})
    return {"rows": rows, "layout": layout_counts()}


def layout_counts(layers: tuple[int, ...] = (2, 8, 30)) -> list[dict[str, Any]]:
    """``layout="token"`` on diffusers CogVideoX transformers of more layers (``graphopt.models``' small
    config, 3 frames of 4 x 4 tokens and 8 text tokens; captured, not run): the token permutations the pass
    places around each attention and those ``fold_token_permutations`` leaves."""
    from graphopt.demo_sparse_attention import layout_permutations

    rows = []
    for n in layers:
        replaced, placed, left = layout_permutations(n)
        rows.append({"layers": n, "attention replaced": replaced, "permutations placed": placed,
                     "left after folding": left, "left per layer": round(left / replaced, 3)})
    return rows


# --------------------------------------------------------------------- quality
def quality_stage(steps: int, variant: str) -> dict[str, Any]:
    import graphopt.diffusers as gd
    from graphopt import moving_digits
    from graphopt.quality import psnr, ssim

    pipe = moving_digits.load_moving_digits_pipeline(variant)
    labels = list(range(8))
    run = lambda: pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))  # noqa: E731
    reference = run()
    settings = {
        "graphopt (budget 0.05)": {"density": 0.25, "dense_steps": 10},
        "graphopt (budget 0.1)": {"density": 0.25, "dense_steps": 10, "budget": 0.1},
        "graphopt (budget 0.02)": {"density": 0.25, "dense_steps": 10, "budget": 0.02},
        "graphopt, two widths (budget 0.05)": {"density": 0.25, "dense_steps": 10, "levels": 2},
        "SVG recipe": {"density": 0.25, "dense_steps": 10, "first_tokens": 10_000, "dense_heads": False},
        "SVG recipe, no dense steps": {"density": 0.25, "first_tokens": 10_000, "dense_heads": False},
    }
    rows = []
    for name, options in tqdm(settings.items(), desc="quality", unit="setting"):
        gd.optimize(pipe, sparse_attention=options)
        out = run()
        report = gd.report(pipe)["sparse_attention"]
        gd.restore(pipe)
        kinds = {k: sum(r.get(k, 0) for r in report) for k in ("spatial", "temporal", "dense")}
        rows.append({"setting": name, **options, "psnr": round(psnr(out, reference), 2),
                     "ssim": round(ssim(out, reference), 4), "attention kept": attention_kept(report),
                     **kinds})
    return {"steps": steps, "clips": len(labels), "rows": rows, "planted": planted_accuracy(),
            **describe(variant)}


def describe(variant: str, size: tuple[int, int] | None = None) -> dict[str, Any]:
    from graphopt import moving_digits

    v = moving_digits.VARIANTS[variant]

    def shape(frames: int, canvas: int) -> str:
        side = canvas // moving_digits.PATCH
        return f"{frames} frames of {side}x{side} tokens ({frames * side * side})"

    model = f"{shape(v.frames, v.canvas)}, {v.config['num_layers']} layers"
    if size is not None:
        model = f"trained at {model}, sampled at {shape(*size)}"
    return {"variant": variant, "model": model}


def attention_kept(report: list[dict[str, Any]]) -> float:
    """The share of the replaced attentions' score blocks computed in the last run (dense steps and dense
    heads at 1, sparse heads at the band's density); profiling runs every call here."""
    kept = total = 0.0
    for r in report:
        head_calls = r["calls"] * r["heads"]
        profiled = r["spatial"] + r["temporal"] + r["dense"]
        kept += head_calls - profiled + r["dense"] + (r["spatial"] + r["temporal"]) * r["density"]
        total += head_calls
    return round(kept / max(total, 1), 3)


def planted_accuracy(trials: int = 4) -> dict[str, Any]:
    """Heads built to be spatial (queries and keys carry their frame) or temporal (their position):
    the share profiling names right."""
    from graphopt.passes.sparse_attention.profile import SPATIAL, TEMPORAL

    from graphopt.testing import planted_video_heads

    right = total = 0
    for seed in range(trials):
        q, k, v, grid, truth = planted_video_heads(seed=seed)
        band = Band.for_density(grid.video, 0.25)
        found = classify_heads(q, k, v, grid, [band], sample_rows(grid, 64, torch.Generator().manual_seed(seed)), 0.05)
        known = (truth == SPATIAL) | (truth == TEMPORAL)
        right += int((found.kinds[known] == truth[known]).sum())
        total += int(known.sum())
    return {"heads": total, "right": right, "accuracy": round(right / total, 4)}


# ---------------------------------------------------------- with step caching
JOINT_QUALITY = {"psnr": 29.0, "ssim": 0.9}
CALIBRATION = {"class_labels": [0, 3, 5, 8], "seed": 7}
HELD_OUT = [1, 2, 4, 6, 7, 9]


def joint_stage(steps: int, repeats: int, variant: str, size: tuple[int, int] | None = None,
                clips: int | None = None) -> dict[str, Any]:
    """One calibration of both passes under one budget; its plan, and each pass's best setting alone within
    the budget, on clips calibration never saw. ``size``: (frames, canvas) to sample the trained model at
    instead of its own; ``clips``: that many calibration and held-out clips (fewer, for long sequences)."""
    import graphopt.diffusers as gd
    from graphopt import moving_digits
    from graphopt.passes.sparse_attention.calibrate import work
    from graphopt.quality import psnr, ssim

    pipe = moving_digits.load_moving_digits_pipeline(variant)
    if size is not None:
        pipe.frames, pipe.canvas = size
    held_out = HELD_OUT[:clips]
    calibration = {**CALIBRATION, "class_labels": CALIBRATION["class_labels"][:clips], "num_inference_steps": steps}
    run = lambda: pipe(held_out, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))  # noqa: E731
    start = time.time()
    gd.optimize(pipe, step_cache="auto", sparse_attention="auto", quality=JOINT_QUALITY, calibration=calibration)
    seconds = time.time() - start
    plan = pipe.graphopt.plan
    gd.restore(pipe)
    curves = plan.curves.to_json()
    alone = plan.alone
    settings = {"dense": {}}
    if alone["step_cache"]:
        settings["step cache alone"] = {"step_cache": {**alone["step_cache"]["options"], "curves": curves}}
    if alone["sparse_attention"]:
        settings["sparse attention alone"] = {"sparse_attention": {**(plan.sparse or {}),
                                                                   **alone["sparse_attention"]["options"]}}
    settings["together (the plan)"] = {"step_cache": plan}
    rows, reference, dense_s = [], None, None
    for name, options in tqdm(settings.items(), desc="together", unit="setting"):
        if options:
            gd.optimize(pipe, **options)
        pipe(held_out, num_inference_steps=2)  # captures this batch's graph outside the timed runs
        out, times = None, []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
        if reference is None:
            reference, dense_s = out, statistics.median(times)
        denoiser = pipe.graphopt.denoiser if options else None
        skipped = denoiser.skipped_fraction() if denoiser else 0.0
        kept = denoiser.attention_kept() if denoiser else 1.0
        left = work(skipped, kept, plan.attention_share)
        rows.append({"setting": name, "psnr": round(psnr(out, reference), 2), "ssim": round(ssim(out, reference), 4),
                     "blocks skipped": f"{skipped:.0%}", "attention kept": f"{kept:.0%}",
                     "FLOPs speed-up": round(1 / left, 2),
                     "wall-clock speed-up": round(dense_s / statistics.median(times), 2)})
        gd.restore(pipe)
    return {"steps": steps, "quality": JOINT_QUALITY, "calibration seconds": round(seconds),
            "attention share": round(plan.attention_share, 3),
            "plan": {"step_cache": plan.spec, "sparse_attention": plan.sparse, "measured": plan.measured,
                     "time model": plan.time, "alone": {k: a and a["time"] for k, a in alone.items()}},
            "clips": len(held_out), "rows": rows, **describe(variant, size)}


# ----------------------------------------------------------------------- main
def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sparse_attention_compare.json").write_text(json.dumps(results, indent=2))
    lines = ["# Sparse video attention (Sparse VideoGen) on CPU", "", f"Machine: {results['machine']}, "
             f"{results['threads']} threads.", ""]
    for title, key in (("Kernel: band attention vs dense SDPA and flex_attention (ms, median (min-max))",
                        "kernel"),):
        if key in results:
            lines += [f"## {title}", "", *table(results[key]["rows"]), "",
                      "Profiling and permutations at density 0.25 (16 frames):", "",
                      *table(results[key]["overheads"]), ""]
    if "e2e" in results:
        lines += ["## End to end: CogVideoX transformer, 2 layers, width 1024, density 0.25", "",
                  *table(results["e2e"]["rows"]), ""]
        if "layout" in results["e2e"]:
            lines += ["Token-major layout in the graph (`layout='token'`): permutations per layer before and after "
                      "`fold_token_permutations`, on deeper CogVideoX transformers (captured only):", "",
                      *table(results["e2e"]["layout"]), ""]
    for key in ("quality", "quality_long"):
        if key in results:
            q = results[key]
            lines += [f"## Quality: trained moving-digits video DiT ({q.get('model', 'short')}), {q['steps']} steps, "
                      f"{q['clips']} clips, against dense sampling", "", *table(q["rows"]), "",
                      f"Planted heads classified right: {q['planted']['right']} of {q['planted']['heads']} "
                      f"({100 * q['planted']['accuracy']:.1f} %).", ""]
    for key in sorted(k for k in results if k.startswith("together")):
        j = results[key]
        lines += [f"## Together with step caching ({j.get('model', 'short')}): one calibration for "
                  f"{j['quality']}, {j['steps']} steps, {j['clips']} clips calibration never saw", "",
                  f"Calibrated in {j['calibration seconds']} s; attention is {100 * j['attention share']:.0f} % "
                  f"of this denoiser's FLOPs. Plan: {j['plan']}.", "", *table(j["rows"]), ""]
    (RESULTS / "sparse_attention_compare.md").write_text("\n".join(lines))
    print("\n".join(lines))


def table(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="kernel,e2e,quality,together")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--variant", choices=("short", "long"), default="short",
                        help="the trained moving-digits model of the quality and together stages")
    parser.add_argument("--size", type=lambda text: tuple(int(x) for x in text.split(",")), default=None,
                        help="FRAMES,CANVAS: sample the together stage's model at this size (e.g. 16,64: 4,096 tokens)")
    parser.add_argument("--clips", type=int, default=None, help="the together stage's calibration and held-out clips")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / "sparse_attention_compare.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update(machine=machine(), threads=args.threads)
    stages = args.stages.split(",")
    start = time.time()
    if "kernel" in stages:
        results["kernel"] = kernel_stage(args.repeats)
    if "e2e" in stages:
        results["e2e"] = e2e_stage(max(3, args.repeats // 2), 0.25)
    suffix = "" if args.variant == "short" else f"_{args.variant}"
    if "quality" in stages:
        results["quality" + suffix] = quality_stage(args.steps, args.variant)
    if "together" in stages:
        size = "" if args.size is None else "_at_" + "x".join(map(str, args.size))
        steps = "" if args.steps == 50 else f"_{args.steps}_steps"
        results["together" + suffix + size + steps] = joint_stage(args.steps, 2, args.variant, args.size, args.clips)
    print(f"{time.time() - start:.0f} s")
    write(results)


if __name__ == "__main__":
    main()
