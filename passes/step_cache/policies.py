"""Step-caching policies: at each sampling step, which blocks are recomputed, and what stands in for the rest.

A denoiser's blocks each add a *residual* to the hidden-state stream; a skipped
block (or span of blocks) adds the residual it added when last computed, or a
forecast of it. Two shapes of policy:

- **per-block schedules**, decided from the step and the timestep alone (no data,
  so no host sync): FORA's fixed interval (Selvaraju et al. 2024), Δ-DiT's
  rear-early / front-late stages (Chen et al. 2024) and SmoothCache's calibrated
  per-layer error curves (Liu et al. 2024);
- **span policies**: the first ``front`` blocks always run, the last ``back``
  blocks always run, and the middle is recomputed or estimated, per sample:
  First-Block-Cache (a threshold on the change of the front residual), TeaCache
  (Liu et al. 2024: the accumulated, rescaled change of the span's input, the
  rescaling fitted at calibration), MagCache (Ma et al. 2025: an error model
  from calibrated residual-magnitude ratios), TaylorSeer (Liu et al. 2025: a
  Taylor forecast of the residual from the last computed steps) and cache-dit's
  DBCache (front ``n`` and back ``m`` blocks computed, a middle threshold).

Every decision is keyed on the scheduler's timestep, read from the denoiser's
timestep input, never on the step index alone where a rate is meant: calibrated
curves are rates per unit of timestep, so a plan fitted at 50 steps holds at 30.
Every policy keeps ``warmup`` first steps computed and allows at most
``max_reuse`` consecutive reuses; with calibrated curves these counts, and
intervals, are the calibration run's steps, measured in timestep, so they
mean the same stretch of the trajectory at another step count (a warm-up also
spans at least its count of this run's steps).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from graphopt._torch_private import host_side
from graphopt.errors import InvalidOptionError

Residual = list[torch.Tensor]
"""One tensor per stream value (FLUX: text and image streams), batch first."""


@dataclass
class Curves:
    """What calibration measured on uncached runs, as functions of the timestep (ascending ``t``)."""

    t: list[float]
    block_rate: list[list[float]] = field(default_factory=list)
    """Per block: relative change of its residual per unit of timestep (SmoothCache)."""
    span_log_ratio_rate: list[float] = field(default_factory=list)
    """log(|r_t| / |r_prev|) of the whole span's residual per unit of timestep (MagCache)."""
    rescale: list[float] = field(default_factory=list)
    """Polynomial (highest power first) from the span input's relative change to its residual's (TeaCache)."""

    def at(self, curve: list[float], t: float) -> float:
        return float(np.interp(t, self.t, curve))

    def step_size(self, t: float) -> float:
        """The calibration run's step into ``t``, from the timestep before it (exact at calibrated ``t``)."""
        if len(self.t) < 2:
            return 0.0
        return float(np.interp(t, self.t[:-1], np.diff(self.t)))

    def timestep_after(self, steps: int) -> float:
        """The calibration run's timestep ``steps`` steps in (``t`` starts at its second step)."""
        descending = self.t[::-1]
        return descending[min(steps, len(descending)) - 1] if steps > 0 else math.inf

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Curves:
        return cls(**data)


@dataclass
class StepInfo:
    """Where a call sits in its sampling run."""

    index: int
    t: float
    dt: float
    """|t - t of the previous call of the run|; 0 at the first."""
    t_first: float
    scale: float = 1.0
    """The calibration run's steps per step of this run near ``t`` (1 without calibrated curves)."""


@dataclass
class Policy:
    """Options common to all policies."""

    name: ClassVar[str] = ""
    per_block: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ()
    """Calibrated curves the policy reads."""

    warmup: int = 2
    max_reuse: int = 4
    curves: Curves | None = None

    def check(self, blocks: int) -> None:
        if self.warmup < 0 or self.max_reuse < 0:
            raise InvalidOptionError(f"step_cache policy {self.name}: warmup and max_reuse must be >= 0")
        missing = [c for c in self.needs if self.curves is None or not getattr(self.curves, c)]
        if missing:
            raise InvalidOptionError(
                f"step_cache policy {self.name} reads calibrated {', '.join(missing)}; calibrate with "
                f"graphopt.diffusers.optimize(pipe, step_cache='{self.name}', quality={{'psnr': 30}}) "
                f"or load a saved plan")

    def warm(self, step: StepInfo) -> bool:
        """Whether ``step`` is in the warm-up, where everything is computed: the calibration run's first
        ``warmup`` steps in timestep, and at least ``warmup`` steps of this run (a coarser run's first steps
        are wider, and a forecast from its first two reaches further; at 30 steps, a 3-step warm-up in
        timestep alone cost an image DiT 4 dB)."""
        if step.index < max(self.warmup, 1):
            return True
        if self.curves is None or len(self.curves.t) < 2:
            return False
        end = self.curves.timestep_after(self.warmup)
        return step.t > end + 1e-6 * max(1.0, abs(end))

    def scale(self, t: float, dt: float) -> float:
        """The calibration run's steps per step of this run at ``t``, for a step of ``dt`` into it."""
        if self.curves is None or dt <= 0:
            return 1.0
        size = self.curves.step_size(t)
        return dt / size if size > 0 else 1.0

    def steps(self, count: int, step: StepInfo) -> int:
        """``count`` steps of the calibration run in this run's steps near ``step`` (itself without curves)."""
        return max(1, round(count / step.scale)) if count else 0

    def reuse_limit(self, step: StepInfo) -> int:
        return self.steps(self.max_reuse, step)

    def off_beat(self, step: StepInfo, interval: int) -> bool:
        """Whether ``step`` falls between the computed steps of a fixed ``interval`` after the warm-up."""
        return (step.index - self.warmup) % self.steps(interval, step) != 0

    def block_error(self, block: int, t: float) -> float:
        """Estimated error per unit of timestep of reusing ``block``'s residual (per-block schedules)."""
        return 0.0

    def options(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "curves"}
        return {"policy": self.name, **values}


