"""Sparse attention calibrated to a quality budget, alone or with step caching under one budget.

Each lossy pass alone is measured on the calibration samples against the
dense, uncached samples: step caching's trials come from
``step_cache.calibrate``, sparse attention's from ``SETTINGS`` here. Their
errors are close to independent (one skips whole blocks at some steps, the
other drops attention far off each head's band at every step), so a pair's
squared error is predicted as the sum of the two (PSNR, relative error; SSIM
losses add), and its time as the product of the two passes' times over dense.
Pairs that the prediction says meet the budget are tried fastest first, each
one run, until one meets it faster than the fastest pass alone that met it:
the budget is split between the passes where the split costs least, and a pass
alone is a pair with nothing on the other side.

The time model: step caching leaves the block evaluations it does not skip;
sparse attention leaves ``1 - share * (1 - ratio)``, where ``share`` is
attention's part of a timed dense run and ``ratio`` its calls' mean time
after the dense steps over before them, both clocked inside the attention
modules during the run. Time, not FLOPs, ranks the pairs: where a pass's
overhead outweighs what it skips (sparse attention over a few hundred tokens
on a CPU) its FLOPs still fall while sampling gets slower. The FLOPs left
(``work``) are recorded beside it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from graphopt.errors import GraphoptError

SETTINGS: tuple[dict[str, Any], ...] = tuple(
    {"density": d, "levels": n, "budget": b, "dense_fraction": f}
    for f in (0.1, 0.2) for d, n in ((0.25, 1), (0.25, 2), (0.125, 2), (0.5, 1)) for b in (0.02, 0.05, 0.1))
"""The narrowest band's density and how many widths a head may choose from, the sampled error a head may
have and stay sparse, and the share of the first steps kept dense (SVG keeps 10-20 %). On the
moving-digits video DiT, a second width buys 3 dB at 73 % of the attention kept and costs 4 dB at 85 %,
so both are tried."""

VERIFIED = 4
"""Predicted pairs run before settling for the best pass alone."""

MARGIN = 0.9
"""A pair stacks two lossy passes, so it must beat the fastest pass alone by more than the time model's
error: on a 2-core CPU at 4,096 tokens, pairs whose runs timed 7-9 % faster than step caching alone were 6-16 %
slower on clips calibration never saw."""


@dataclass
class Measured:
    """One setting of one pass (or a pair), run on the calibration samples."""

    options: dict[str, Any] | None
    measured: dict[str, float]
    skipped: float = 0.0
    """Step caching: the block evaluations skipped."""
    kept: float = 1.0
    """Sparse attention: the share of the replaced attentions' FLOPs computed."""
    time: float = 1.0
    """The time it leaves, as a share of dense, uncached sampling (the time model's)."""


def options_for(setting: Mapping[str, Any], steps: int) -> dict[str, Any]:
    """A setting as the pass's options for a ``steps``-step run."""
    setting = dict(setting)
    setting["dense_steps"] = round(setting.pop("dense_fraction") * steps)
    return setting


def sweep(sample: Callable[[dict[str, Any]], tuple[torch.Tensor, float, float]], reference: torch.Tensor,
          steps: int, measure: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
          progress: Callable[[str], None] | None = None) -> list[Measured]:
    """Every setting of ``SETTINGS``; ``sample(options)`` runs the samples and gives (images, kept, time)."""
    trials = []
    for setting in SETTINGS:
        options = options_for(setting, steps)
        images, kept, time = sample(options)
        trials.append(Measured(options, measure(images, reference), kept=kept, time=time))
        if progress is not None:
            progress(f"sparse {options}: psnr {trials[-1].measured['psnr']:.1f}, attention kept {kept:.0%}")
    return trials


def work(skipped: float, kept: float, attention_share: float) -> float:
    """The denoiser's FLOPs left, as a share: skipped block evaluations cost nothing, the rest pay the
    attention's kept share of its part."""
    return (1 - skipped) * (1 - attention_share * (1 - kept))


