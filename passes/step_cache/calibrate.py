"""Calibration of step caching to a quality budget, and the plan it writes.

One uncached run of a few calibration samples is recorded (every block's
residual at every step). From it come the curves the calibrated policies read,
as rates per unit of timestep so they hold at another step count: each block's
residual change (SmoothCache), the span residual's magnitude ratio (MagCache),
and a polynomial from the span input's change to its residual's (TeaCache's
rescaling, fitted instead of hand coefficients). Then each policy's settings
are tried from light to aggressive against the budget (PSNR, SSIM or relative
error against the uncached output of the same seeds), stopping at the first
that misses it for any calibration sample; the plan keeps the setting that
skips the most block evaluations within it.

Before the sweep, probes find where the trajectory is still fragile: one reuse
of the whole span at one step, for a few steps of the first half. Where one
reuse already costs more than a tenth of the error budget, a sample can turn
into another (a video model fixes its layout early), and samples the
calibration never saw turn more easily; every setting's warm-up is stretched
past the last such step.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from graphopt.errors import GraphoptError, InvalidOptionError

from .policies import POLICIES, Curves, Policy, SpanMemory, SpanPolicy, StepInfo, make_policy, relative_change
from .runtime import Recorder

QUALITY_METRICS = {"psnr": "min", "ssim": "min", "rel_error": "max"}
"""Budget keys, and whether the budget is a floor or a ceiling."""

SETTINGS: dict[str, list[dict[str, Any]]] = {
    "fora": [{"interval": k, "max_reuse": k - 1, "warmup": w} for w in (2, 6, 12) for k in (2, 3, 4, 5)],
    "delta_dit": [{"interval": k, "max_reuse": k - 1} for k in (2, 3, 4, 6)],
    "smoothcache": [{"alpha": a, "max_reuse": 8} for a in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.8)],
    "first_block": [{"threshold": a, "max_reuse": 6} for a in (0.02, 0.04, 0.06, 0.08, 0.12, 0.2, 0.3)],
    "dbcache": [{"threshold": a, "max_reuse": 6, "order": o} for o in (0, 1)
                for a in (0.02, 0.04, 0.06, 0.08, 0.12, 0.2, 0.3, 0.4)],
    "teacache": [{"threshold": a, "max_reuse": 6, "order": o, "warmup": w} for o, w in ((0, 2), (1, 2), (1, 12))
                 for a in (0.05, 0.07, 0.085, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 0.8, 1.2)],
    "magcache": [{"threshold": a, "max_reuse": 6, "order": o, "warmup": w} for o, w in ((0, 2), (1, 2), (1, 12))
                 for a in (0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.2, 0.3, 0.5)],
    "taylorseer": [{"interval": k, "order": o, "warmup": w} for o, w in ((1, 2), (2, 2), (1, 6), (1, 12))
                   for k in (2, 3, 4, 5, 6)],
}
"""Each policy's settings, lightest first within a chain: settings that differ only in their first option
(the strength) and ``max_reuse``. A span policy's ``order`` 1 (a Taylor forecast of the reused residual, as
TaylorSeer's) is a chain of its own, as taylorseer's order 1 and order 2 are, and so is a longer warm-up
(6 or 12 of the calibration run's steps: a video model fixes its layout in the first quarter of its steps,
where one reused step can turn a sample into another: on the moving-digits Wan model, one reuse at step 2
of 50 left a sample at 18 dB PSNR, one at step 20 or later left every sample above 59 dB). Calibration
stretches every warm-up to the probed onset (``fragile_steps``)."""

PROBES = (0.02, 0.04, 0.06, 0.1, 0.16, 0.24, 0.32, 0.4, 0.5)
"""Where one reuse is probed, as fractions of the calibration run's steps."""
PROBE_SHARE = 10.0
"""A probed step is fragile when one reuse there costs more than 1/PROBE_SHARE of the budget's error
(PSNR: the budget + 20 dB; SSIM: a tenth of 1 - budget; relative error: a tenth)."""