# ------------------------------------------------------------------ per block
@dataclass
class PerBlockPolicy(Policy):
    per_block: ClassVar[bool] = True

    def reuse(self, step: StepInfo, block: int, blocks: int, reuses: int, since: float) -> bool:
        """Whether block ``block`` reuses its residual; ``reuses`` in a row so far, ``since`` its error estimate."""
        raise NotImplementedError


@dataclass
class NoCache(PerBlockPolicy):
    """Every block computed every step: the uncached reference, through the same machinery."""

    name: ClassVar[str] = "none"

    def reuse(self, step: StepInfo, block: int, blocks: int, reuses: int, since: float) -> bool:
        return False


@dataclass
class Fora(PerBlockPolicy):
    """FORA: every block recomputed every ``interval`` steps, its residual reused in between."""

    name: ClassVar[str] = "fora"
    interval: int = 2

    def check(self, blocks: int) -> None:
        super().check(blocks)
        if self.interval < 1:
            raise InvalidOptionError(f"step_cache policy fora: interval must be >= 1, got {self.interval}")

    def reuse(self, step: StepInfo, block: int, blocks: int, reuses: int, since: float) -> bool:
        return not self.warm(step) and self.off_beat(step, self.interval) and reuses < self.reuse_limit(step)


@dataclass
class DeltaDit(PerBlockPolicy):
    """Δ-DiT: early in sampling (outline) the rear blocks are reused, late (detail) the front ones.

    ``boundary`` is the stage split as a fraction of the run's first timestep; ``blocks``
    how many blocks form the reused group (default: half).
    """

    name: ClassVar[str] = "delta_dit"
    interval: int = 2
    boundary: float = 0.5
    blocks: int = 0

    def check(self, blocks: int) -> None:
        super().check(blocks)
        if self.interval < 1 or not 0.0 <= self.boundary <= 1.0 or not 0 <= self.blocks <= blocks:
            raise InvalidOptionError(f"step_cache policy delta_dit: needs interval >= 1, boundary in [0, 1] and "
                                     f"blocks in [0, {blocks}]; got {self.interval}, {self.boundary}, {self.blocks}")

    def reuse(self, step: StepInfo, block: int, blocks: int, reuses: int, since: float) -> bool:
        group = self.blocks or blocks // 2
        early = step.t > self.boundary * step.t_first
        in_group = block >= blocks - group if early else block < group
        return in_group and not self.warm(step) and self.off_beat(step, self.interval) \
            and reuses < self.reuse_limit(step)


@dataclass
class SmoothCache(PerBlockPolicy):
    """SmoothCache: a block is reused while its calibrated error since it was computed stays under ``alpha``."""

    name: ClassVar[str] = "smoothcache"
    needs: ClassVar[tuple[str, ...]] = ("block_rate",)
    alpha: float = 0.1

    def reuse(self, step: StepInfo, block: int, blocks: int, reuses: int, since: float) -> bool:
        return not self.warm(step) and since < self.alpha and reuses < self.reuse_limit(step)

    def block_error(self, block: int, t: float) -> float:
        assert self.curves is not None
        return self.curves.at(self.curves.block_rate[block], t)


