"""Step caching on a trained DiT: graphopt's policies against diffusers' cache hooks and cache-dit.

Two trained models (``--model``): the digits image DiT (a FLUX transformer,
``graphopt.digits``) and the moving-digits video DiT (a Wan transformer,
``graphopt.moving_digits``; PSNR and SSIM per frame, the classifier on each frame's digit).
Same model, same seeds, same run: the uncached sampler, every graphopt policy at
the settings calibration tries and a few finer ones (``ROWS``; curves fitted once on separate
calibration samples), graphopt's ``auto`` plan for PSNR >= 30 dB and SSIM >= 0.92, and every diffusers hook
and cache-dit setting that runs on the model (``step_cache_anchors.py``). Per
row: wall-clock speed-up of the sampling loop (median of ``--repeats``, spread;
``auto`` and the anchor rows no graphopt row matched are timed again in turns
with their challengers and the uncached sampler, ``--rounds`` rounds),
FLOPs ratio (torch's FlopCounterMode over one run), PSNR and SSIM against the
uncached images, the digits classifier's accuracy on the generated class and
the Fréchet distance of its features to real digits. Then the goals: the
batch-of-4 and step-count transfer checks, and caching under ``torch.compile``.

    python benchmarks/step_cache_compare.py [--model digits] [--samples 32] [--steps 50] [--threads 2]
    python benchmarks/step_cache_compare.py --steps 20 --skip-compile --tag _20steps

Writes ``benchmarks/results/step_cache_compare{,_video}.{md,json}`` and ``step_cache_frontier{,_video}.png``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))

import graphopt.diffusers as gd  # noqa: E402
from graphopt import moving_digits  # noqa: E402
from graphopt.errors import GraphoptError  # noqa: E402
from graphopt.digits import digits_images, load_digits_classifier, load_digits_pipeline  # noqa: E402
from graphopt.passes.step_cache.calibrate import SETTINGS, chain_of  # noqa: E402
from graphopt.quality import ClassifierScore, psnr, ssim  # noqa: E402
from report import machine  # noqa: E402
from step_cache_anchors import anchor_methods  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED = 1234
CALIBRATION = {"class_labels": [0, 3, 5, 8], "seed": 7}
BUDGET = {"psnr": 30.0, "ssim": 0.92}
"""The issue's quality goal; calibration holds it on every calibration sample."""
FLOP_SAMPLES = 4
"""FLOPs are counted on the first few samples (FlopCounterMode is slow); the ratio is per sample."""
STOP_PSNR = 24.0
"""A policy's sweep stops at its first setting under this PSNR: heavier ones only lose more."""
FINER: dict[str, list[dict[str, Any]]] = {
    "magcache": [{"threshold": a, "max_reuse": 2, "order": 1, "warmup": 3} for a in (0.02, 0.04, 0.06, 0.1, 0.2)],
    "taylorseer": [{"interval": k, "order": 1, "warmup": 8} for k in (2, 3)],
}
"""Chains beyond calibration's, for runs of few steps, where each reuse spans a larger stretch of the
trajectory: a forecast reused at most twice in a row, and a warm-up between 6 and 12 steps. At 20 steps on the
image DiT, magcache's forecast reused at most twice held 40.9 dB where calibration's chains held 37.2 dB at the
same share of skipped blocks (46 %)."""
ROWS = {name: settings + FINER.get(name, []) for name, settings in SETTINGS.items()}


@dataclass
class Subject:
    """The trained model a run measures, and how its samples are judged."""

    title: str
    suffix: str
    """Of the result files' names."""
    pipe: Any
    sample_shape: tuple[int, ...]
    """One sample's initial noise."""
    score: ClassifierScore
    real: torch.Tensor
    """Real digits the classifier's Fréchet distance compares with."""
    digits_of: Callable[[torch.Tensor], torch.Tensor] = lambda samples: samples
    """Samples → the digits the classifier reads, in sample order."""
    load: Callable[[], Any] = load_digits_pipeline
    """Loads the pipeline again (a twin, for checks that run uncached and cached side by side)."""


