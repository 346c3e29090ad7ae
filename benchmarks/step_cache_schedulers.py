"""A step-cache plan carried to other schedulers and step counts, on the trained digits image DiT.

A plan's decisions are keyed on the timestep the denoiser receives, not the step index, so a plan
calibrated once (here: ``auto`` for PSNR >= 30 and SSIM >= 0.92, with the pipeline's flow-matching Euler
scheduler at 50 steps) should hold under another solver and another step count. Per scheduler and step
count: that plan against the uncached sampler of the same scheduler (PSNR, SSIM, worst sample's PSNR,
block evaluations skipped, speed-up: median of ``--rounds`` runs timed in turns with the uncached
sampler), beside a plan calibrated on that scheduler and step count itself.

    python benchmarks/step_cache_schedulers.py [--samples 32] [--rounds 3] [--threads 2]

Writes ``benchmarks/results/step_cache_schedulers.{md,json}``.
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
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))

import graphopt.diffusers as gd  # noqa: E402
from graphopt.digits import load_digits_pipeline, make_scheduler  # noqa: E402
from graphopt.passes.step_cache.calibrate import measure  # noqa: E402
from report import machine  # noqa: E402
from step_cache_compare import BUDGET, CALIBRATION, SEED, sampler  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PLAN_STEPS = 50
STEPS = (50, 30)


def flow(cls: type) -> Callable[[], Any]:
    """A multistep solver on the same flow-matching sigmas as the pipeline's Euler scheduler."""
    return lambda: cls(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                       flow_shift=1.0)


EULER = FlowMatchEulerDiscreteScheduler.__name__
SCHEDULERS: dict[str, Callable[[], Any]] = {
    EULER: make_scheduler,
    UniPCMultistepScheduler.__name__: flow(UniPCMultistepScheduler),
    DPMSolverMultistepScheduler.__name__: flow(DPMSolverMultistepScheduler),
}


def calibrated(pipe: Any, steps: int) -> Any:
    gd.optimize(pipe, step_cache="auto", quality=BUDGET, calibration={**CALIBRATION, "num_inference_steps": steps},
                progress=False)
    plan = pipe.graphopt.plan
    gd.restore(pipe)
    return plan


def judged(pipe: Any, plan: Any, run: Callable[[], torch.Tensor], reference: torch.Tensor) -> dict[str, Any]:
    gd.optimize(pipe, step_cache=plan)
    quality = measure(run(), reference)
    row = {"spec": plan.spec, "skipped": pipe.graphopt.denoiser.skipped_fraction(),
           **{k: quality[k] for k in ("psnr", "ssim", "worst_psnr")}}
    gd.restore(pipe)
    return row


def in_turns(uncached: Callable[[], Any], cached: Callable[[], Any], rounds: int) -> dict[str, Any]:
    times: list[list[float]] = [[], []]
    for k in range(rounds):
        for i in ((0, 1) if k % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            (uncached, cached)[i]()
            times[i].append(time.perf_counter() - start)
    return {"speedup": statistics.median(times[0]) / statistics.median(times[1]),
            "seconds": [statistics.median(t) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    labels = [k % 10 for k in range(args.samples)]
    pipe, twin = load_digits_pipeline(), load_digits_pipeline()
    bar = tqdm(total=1 + len(SCHEDULERS) * len(STEPS), desc="step_cache_schedulers", unit="case")
    carried = calibrated(pipe, PLAN_STEPS)
    bar.update(1)
    rows = []
    for name, make in SCHEDULERS.items():
        for steps in STEPS:
            pipe.scheduler, twin.scheduler = make(), make()
            run, plain = sampler(pipe, labels, steps), sampler(twin, labels, steps)
            reference = plain()
            own = carried if (name, steps) == (EULER, PLAN_STEPS) else calibrated(pipe, steps)
            row = {"scheduler": name, "steps": steps, "carried": judged(pipe, carried, run, reference),
                   "own": judged(pipe, own, run, reference)}
            gd.optimize(pipe, step_cache=carried)
            run()  # captures outside the timing
            row["carried"].update(in_turns(plain, run, args.rounds))
            gd.restore(pipe)
            rows.append(row)
            bar.update(1)
    bar.close()
    write(rows, carried, args)


def write(rows: list[dict[str, Any]], carried: Any, args: argparse.Namespace) -> None:
    def spec(s: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v}" for k, v in s.items())

    lines = ["# A step-cache plan carried to other schedulers and step counts", "",
             f"Machine: {machine()}; torch threads: {args.threads}. Trained digits DiT (`graphopt.digits`), "
             f"{args.samples} samples, seed {SEED}. The carried plan: `auto` for "
             f"{', '.join(f'{k}>={v:g}' for k, v in BUDGET.items())}, calibrated with "
             f"{EULER} at {PLAN_STEPS} steps ({spec(carried.spec)}). "
             f"PSNR/SSIM against the uncached sampler of the same scheduler and steps; speed-up: median of "
             f"{args.rounds} runs timed in turns with it. `own`: a plan calibrated on that scheduler and steps.", "",
             "| scheduler | steps | carried: PSNR dB | SSIM | worst PSNR | skipped | speed-up | own plan | own: PSNR dB "
             "| SSIM | skipped |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, o = r["carried"], r["own"]
        lines.append(f"| {r['scheduler']} | {r['steps']} | {c['psnr']:.1f} | {c['ssim']:.3f} | {c['worst_psnr']:.1f} "
                     f"| {c['skipped']:.0%} | {c['speedup']:.2f}x | {spec(o['spec'])} | {o['psnr']:.1f} "
                     f"| {o['ssim']:.3f} | {o['skipped']:.0%} |")
    gaps = [r["own"]["psnr"] - r["carried"]["psnr"] for r in rows]
    lines += ["", f"The carried plan's PSNR minus the own plan's: {min(-g for g in gaps):+.1f} to "
              f"{max(-g for g in gaps):+.1f} dB."]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "step_cache_schedulers.md").write_text(text)
    (RESULTS / "step_cache_schedulers.json").write_text(json.dumps({"carried": carried.to_json(), "rows": rows},
                                                                   indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