# ---------------------------------------------------------------------- spans
@dataclass
class SpanPolicy(Policy):
    """The middle blocks ``[front, blocks - back)`` are computed or estimated, per sample."""

    front: int = 0
    back: int = 0
    signal: ClassVar[str] = ""
    """What ``decide`` reads: "front" (the front blocks' residual), "input" (the span's input) or ""."""

    def check(self, blocks: int) -> None:
        super().check(blocks)
        if self.front < 0 or self.back < 0 or self.front + self.back >= blocks:
            raise InvalidOptionError(f"step_cache policy {self.name}: front + back must leave a middle of the "
                                     f"{blocks} blocks to cache; got front={self.front}, back={self.back}")

    def decide(self, step: StepInfo, memory: SpanMemory, signal: Residual | None) -> torch.Tensor | bool:
        """Per sample, whether the middle is estimated (True) instead of computed."""
        raise NotImplementedError

    def allowed(self, step: StepInfo, memory: SpanMemory) -> torch.Tensor | bool:
        if self.warm(step) or memory.residual is None:
            return False
        return memory.reuses < self.reuse_limit(step)

    order: int = 0
    """Taylor order of the estimate: 0 copies the last residual."""

    @host_side
    def estimate(self, step: StepInfo, memory: SpanMemory) -> Residual:
        return memory.forecast(step.t, self.order)


@dataclass
class SpanMemory:
    """What a span policy keeps between the calls of one branch, per sample (batch first)."""

    history: list[tuple[torch.Tensor, Residual]] = field(default_factory=list)
    """(t per sample, residual) of each sample's last computed steps, newest last (TaylorSeer). Only
    computed residuals enter it: a forecast through an earlier forecast would fit its error as a slope."""
    reference: Residual | None = None
    """The signal at the last computed step."""
    previous: Residual | None = None
    """The signal at the previous step."""
    accumulated: torch.Tensor | float = 0.0
    reuses: torch.Tensor | int = 0
    gamma: float = 1.0
    error: float = 0.0

    @property
    def residual(self) -> Residual | None:
        """The newest remembered residual, per sample."""
        return self.history[-1][1] if self.history else None

    @host_side
    def remember(self, t: float, residual: Residual, keep: int, reused: torch.Tensor | None = None) -> None:
        """Add the residual computed at ``t``; the samples ``reused`` marks (their rows of ``residual`` are
        estimates) keep their history as it was."""
        keep = max(keep, 1)
        entry = (torch.full((residual[0].shape[0],), t, dtype=residual[0].dtype, device=residual[0].device),
                 residual)
        if reused is None or not self.history:
            self.history = [*self.history, entry][-keep:]
        else:
            shifted = [*self.history, entry][-keep:]
            # a reusing sample's history, padded in front with its oldest point (a repeated point adds no order)
            stay = [self.history[0]] * (len(shifted) - len(self.history)) + self.history[-len(shifted):]
            self.history = [(where_rows(reused, a_t, b_t), [where_rows(reused, a, b) for a, b in zip(a_r, b_r)])
                            for (a_t, a_r), (b_t, b_r) in zip(stay, shifted)]

    def forecast(self, t: float, order: int) -> Residual:
        """Per sample, Newton's divided differences over its last ``order + 1`` computed steps, at ``t``;
        a repeated point contributes no slope."""
        points = self.history[-(order + 1):]
        if len(points) == 1 or order == 0:
            return points[-1][1]
        result = []
        for k in range(len(points[0][1])):
            rank = points[0][1][k].dim()
            ts = [p[0].view(-1, *[1] * (rank - 1)) for p in points]
            table = [p[1][k] for p in points]
            coefficients = [table[-1]]
            level = table
            for j in range(1, len(points)):
                level = [_divided(level[i + 1] - level[i], ts[i + j] - ts[i]) for i in range(len(level) - 1)]
                coefficients.append(level[-1])
            # Newton form anchored at the newest points: r(t) = c0 + c1 (t - t_n) + c2 (t - t_n)(t - t_{n-1})
            value, product = coefficients[0], 1.0
            for j in range(1, len(coefficients)):
                product = product * (t - ts[-j])
                value = value + coefficients[j] * product
            result.append(value)
        return result