AUTO = ("fora", "delta_dit", "smoothcache", "first_block", "teacache", "magcache", "taylorseer", "dbcache")


def chain_of(setting: Mapping[str, Any]) -> str:
    """The chain of ``SETTINGS`` a setting belongs to: its options but the strength and ``max_reuse``."""
    return repr({k: v for k, v in list(setting.items())[1:] if k != "max_reuse"})


def check_quality(quality: Any) -> dict[str, float]:
    if not isinstance(quality, Mapping) or not quality or set(quality) - set(QUALITY_METRICS):
        raise InvalidOptionError(f"quality must map one or more of {', '.join(QUALITY_METRICS)} to a bound, "
                                 f"e.g. {{'psnr': 30}}; got {quality!r:.80}")
    return {k: float(v) for k, v in quality.items()}


def measure(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """PSNR, mean SSIM and relative L2 error of ``output`` against ``reference`` (images in [0, 1]) over the
    batch, and each one's worst sample (``worst_psnr``, ...)."""
    from graphopt.quality import psnr, ssim

    error = (output - reference).flatten(1).norm(dim=1)
    rel_rows = error / reference.flatten(1).norm(dim=1).clamp_min(1e-12)
    rel = float(error.norm() / reference.norm().clamp_min(1e-12))
    return {"psnr": psnr(output, reference), "ssim": ssim(output, reference), "rel_error": rel,
            "worst_psnr": min(psnr(output, reference, per_sample=True)),
            "worst_ssim": min(ssim(output, reference, per_sample=True)),
            "worst_rel_error": float(rel_rows.max())}


def meets(measured: Mapping[str, float], quality: Mapping[str, float]) -> bool:
    """Whether every calibration sample meets the budget: a batch figure met thanks to its easy samples
    hides the hard ones, and the samples a plan meets later are as likely hard."""
    def value(k: str) -> float:
        return measured.get(f"worst_{k}", measured[k])

    return all(value(k) >= v if QUALITY_METRICS[k] == "min" else value(k) <= v for k, v in quality.items())


def tightened(quality: Mapping[str, float], share: float = PROBE_SHARE) -> dict[str, float]:
    """The budget with ``1/share`` of its error: what one reuse alone may cost."""
    bounds = {"psnr": lambda v: v + 20.0 * math.log10(share), "ssim": lambda v: 1.0 - (1.0 - v) / share,
              "rel_error": lambda v: v / share}
    return {k: bounds[k](v) for k, v in quality.items()}


# --------------------------------------------------------------------- curves
def fit_curves(recorders: Sequence[Recorder], blocks: int) -> Curves:
    """Rates per unit of timestep, averaged over samples and branches, on the recorded timesteps."""
    block_rate: dict[float, list[list[float]]] = defaultdict(lambda: [[] for _ in range(blocks)])
    log_ratio: dict[float, list[float]] = defaultdict(list)
    x_change: list[float] = []
    y_change: list[float] = []
    for recorder in recorders:
        last: dict[str, dict[str, Any]] = {}
        for call in recorder.calls:
            before = last.get(call["branch"])
            last[call["branch"]] = call
            if before is None or call["t"] == before["t"]:
                continue
            t, dt = call["t"], abs(call["t"] - before["t"])
            for b in range(blocks):
                change = relative_change(call["blocks"][b], before["blocks"][b])
                block_rate[t][b].append(float(change.mean()) / dt)
            now = sum(float(x.norm()) ** 2 for x in call["span"]) ** 0.5
            then = sum(float(x.norm()) ** 2 for x in before["span"]) ** 0.5
            log_ratio[t].append(math.log(max(now, 1e-12) / max(then, 1e-12)) / dt)
            x_change += relative_change(call["input"], before["input"]).tolist()
            y_change += relative_change(call["span"], before["span"]).tolist()
    ts = sorted(block_rate)
    if len(ts) < 2:
        raise GraphoptError("step_cache calibration recorded fewer than 3 steps; calibrate with more steps")
    rescale = np.polyfit(np.array(x_change), np.array(y_change), 2).tolist() if len(x_change) > 3 else []
    return Curves(t=ts, block_rate=[[float(np.mean(block_rate[t][b])) for t in ts] for b in range(blocks)],
                  span_log_ratio_rate=[float(np.mean(log_ratio[t])) for t in ts], rescale=rescale)


# ----------------------------------------------------------------------- plans
@dataclass
class Trial:
    spec: dict[str, Any]
    measured: dict[str, float]
    skipped: float


@dataclass
class Plan:
    """A calibrated policy and what it was calibrated on; ``save``/``load`` as JSON. With sparse attention
    calibrated beside it (``graphopt.passes.sparse_attention.calibrate``), its options too; ``curves`` is
    None when the plan caches nothing (sparse attention alone)."""

    spec: dict[str, Any]
    curves: Curves | None
    fingerprint: dict[str, str]
    quality: dict[str, float]
    measured: dict[str, float]
    skipped: float
    trials: list[Trial] = field(default_factory=list)
    fragile_steps: int = 0
    """The calibration run's first steps that one reuse already hurt (every setting's warm-up covers them)."""
    sparse: dict[str, Any] | None = None
    """The ``sparse_video_attention`` options the plan runs with, or None."""
    attention_share: float | None = None
    """The share of the denoiser's FLOPs its sparse attentions spend dense (calibration's work model)."""
    work: float | None = None
    """The denoiser's FLOPs the plan leaves, as a share of dense, uncached sampling (the work model's)."""
    time: float | None = None
    """The time the plan leaves, as a share of dense, uncached sampling (the time model's, which chose it:
    ``passes/sparse_attention/calibrate.py``)."""
    alone: dict[str, Any] | None = None
    """Calibrated together: each pass's fastest setting alone within the budget (``options``, ``measured``,
    ``time``, ``work``), what the pair was chosen against."""

    def policy(self) -> Policy:
        return make_policy(dict(self.spec), self.curves)

    def to_json(self) -> dict[str, Any]:
        extra = {k: v for k, v in (("sparse_attention", self.sparse), ("attention_share", self.attention_share),
                                   ("work", self.work), ("time", self.time), ("alone", self.alone)) if v is not None}
        return {"plan": "graphopt.step_cache/1", **self.spec,
                "curves": None if self.curves is None else self.curves.to_json(),
                "fingerprint": self.fingerprint, "quality": self.quality, "measured": self.measured,
                "skipped_fraction": self.skipped, "fragile_steps": self.fragile_steps, **extra,
                "trials": [{"setting": t.spec, **t.measured, "skipped_fraction": t.skipped} for t in self.trials]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        data = dict(data)
        if data.pop("plan", None) != "graphopt.step_cache/1":
            raise InvalidOptionError("not a graphopt step-cache plan (no 'plan': 'graphopt.step_cache/1' field); "
                                     "make one with graphopt.diffusers.optimize(pipe, step_cache='auto', quality=...)")
        spec = {k: data.pop(k) for k in list(data) if k not in (
            "curves", "fingerprint", "quality", "measured", "skipped_fraction", "trials", "fragile_steps",
            "sparse_attention", "attention_share", "work", "time", "alone")}
        curves = Curves.from_json(data["curves"]) if data.get("curves") is not None else None
        return cls(spec, curves, data["fingerprint"], data["quality"], data["measured"], data["skipped_fraction"],
                   fragile_steps=data.get("fragile_steps", 0), sparse=data.get("sparse_attention"),
                   attention_share=data.get("attention_share"), work=data.get("work"), time=data.get("time"),
                   alone=data.get("alone"))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidOptionError(f"cannot read step-cache plan {path}: {e}") from None


@dataclass
class OneReuse(SpanPolicy):
    """Calibration's probe: the whole span reused at step ``at`` of the run and computed at every other."""

    name: ClassVar[str] = "one_reuse"
    at: int = 1

    def decide(self, step: StepInfo, memory: SpanMemory, signal: Any) -> bool:
        return step.index == self.at and memory.residual is not None


def fragile_steps(sample: Callable[[Policy], tuple[torch.Tensor, float]], reference: torch.Tensor, steps: int,
                  quality: Mapping[str, float], progress: Callable[[str], None] | None = None) -> int:
    """How many first steps of a ``steps``-step run to keep computed: up to the probe after the last probed
    step where one reuse misses the ``tightened`` budget on some calibration sample (0 if none does)."""
    probes = sorted({max(1, round(f * steps)) for f in PROBES if round(f * steps) < steps - 1})
    bar = tightened(quality)
    onset = 0
    for k, at in enumerate(probes):
        images, _ = sample(OneReuse(at=at))
        measured = measure(images, reference)
        if progress is not None:
            progress(f"one reuse at step {at}: worst psnr {measured['worst_psnr']:.1f}")
        if not meets(measured, bar):
            onset = probes[k + 1] if k + 1 < len(probes) else at + 1
    return onset


def with_warmup(name: str, setting: Mapping[str, Any], warmup: int) -> dict[str, Any]:
    """``setting`` with its warm-up (the policy's default if unset) at least ``warmup`` steps."""
    own = setting.get("warmup", POLICIES[name].warmup)
    return {**setting, "warmup": warmup} if warmup > own else dict(setting)


def calibrate(sample: Callable[[Policy | None], tuple[torch.Tensor, float]], reference: torch.Tensor,
              curves: Curves, quality: Mapping[str, float], policies: Sequence[str] = AUTO,
              progress: Callable[[str], None] | None = None) -> tuple[Trial, list[Trial], int]:
    """Try each policy's settings, lightest first, until one misses the budget (per chain); the trial that
    skips most within it, and the ``fragile_steps`` every warm-up was stretched to. ``sample(policy)`` runs
    the calibration samples and gives (images, skipped fraction)."""
    for name in policies:
        if name not in POLICIES or name == "none":
            raise InvalidOptionError(f"unknown step_cache policy {name!r}; policies: {', '.join(AUTO)}")
    onset = fragile_steps(sample, reference, len(curves.t) + 1, quality, progress)
    trials: list[Trial] = []
    for name in policies:
        missed: set[str] = set()  # chains that missed the budget
        tried: set[str] = set()  # stretched warm-ups make some settings alike
        for setting in SETTINGS[name]:
            setting = with_warmup(name, setting, onset)
            if chain_of(setting) in missed or repr(setting) in tried:
                continue
            tried.add(repr(setting))
            spec = {"policy": name, **setting}
            images, skipped = sample(make_policy(dict(spec), curves))
            trial = Trial(spec, measure(images, reference), skipped)
            trials.append(trial)
            if progress is not None:
                progress(f"{name} {setting}: psnr {trial.measured['psnr']:.1f}, skipped {skipped:.0%}")
            if not meets(trial.measured, quality):
                missed.add(chain_of(setting))
    reusing = [t for t in trials if t.skipped > 0]  # a setting that reuses nothing meets any budget
    if not reusing:
        fragile = f" (its first {onset} steps are too fragile to reuse)" if onset else ""
        raise GraphoptError(f"no step_cache setting reuses a block in a {len(curves.t) + 1}-step run{fragile}; "
                            f"calibrate with more num_inference_steps")
    good = [t for t in reusing if meets(t.measured, quality)]
    if not good:
        best = max(reusing, key=lambda t: t.measured["psnr"])
        reached = ", ".join(f"{k} {best.measured[k]:.3g}" for k in quality)
        raise GraphoptError(f"no step_cache policy meets {dict(quality)}: the closest, {best.spec}, reached "
                            f"{reached}; loosen the budget")
    return max(good, key=lambda t: (t.skipped, t.measured["psnr"])), trials, onset