def subject(model: str) -> Subject:
    real, _ = digits_images()
    real, score = (real[:512] + 1) / 2, ClassifierScore(load_digits_classifier())
    if model == "digits":
        return Subject("digits DiT (FLUX transformer, `graphopt.digits`)", "", load_digits_pipeline(), (1, 32, 32),
                       score, real)
    size = moving_digits.CANVAS
    return Subject(f"moving-digits video DiT (Wan transformer, `graphopt.moving_digits`, {moving_digits.FRAMES} "
                   f"frames of {size}x{size}; PSNR and SSIM per frame, the classifier on each frame's digit)",
                   "_video", moving_digits.load_moving_digits_pipeline(), (moving_digits.FRAMES, 1, size, size),
                   score, real, moving_digits.centered_digits, moving_digits.load_moving_digits_pipeline)


def sampler(pipe: Any, labels: list[int], steps: int, **kwargs: Any) -> Callable[[], torch.Tensor]:
    return lambda: pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(SEED), **kwargs)


def timed(run: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, list[float]]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    assert out is not None
    return out, times


def flops(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = run()
    return out, counter.get_total_flops()


class Table:
    """Rows of one step count, all measured against the same uncached run."""

    def __init__(self, steps: int, reference: torch.Tensor, ref_times: list[float], ref_flops: int,
                 subject: Subject, labels: list[int]):
        self.steps, self.reference, self.ref_time, self.ref_flops = steps, reference, statistics.median(ref_times), ref_flops
        self.subject, self.labels = subject, labels
        self.rows: list[dict[str, Any]] = []
        self.ref_time_end: float | None = None
        """The uncached run timed again after the last row: the machine's drift over the table."""
        self.plan: dict[str, Any] | None = None
        """``auto``'s plan as JSON: its curves serve every graphopt row."""
        self.duels: list[dict[str, Any]] = []
        """Anchor rows the table's graphopt rows did not beat, timed again head to head (``head_to_head``)."""
        self.add("uncached", "-", "", reference, ref_times, ref_flops, 0.0)

    @classmethod
    def saved(cls, data: dict[str, Any], subject: Subject) -> Table:
        """A table as ``write`` saved it (rows measured, nothing rerun)."""
        table = cls.__new__(cls)
        table.steps, table.rows, table.subject = data["steps"], data["rows"], subject
        table.ref_time = next(r["seconds"] for r in data["rows"] if r["family"] == "uncached")
        table.ref_time_end = data.get("uncached_seconds_at_end")
        table.plan, table.duels = data.get("plan"), data.get("duels", [])
        return table

    def add(self, family: str, method: str, setting: str, images: torch.Tensor, times: list[float], n_flops: int,
            skipped: float | None, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        row = {"family": family, "method": method, "setting": setting, **({"spec": spec} if spec else {}),
               "speedup": self.ref_time / statistics.median(times),
               "speedup_spread": [self.ref_time / max(times), self.ref_time / min(times)],
               "seconds": statistics.median(times), "flops_ratio": n_flops / self.ref_flops,
               "skipped": skipped,
               "psnr": psnr(images, self.reference), "ssim": ssim(images, self.reference)}
        digits = self.subject.digits_of(images)
        labels = torch.tensor(self.labels).repeat_interleave(len(digits) // len(images))
        row["accuracy"] = self.subject.score.accuracy(digits, labels)
        row["frechet"] = self.subject.score.frechet_distance(digits, self.subject.real)
        self.rows.append(row)
        return row


def measure(table: Table, family: str, method: str, setting: str, run: Callable[[], torch.Tensor], repeats: int,
            skipped: Callable[[], float | None], flop_run: Callable[[], torch.Tensor],
            warm_up: Callable[[], torch.Tensor], spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """``warm_up`` (two steps, all samples, untimed) lets each method do its one-off work (a capture, a hook's
    set-up) outside the timing; ``run`` (all samples) timed ``repeats`` times gives the images; ``flop_run``
    (a few samples) the FLOPs."""
    warm_up()
    images, times = timed(run, repeats)
    fraction = skipped()
    _, n_flops = flops(flop_run)
    return table.add(family, method, setting, images, times, n_flops, fraction, spec)


def graphopt_rows(pipe: Any, table: Table, labels: list[int], steps: int, repeats: int, bar: tqdm) -> Any:
    """``auto``, then every policy at its ``ROWS`` settings, lightest first, each chain until its PSNR falls
    under ``STOP_PSNR``."""
    run, flop_run, warm_up = (sampler(pipe, labels, steps), sampler(pipe, labels[:FLOP_SAMPLES], steps),
                              sampler(pipe, labels, 2))
    gd.optimize(pipe, step_cache="auto", quality=BUDGET, calibration={**CALIBRATION, "num_inference_steps": steps},
                progress=False)
    plan = pipe.graphopt.plan
    table.plan = plan.to_json()
    curves = plan.curves.to_json()
    budget = ", ".join(f"{k}>={v:g}" for k, v in BUDGET.items())
    measure(table, "graphopt", "auto", f"{budget}: {_setting(plan.spec)}", run, repeats,
            lambda: last_run_skipped(pipe), flop_run, warm_up, dict(plan.spec))
    bar.update(1)
    for name, settings in ROWS.items():
        stopped: set[str] = set()
        for setting in settings:
            bar.update(1)
            if chain_of(setting) in stopped:
                continue
            gd.optimize(pipe, step_cache={"policy": name, **setting, "curves": curves})
            row = measure(table, "graphopt", name, _setting(setting), run, repeats,
                          lambda: last_run_skipped(pipe), flop_run, warm_up, {"policy": name, **setting})
            if row["psnr"] < STOP_PSNR:
                stopped.add(chain_of(setting))
    gd.restore(pipe)
    return plan


def last_run_skipped(pipe: Any) -> float:
    """The block evaluations the timed run skipped: the last run of the captured graph that served it, the
    one with the most evaluations (the full batch; the others served calibration's smaller batches)."""
    runs = [graph["runs"][-1] for graph in gd.report(pipe)["graphs"] if graph["runs"]]
    last = max(runs, key=lambda r: r["evaluated"] + r["skipped"])
    return last["skipped"] / max(last["evaluated"] + last["skipped"], 1)


def anchors(steps: int) -> list[Any]:
    calibration = {"class_labels": CALIBRATION["class_labels"], "generator": torch.Generator().manual_seed(7)}
    return anchor_methods(num_inference_steps=steps, calibration_kwargs=calibration)


def anchor_rows(pipe: Any, table: Table, labels: list[int], steps: int, repeats: int, bar: tqdm) -> None:
    run, flop_run, warm_up = (sampler(pipe, labels, steps), sampler(pipe, labels[:FLOP_SAMPLES], steps),
                              sampler(pipe, labels, 2))
    for method in anchors(steps):
        family = method.name.split(".")[0]
        try:
            method.apply(pipe)
            measure(table, family, method.name, method.setting, run, repeats, lambda: method.skipped(pipe), flop_run,
                    warm_up)
        except Exception as e:  # a tool that fails on a setting is a row that says so
            table.rows.append({"family": family, "method": method.name, "setting": method.setting,
                               "error": f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"})
        finally:
            method.remove(pipe)
        bar.update(1)


def _setting(spec: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("curves",))


# ----------------------------------------------------------------- the goals
def batch_check(pipe: Any, plan: Any, steps: int, sample_shape: tuple[int, ...]) -> dict[str, Any]:
    """Four mixed classes in one batch against each alone, same noise: per-sample PSNR difference."""
    labels = [1, 4, 7, 9]
    noise = torch.randn(4, *sample_shape, generator=torch.Generator().manual_seed(SEED))

    def images(batch_labels: list[int], latents: torch.Tensor) -> torch.Tensor:
        return pipe(batch_labels, num_inference_steps=steps, latents=latents)

    reference = images(labels, noise)
    alone_reference = torch.cat([images([c], noise[i:i + 1]) for i, c in enumerate(labels)])
    gd.optimize(pipe, step_cache=plan)
    batched = images(labels, noise)
    alone = torch.cat([images([c], noise[i:i + 1]) for i, c in enumerate(labels)])
    gd.restore(pipe)
    in_batch = psnr(batched, reference, per_sample=True)
    by_itself = psnr(alone, alone_reference, per_sample=True)
    gaps = [abs(a - b) for a, b in zip(in_batch, by_itself)]
    return {"psnr_in_batch": in_batch, "psnr_alone": by_itself, "max_gap_db": max(gaps), "goal_met": max(gaps) <= 0.5}


def transfer_check(pipe: Any, plan_50: Any, labels: list[int]) -> dict[str, Any]:
    """A plan calibrated at 50 steps, used at 30, against a plan calibrated at 30 (policy fixed to the 50-step
    plan's, so only the calibration's step count differs)."""
    run = sampler(pipe, labels, 30)
    reference = run()
    gd.optimize(pipe, step_cache=plan_50)
    from_50 = run()
    try:
        gd.optimize(pipe, step_cache=plan_50.spec["policy"], quality=BUDGET,
                    calibration={**CALIBRATION, "num_inference_steps": 30}, progress=False)
    except GraphoptError as e:  # the policy meets the budget at the plan's step count, not at 30
        gd.restore(pipe)
        return {"policy": plan_50.spec, "psnr_plan_at_30": psnr(from_50, reference), "error": str(e),
                "goal_met": False}
    plan_30 = pipe.graphopt.plan
    gd.optimize(pipe, step_cache=plan_30)
    from_30 = run()
    gd.restore(pipe)
    a, b = psnr(from_50, reference), psnr(from_30, reference)
    return {"policy": plan_50.spec, "psnr_plan_at_30": a, "psnr_plan_30_at_30": b, "gap_db": b - a,
            "goal_met": b - a <= 1.0}


def compile_check(pipe: Any, twin: Any, plan: Any, labels: list[int], steps: int, repeats: int) -> dict[str, Any]:
    """torch.compile (inductor) over the cached transformer: graph breaks inside blocks, recompiles across
    steps, and the cached speed-up compiled against eager. ``twin`` (the same model, loaded again) runs
    cached beside ``pipe`` uncached, so the four are timed in turns, one run each per round, and the
    machine's drift hits them alike."""
    from torch._dynamo.utils import counters

    gd.optimize(twin, step_cache=plan)
    sampler(twin, labels, steps)()  # captures, eager
    eager = {"uncached": pipe.transformer, "cached": twin.transformer}
    torch._dynamo.reset()
    compiled = {"uncached": torch.compile(eager["uncached"]), "cached": torch.compile(eager["cached"])}
    owners = {"uncached": pipe, "cached": twin}
    runs: dict[str, Callable[[], torch.Tensor]] = {}
    for kind, owner in owners.items():
        for mode, modules in (("eager", eager), ("compiled", compiled)):
            def run(owner: Any = owner, module: Any = modules[kind], kind: str = kind) -> torch.Tensor:
                owner.transformer = module
                try:
                    return sampler(owner, labels, steps)()
                finally:
                    owner.transformer = eager[kind]
            runs[f"{mode}_{kind}"] = run
    runs["compiled_uncached"]()  # compiles
    counters.clear()
    runs["compiled_cached"]()  # compiles
    graphs_after_first = counters["stats"]["unique_graphs"]
    breaks = dict(counters["graph_break"])
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name] += timed(run, 1)[1]
    recompiles = counters["stats"]["unique_graphs"] - graphs_after_first
    gd.restore(twin)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    eager_speedup = seconds["eager_uncached"] / seconds["eager_cached"]
    compiled_speedup = seconds["compiled_uncached"] / seconds["compiled_cached"]
    return {"graph_breaks": breaks, "graphs_compiled_after_the_first_run": recompiles, "seconds": seconds,
            "spread": {name: [min(t), max(t)] for name, t in times.items()},
            "eager_speedup": eager_speedup, "compiled_speedup": compiled_speedup,
            "goal_met": recompiles == 0 and compiled_speedup >= 0.9 * eager_speedup}


def head_to_head(subject: Subject, table: Table, labels: list[int], rounds: int, bar: tqdm) -> None:
    """Rows timed minutes apart in the table, where this machine's speed moves by a quarter, timed again in
    turns on copies of the model, one run each per round in alternating order, beside the uncached sampler:
    ``auto`` (the goal's speed-up), and each anchor row no graphopt row matched in the table with its
    challengers, the graphopt rows of at least its PSNR with the best speed-up and the lowest FLOPs ratio
    (among those that skip something: one that skips nothing is fast in the table by chance alone)."""
    curves = table.plan["curves"] if table.plan else None
    methods = {(m.name, m.setting): m for m in anchors(table.steps)}

    def loaded(row: dict[str, Any]) -> Any:
        pipe = subject.load()
        if row["family"] == "graphopt":
            gd.optimize(pipe, step_cache={**row["spec"], "curves": curves})
        else:
            methods[row["method"], row["setting"]].apply(pipe)
        return pipe

    def timed_in_turns(rows: list[dict[str, Any]]) -> dict[str, Any]:
        pipes = [subject.load(), *map(loaded, rows)]
        runs = [sampler(pipe, labels, table.steps) for pipe in pipes]
        for pipe in pipes:
            sampler(pipe, labels, 2)()  # one-off work (captures, hooks' set-up) outside the timing
        times: list[list[float]] = [[] for _ in runs]
        for k in range(rounds):
            for i in (range(len(runs)) if k % 2 == 0 else reversed(range(len(runs)))):
                times[i] += timed(runs[i], 1)[1]
        for row, pipe in zip(rows, pipes[1:]):
            if row["family"] != "graphopt":
                methods[row["method"], row["setting"]].remove(pipe)  # a hook may patch more than its copy
        seconds = [statistics.median(t) for t in times]
        return {"uncached_seconds": seconds[0], "rounds": rounds,
                "rows": [{**{k: row[k] for k in ("family", "method", "setting", "psnr", "flops_ratio")},
                          "speedup": seconds[0] / s, "seconds": s, "spread": [min(t), max(t)]}
                         for row, s, t in zip(rows, seconds[1:], times[1:])]}

    auto = next(r for r in _ours(table) if r["method"] == "auto")
    table.duels = [{"kind": "goal", **timed_in_turns([auto])}]
    bar.update(1)
    contested = [r for r in _anchor_rows(table.rows) if skips_something(r)
                 and not any(o["psnr"] >= r["psnr"] and o["speedup"] >= r["speedup"] for o in _ours(table))]
    bar.total += len(contested)
    for anchor in contested:
        able = [o for o in _ours(table) if o["psnr"] >= anchor["psnr"] and skips_something(o)]
        picks = {id(o): o for o in (max(able, key=lambda o: o["speedup"], default=None),
                                    min(able, key=lambda o: o["flops_ratio"], default=None)) if o}
        duel = timed_in_turns([anchor, *picks.values()])
        duel["matched"] = any(r["speedup"] >= duel["rows"][0]["speedup"] for r in duel["rows"][1:])
        table.duels.append({"kind": "anchor", **duel})
        bar.update(1)


def skips_something(row: dict[str, Any]) -> bool:
    """Whether a row saves work: one that skips nothing is the uncached computation through a tool's hooks, the
    uncached point of every frontier, and its speed-up in the table is the machine's drift alone."""
    return row["flops_ratio"] < 0.99


def _anchor_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The measured rows of diffusers' hooks and cache-dit."""
    return [r for r in rows if r["family"] not in ("graphopt", "uncached") and "error" not in r]


def _ours(table: Table) -> list[dict[str, Any]]:
    """The table's graphopt rows that a duel can run again: measured, with their policy spec."""
    return [r for r in table.rows if r["family"] == "graphopt" and "error" not in r and "spec" in r]


def goal_checks(subject: Subject, plan: Any, labels: list[int], steps: int,
                args: argparse.Namespace) -> dict[str, Any]:
    pipe = subject.pipe
    checks = {"batch_of_4": batch_check(pipe, plan, steps, subject.sample_shape),
              f"plan_{steps}_at_30": transfer_check(pipe, plan, labels[:8])}
    if not args.skip_compile:
        checks["torch_compile"] = compile_check(pipe, subject.load(), plan, labels, steps, max(args.repeats, 3))
    return checks


# -------------------------------------------------------------------- output
def frontier(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(psnr, speed-up) points no other row beats on both."""
    points = sorted(((r["psnr"], r["speedup"]) for r in rows), key=lambda p: -p[0])
    best, out = 0.0, []
    for q, s in points:
        if s > best:
            out.append((q, s))
            best = s
    return out


def dominance(rows: list[dict[str, Any]], cost: str = "speedup") -> list[str]:
    """Each anchor row that skips something and that graphopt does not match: no graphopt row with at least its
    PSNR and as good a ``cost`` (``speedup``, wall-clock; or ``flops_ratio``, which no noisy neighbour moves)."""
    better = (lambda o, r: o["speedup"] >= r["speedup"]) if cost == "speedup" else \
        (lambda o, r: o["flops_ratio"] <= r["flops_ratio"])
    ours = [r for r in rows if r["family"] == "graphopt"]
    lines = []
    for r in filter(skips_something, _anchor_rows(rows)):
        if not any(o["psnr"] >= r["psnr"] and better(o, r) for o in ours):
            measured = f"{r['speedup']:.2f}x" if cost == "speedup" else f"FLOPs ratio {r['flops_ratio']:.2f}"
            lines.append(f"{r['method']} {r['setting']}: {measured} at {r['psnr']:.1f} dB is not matched")
    return lines


def plot(tables: list[Table], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    colors = {"graphopt": "tab:blue", "diffusers": "tab:orange", "cache_dit": "tab:green", "cache-dit": "tab:green"}
    for ax, table in zip(axes[0], tables):
        for family in sorted({r["family"] for r in table.rows if "error" not in r} - {"uncached"}):
            rows = [r for r in table.rows if r["family"] == family and "error" not in r and r["psnr"] < 100]
            ax.scatter([r["speedup"] for r in rows], [r["psnr"] for r in rows], s=14, alpha=0.6,
                       color=colors.get(family), label=family)
            line = frontier(rows)
            ax.plot([s for _, s in line], [q for q, _ in line], color=colors.get(family), lw=1.5)
        ax.axhline(30, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="wall-clock speed-up vs uncached", ylabel="PSNR vs uncached (dB)",
               title=f"{title}, {table.steps} steps", ylim=(15, 50))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(tables: list[Table], checks: dict[str, Any], args: argparse.Namespace) -> str:
    lines = ["# Step caching: graphopt against diffusers' cache hooks and cache-dit", "",
             f"Machine: {machine()}; torch threads: {args.threads}. Trained {tables[0].subject.title}, "
             f"{args.samples} samples (classes 0-9 in turn) with classifier-free guidance "
             f"batched, seed {SEED}. Speed-up: median of {args.repeats} sampling runs per row, of 3 for the uncached "
             f"one (spread min-max); FLOPs "
             f"ratio: torch FlopCounterMode over the first {FLOP_SAMPLES} samples; PSNR/SSIM against the uncached images of the same seed; "
             "accuracy and Fréchet distance (to 512 real digits) from the digits classifier's features. "
             "`skipped`: graphopt's block evaluations skipped; the anchors': attention evaluations skipped.", ""]
    for table in tables:
        end = table.ref_time_end
        drift = "" if end is None else f"; timed again after the last row: {end:.2f} s" + (
            f", so the machine's speed drifted {table.ref_time / end:.2f}x over the table and its speed-ups with "
            f"it: compare FLOPs ratios" if abs(table.ref_time / end - 1) > 0.1 else "")
        lines += [f"## {table.steps} steps (uncached: {table.ref_time:.2f} s per run{drift})", "",
                  "| family | method | setting | speed-up | spread | FLOPs ratio | skipped | PSNR dB | SSIM | acc | FD |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in table.rows:
            if "error" in r:
                lines.append(f"| {r['family']} | {r['method']} | {r['setting']} | fails: {r['error']} |||||||||")
                continue
            skipped = "-" if r["skipped"] is None else f"{r['skipped']:.0%}"
            lines.append(f"| {r['family']} | {r['method']} | {r['setting']} | {r['speedup']:.2f}x | "
                         f"{r['speedup_spread'][0]:.2f}-{r['speedup_spread'][1]:.2f} | {r['flops_ratio']:.2f} | "
                         f"{skipped} | {r['psnr']:.1f} | {r['ssim']:.3f} | {r['accuracy']:.2f} | {r['frechet']:.1f} |")
        best = max((r for r in table.rows if r["family"] == "graphopt" and r["psnr"] >= 30 and r["ssim"] >= 0.92),
                   key=lambda r: r["speedup"], default=None)
        lines += ["", "Best graphopt row at PSNR >= 30 dB and SSIM >= 0.92: "
                      + (f"{best['method']} ({best['setting']}), {best['speedup']:.2f}x" if best else "none"), ""]
        idle = [f"{r['method']} {r['setting']}" for r in _anchor_rows(table.rows) if not skips_something(r)]
        if idle:
            lines += ["Anchor rows that skip nothing (FLOPs ratio >= 0.99: the uncached computation through the "
                      "tool's hooks, so their speed-up is drift) are no frontier points: " + "; ".join(idle) + ".", ""]
        for cost, what in (("speedup", "speed-up"), ("flops_ratio", "FLOPs ratio")):
            unmatched = dominance(table.rows, cost)
            lines += [f"Anchor rows graphopt's rows do not match (same or better PSNR and {what}): "
                      + ("none" if not unmatched else ""), *[f"- {u}" for u in unmatched], ""]
        lines += in_turns(table)
    lines += ["## Goals", "", "```json", json.dumps(checks, indent=1, default=float), "```", ""]
    return "\n".join(lines)


def in_turns(table: Table) -> list[str]:
    """The markdown of ``head_to_head``'s timings."""
    if not table.duels:
        return []
    rounds = table.duels[0]["rounds"]
    lines = [f"### Timed again in turns ({rounds} rounds, one run of each per round on its own copy of the model; "
             "speed-up: median seconds of the uncached runs of the same rounds over the row's)", "",
             "| duel | family | method | setting | PSNR dB | FLOPs ratio | speed-up | seconds (min-max) |",
             "|---|---|---|---|---|---|---|---|"]
    contested = [d for d in table.duels if d["kind"] == "anchor" and skips_something(d["rows"][0])]
    for k, duel in enumerate(table.duels):
        name = "goal" if duel["kind"] == "goal" else f"{k}: " + (
            "skips nothing" if duel not in contested else "matched" if duel["matched"] else "not matched")
        for r in duel["rows"]:
            lines.append(f"| {name} | {r['family']} | {r['method']} | {r['setting']} | {r['psnr']:.1f} | "
                         f"{r['flops_ratio']:.2f} | {r['speedup']:.2f}x | {r['seconds']:.2f} "
                         f"({r['spread'][0]:.2f}-{r['spread'][1]:.2f}) |")
    lines += ["", f"Anchor rows the table left unmatched, timed in turns: {sum(d['matched'] for d in contested)} of "
                  f"{len(contested)} matched by a graphopt row of at least their PSNR.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["digits", "moving_digits"], default="digits")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="+", default=[50],
                        help="step counts, one table each; run each in its own process (--tag _20steps): "
                             "after one table's hooks, diffusers' FirstBlockCache and MagCache failed and "
                             "SeaCache and cache-dit skipped nothing in the next table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (the uncached one: at least 3)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the rows timed again in turns")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--tag", default="", help="appended to the result files' names")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the markdown and plot from the JSON a run with these arguments wrote")
    args = parser.parse_args()
    if args.render:
        render(args)
        return
    torch.set_num_threads(args.threads)
    measured = subject(args.model)
    pipe = measured.pipe
    labels = [k % 10 for k in range(args.samples)]
    tables, checks = [], {}
    n_graphopt = 1 + sum(len(s) for s in ROWS.values())
    bar = tqdm(total=len(args.steps) * (n_graphopt + len(anchor_methods(50, {"class_labels": [0]})) + 1),
               desc="step_cache_compare", unit="row")
    plans = {}
    for steps in args.steps:
        reference, times = timed(sampler(pipe, labels, steps), max(args.repeats, 3))
        _, n_flops = flops(sampler(pipe, labels[:FLOP_SAMPLES], steps))
        table = Table(steps, reference, times, n_flops, measured, labels)
        plans[steps] = graphopt_rows(pipe, table, labels, steps, args.repeats, bar)
        if steps == args.steps[0]:  # before the anchors, whose hooks patch the transformer
            checks.update(goal_checks(measured, plans[steps], labels, steps, args))
        anchor_rows(pipe, table, labels, steps, args.repeats, bar)
        _, end_times = timed(sampler(pipe, labels, steps), max(args.repeats, 3))
        table.ref_time_end = statistics.median(end_times)
        head_to_head(measured, table, labels, args.rounds, bar)
        tables.append(table)
        text = write(tables, checks, args)  # after each step count: a long run stopped early keeps its tables
    bar.close()
    print(text)


def write(tables: list[Table], checks: dict[str, Any], args: argparse.Namespace) -> str:
    RESULTS.mkdir(exist_ok=True)
    text = markdown(tables, checks, args)
    suffix = tables[0].subject.suffix + args.tag
    (RESULTS / f"step_cache_compare{suffix}.md").write_text(text)
    (RESULTS / f"step_cache_compare{suffix}.json").write_text(json.dumps(
        {"tables": [{"steps": t.steps, "rows": t.rows, "uncached_seconds_at_end": t.ref_time_end, "plan": t.plan,
                     "duels": t.duels} for t in tables], "checks": checks}, default=float, indent=1))
    plot(tables, tables[0].subject.title.split(" (")[0], RESULTS / f"step_cache_frontier{suffix}.png")
    return text


def render(args: argparse.Namespace) -> None:
    measured = subject(args.model)
    path = RESULTS / f"step_cache_compare{measured.suffix + args.tag}.json"
    if not path.exists():
        sys.exit(f"error: --render reads {path}, which no run has written; run without --render first")
    saved = json.loads(path.read_text())
    print(write([Table.saved(t, measured) for t in saved["tables"]], saved["checks"], args))


if __name__ == "__main__":
    main()