@host_side
def where_rows(rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample (batch first): ``a`` where ``rows``, else ``b``."""
    return torch.where(rows.view(-1, *[1] * (a.dim() - 1)), a, b)


def _divided(difference: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    return torch.where(gap == 0, torch.zeros_like(difference), difference / torch.where(gap == 0, 1.0, gap))


def relative_change(now: Residual, before: Residual) -> torch.Tensor:
    """Per sample: sum |now - before| / sum |before| over every stream value."""
    num = sum((a - b).abs().flatten(1).sum(1) for a, b in zip(now, before))
    den = sum(b.abs().flatten(1).sum(1) for b in before)
    return num / den.clamp_min(1e-12)


@dataclass
class FirstBlock(SpanPolicy):
    """First-Block-Cache: the rest of the model is skipped while the first block's residual stays within
    ``threshold`` (relative L1) of its value at the last computed step. A threshold of 0 never reuses."""

    name: ClassVar[str] = "first_block"
    signal: ClassVar[str] = "front"
    threshold: float = 0.08
    front: int = 1

    def decide(self, step: StepInfo, memory: SpanMemory, signal: Residual | None) -> torch.Tensor | bool:
        allowed = self.allowed(step, memory)
        if allowed is False or memory.reference is None:
            return False
        return allowed & (relative_change(signal, memory.reference) < self.threshold)


@dataclass
class DBCache(FirstBlock):
    """cache-dit's DBCache: the first ``front`` and last ``back`` blocks always run; the middle is reused
    while the front residual stays within ``threshold``; ``order`` > 0 forecasts it (TaylorSeer)."""

    name: ClassVar[str] = "dbcache"
    front: int = 1
    back: int = 1


@dataclass
class TeaCache(SpanPolicy):
    """TeaCache: the span's input change between steps, rescaled to the residual change by a polynomial
    fitted at calibration (identity until then), is accumulated; the span is reused while the sum stays
    under ``threshold``."""

    name: ClassVar[str] = "teacache"
    signal: ClassVar[str] = "input"
    threshold: float = 0.1

    def decide(self, step: StepInfo, memory: SpanMemory, signal: Residual | None) -> torch.Tensor | bool:
        assert signal is not None
        change = None if memory.previous is None else relative_change(signal, memory.previous)
        memory.previous = signal
        allowed = self.allowed(step, memory)
        if change is None or allowed is False:
            memory.accumulated = 0.0
            return False
        if self.curves is not None and self.curves.rescale:
            change = _polyval(self.curves.rescale, change).clamp_min(0.0)
        total = memory.accumulated + change
        reuse = allowed & (total < self.threshold)
        memory.accumulated = torch.where(reuse, total, torch.zeros_like(total))
        return reuse


@dataclass
class MagCache(SpanPolicy):
    """MagCache: the calibrated ratio of consecutive residual magnitudes tells how far a reused residual
    drifts; the span is reused while the accumulated drift stays under ``threshold``."""

    name: ClassVar[str] = "magcache"
    needs: ClassVar[tuple[str, ...]] = ("span_log_ratio_rate",)
    threshold: float = 0.06

    def decide(self, step: StepInfo, memory: SpanMemory, signal: Residual | None) -> torch.Tensor | bool:
        assert self.curves is not None
        allowed = self.allowed(step, memory)
        if allowed is False:
            return False
        gamma = memory.gamma * math.exp(self.curves.at(self.curves.span_log_ratio_rate, step.t) * step.dt)
        error = memory.error + abs(1.0 - gamma)
        if error >= self.threshold:
            return False
        memory.gamma, memory.error = gamma, error
        return allowed


@dataclass
class TaylorSeer(SpanPolicy):
    """TaylorSeer: the whole span is computed every ``interval`` steps and forecast in between by a
    Taylor expansion of order ``order`` (1 or 2) in the timestep over the last computed steps."""

    name: ClassVar[str] = "taylorseer"
    interval: int = 3
    order: int = 1

    def check(self, blocks: int) -> None:
        super().check(blocks)
        if self.interval < 1 or self.order not in (0, 1, 2):
            raise InvalidOptionError(f"step_cache policy taylorseer: needs interval >= 1 and order 0, 1 or 2; "
                                     f"got interval={self.interval}, order={self.order}")

    def decide(self, step: StepInfo, memory: SpanMemory, signal: Residual | None) -> torch.Tensor | bool:
        allowed = self.allowed(step, memory)
        if allowed is False or not self.off_beat(step, self.interval):
            return False
        return allowed


def _polyval(coefficients: list[float], x: torch.Tensor) -> torch.Tensor:
    result = torch.zeros_like(x)
    for c in coefficients:
        result = result * x + c
    return result


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (NoCache, Fora, DeltaDit, SmoothCache, FirstBlock, TeaCache, MagCache, TaylorSeer,
                              DBCache)
}


def make_policy(spec: str | dict[str, Any] | Policy, curves: Curves | None = None) -> Policy:
    """A policy from a name, ``{"policy": name, **options}`` or an instance; unknown names and options
    are refused with the valid ones listed."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        spec = {"policy": spec}
    if not isinstance(spec, dict) or "policy" not in spec:
        raise InvalidOptionError(f"step_cache takes a policy name or {{'policy': name, ...options}}, got {spec!r:.80}")
    options = dict(spec)
    name = options.pop("policy")
    cls = POLICIES.get(name)
    if cls is None:
        raise InvalidOptionError(f"unknown step_cache policy {name!r}; policies: {', '.join(POLICIES)}, auto")
    valid = [f.name for f in dataclasses.fields(cls) if f.name != "curves"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise InvalidOptionError(f"step_cache policy {name} has no option {', '.join(unknown)}; "
                                 f"its options: {', '.join(valid)}")
    if curves is not None:
        options["curves"] = curves
    return cls(**options)