def time_left(share: float, seconds: Sequence[float], calls: Sequence[int], dense_call: float) -> float:
    """A run's time over dense by the sparse attentions' own clocks: ``seconds`` and ``calls`` of the run's
    timed calls, ``[run dense, the rest]``; their mean call against a dense call (the run's dense steps',
    else ``dense_call``, a dense run's), weighted by attention's ``share`` of the dense run. Steadier than
    timing whole runs apart: both kinds of call come from one run."""
    if not sum(calls):
        return 1.0
    dense = seconds[0] / calls[0] if calls[0] else dense_call
    return 1 - share * (1 - sum(seconds) / sum(calls) / dense)


def predicted(cache: Measured | None, sparse: Measured | None) -> dict[str, float]:
    """The pair's worst-sample quality, its two errors added."""
    parts = [m.measured for m in (cache, sparse) if m is not None]
    if not parts:
        return {"psnr": math.inf, "ssim": 1.0, "rel_error": 0.0}
    mse = sum(10 ** (-p["worst_psnr"] / 10) for p in parts)
    worst = {"psnr": -10 * math.log10(mse) if mse > 0 else math.inf,
             "ssim": 1 - sum(1 - p["worst_ssim"] for p in parts),
             "rel_error": math.sqrt(sum(p["worst_rel_error"] ** 2 for p in parts))}
    return {**worst, **{f"worst_{k}": v for k, v in worst.items()}}


def candidates(cache: Sequence[Measured], sparse: Sequence[Measured], quality: Mapping[str, float],
               meets: Callable[[Mapping[str, float], Mapping[str, float]], bool]
               ) -> list[tuple[float, Measured | None, Measured | None]]:
    """(predicted time over dense, cache trial, sparse trial) of every pair predicted to meet ``quality``,
    fastest first; either side may be None (that pass left out), never both."""
    pairs = []
    for c in [None, *cache]:
        for s in [None, *sparse]:
            if (c is None and s is None) or not meets(predicted(c, s), quality):
                continue
            pairs.append((math.prod(m.time for m in (c, s) if m is not None), c, s))
    return sorted(pairs, key=lambda p: p[0])


def best_alone(trials: Sequence[Measured], attention_share: float, quality: Mapping[str, float],
               meets: Callable[[Mapping[str, float], Mapping[str, float]], bool]) -> dict[str, Any] | None:
    """The fastest trial of one pass that met ``quality`` on its own, as a plan records it."""
    good = [t for t in trials if meets(t.measured, quality)]
    if not good:
        return None
    best = min(good, key=lambda t: t.time)
    return {"options": best.options, "measured": best.measured, "time": best.time,
            "work": work(best.skipped, best.kept, attention_share)}


def choose(pairs: Sequence[tuple[float, Measured | None, Measured | None]],
           run: Callable[[Measured | None, Measured | None], Measured], quality: Mapping[str, float],
           meets: Callable[[Mapping[str, float], Mapping[str, float]], bool]
           ) -> tuple[Measured | None, Measured | None, Measured]:
    """The first pair (fastest predicted) whose run meets ``quality`` in under ``MARGIN`` of the time of the
    fastest pass alone that met it; after ``VERIFIED`` tries, that pass alone."""
    alone = [c or s for _, c, s in pairs if c is None or s is None]
    to_beat = min((m.time for m in alone if meets(m.measured, quality)), default=math.inf)
    tried = 0
    for _, c, s in pairs:
        if c is not None and s is not None:
            if tried == VERIFIED:
                continue
            tried += 1
            both = run(c, s)
            if meets(both.measured, quality) and both.time < MARGIN * to_beat:
                return c, s, both
            continue
        alone = c if c is not None else s
        if meets(alone.measured, quality):  # type: ignore[union-attr]
            return c, s, alone  # type: ignore[return-value]
    raise GraphoptError(f"neither step caching nor sparse attention meets {dict(quality)} on the calibration "
                        f"samples; loosen the budget")
