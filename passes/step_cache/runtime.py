"""The module a ``step_cache`` node becomes: a denoiser's blocks run under a caching policy.

Its memory (residuals, accumulated distances, counters) lives on the emitted
module's ``GraphState``, never in a global, and is kept apart three ways:

- **per sample**: every residual and distance is batch first and every span
  decision is a per-sample mask, so a sample in a batch of four gets what it
  would get alone; only the samples that recompute run the cached blocks when
  the graph was captured with a symbolic batch (the ``batched`` inputs),
  otherwise every row runs and the reusing rows discard theirs;
- **per guidance branch**: a pipeline that batches cond and uncond rows gets
  that from the per-sample rule; one that calls the denoiser twice per step
  (the same timestep twice) gets one memory per call in the step, and
  ``graphopt_state.branch(name)`` names branches explicitly;
- **per sampling run**: a timestep above the previous one starts a new run
  and forgets the last (as does ``graphopt_state.reset()``).

Decisions read the timestep once per call (one host sync, which also carries
a span policy's per-sample mask). Under ``torch.compile`` every method here
runs eagerly (its Python state would otherwise be guarded on and recompile
each step) and each block module compiles whole; the memory's bookkeeping
(forecasts and remembered residuals, keyed on the float timestep, and the
residual sums) runs eagerly too, or each step would compile it anew.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from graphopt._torch_private import host_side, traced_around
from graphopt.emitters.state import GraphState

from .policies import PerBlockPolicy, Policy, Residual, SpanMemory, SpanPolicy, StepInfo, where_rows

Source = tuple[str, int]
"""Where a block input comes from: ("stream", slot) of the running stream or ("input", k) of the call."""


@dataclass
class BlockMemory:
    """A per-block schedule's memory for one branch."""

    residual: list[Residual | None]
    reuses: list[int]
    error: list[float]


@dataclass
class Clock:
    """Which call of which run: the timestep of the last call, and how many calls it had."""

    t: float | None = None
    calls_at_t: int = 0
    index: int = -1
    t_first: float = 0.0
    batch: int = -1


@dataclass
class RunCounts:
    """Block evaluations of one sampling run, counted per sample."""

    calls: int = 0
    evaluated: int = 0
    skipped: int = 0

    @property
    def skipped_fraction(self) -> float:
        total = self.evaluated + self.skipped
        return self.skipped / total if total else 0.0


@dataclass
class Recorder:
    """What calibration needs from uncached runs: per call, the timestep, the span's input, every
    block's residual and the span's residual (batch first, detached)."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def record(self, branch: str, step: StepInfo, span_input: Residual, block_residuals: list[Residual],
               span_residual: Residual) -> None:
        self.calls.append({"branch": branch, "index": step.index, "t": step.t,
                           "input": [x.detach().clone() for x in span_input],
                           "blocks": [[x.detach().clone() for x in r] for r in block_residuals],
                           "span": [x.detach().clone() for x in span_residual]})


class StepCache(torch.nn.Module):
    """Blocks ``blocks[0..L)`` of a denoiser with their caching policy.

    ``wiring[b]`` says where each input of block ``b`` comes from, and
    ``slots[b][k]`` which of its outputs carries stream ``k``; the call
    returns the last block's stream values, or a ``tail`` block's outputs.
    """

    uses_state = True
    """Its memory is the emitted module's ``GraphState``: the emitter installs one on the top module."""

    def __init__(self, blocks: Sequence[torch.nn.Module], wiring: Sequence[Sequence[Source]], streams: int,
                 timestep: int | None, policy: Policy, state: GraphState, label: str = "step_cache",
                 slots: Sequence[Sequence[int]] | None = None, tail: bool = False, batched: Sequence[int] = ()):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.wiring = [list(w) for w in wiring]
        self.slots = [list(s) for s in slots] if slots is not None else [list(range(streams))] * len(blocks)
        self.tail = tail
        self.cached = len(blocks) - tail
        """Blocks the policy decides on; a tail (a last block whose outputs are not the stream) always runs."""
        self.streams = streams
        self.batched = frozenset(batched)
        """Inputs whose first dim is the batch: with these known, the samples that recompute run alone."""
        self.timestep = timestep
        self.label = label
        self.state = [state]  # a list: the GraphState is registered once, on the top module
        self.recorder: Recorder | None = None
        self.runs: list[RunCounts] = []
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        """Swap the policy (calibration tries several); the memory of every branch is forgotten."""
        policy.check(len(self.blocks) - self.tail)
        self.policy = policy
        front, back = getattr(policy, "front", 0), getattr(policy, "back", 0)
        self.spans = {"front": range(front), "middle": range(front, self.cached - back),
                      "back": range(self.cached - back, self.cached)}
        """A span policy's block ranges, read by name in ``_run_span``: ranges passed as arguments would be
        frame inputs, which Dynamo makes symbolic on their second value, and a symbolic index breaks the
        graph at ``self.blocks[b]``."""
        self.state[0].reset()
        self.runs = []

    def extra_repr(self) -> str:
        return f"{len(self.blocks)} blocks, policy {self.policy.options()}"

    def report(self) -> dict[str, Any]:
        """Block evaluations skipped per sampling run (per sample, every branch together)."""
        runs = [{"calls": r.calls, "evaluated": r.evaluated, "skipped": r.skipped,
                 "skipped_fraction": round(r.skipped_fraction, 4)} for r in self.runs]
        return {"policy": self.policy.options(), "blocks": len(self.blocks), "tail": self.tail, "runs": runs}

    # ------------------------------------------------------------------ calls
    @traced_around
    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stream = list(inputs[:self.streams])
        step, branch = self._begin(inputs, stream[0].shape[0])
        if isinstance(self.policy, PerBlockPolicy) and self.recorder is None:
            stream = self._per_block(step, branch, stream, inputs)
        else:
            stream = self._span(step, branch, stream, inputs)
        if self.tail:
            self.runs[-1].evaluated += stream[0].shape[0]
            out = self.blocks[-1](*self._args(len(self.blocks) - 1, stream, inputs))
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return tuple(stream)

    @host_side
    def _begin(self, inputs: Sequence[torch.Tensor], batch: int) -> tuple[StepInfo, str]:
        """Place the call: which run, which call of the step (guidance branch), which step."""
        state = self.state[0]
        t = float(inputs[self.timestep].reshape(-1)[0]) if self.timestep is not None else None
        clock: Clock = state.keep(f"clock:{self.label}", Clock)
        if t is not None and t == clock.t and batch == clock.batch:
            clock.calls_at_t += 1
        else:
            if clock.index < 0 or batch != clock.batch or (t is not None and clock.t is not None and t > clock.t):
                state.forget(f"{self.label}/")
                clock.index, clock.t_first, clock.batch = -1, t or 0.0, batch
                self.runs.append(RunCounts())
            clock.index += 1
            clock.calls_at_t, clock.t = 0, t
        branch = f"{self.label}/{clock.calls_at_t}"
        last: Clock = state.keep(f"{branch}/clock", Clock)
        t_now = t if t is not None else -float(clock.index)
        dt = 0.0 if last.t is None else abs(t_now - last.t)
        last.t = t_now
        self.runs[-1].calls += 1
        return StepInfo(clock.index, t_now, dt, clock.t_first, self.policy.scale(t_now, dt)), branch

    @traced_around
    def _run_blocks(self, which: range, stream: list[torch.Tensor], inputs: Sequence[torch.Tensor],
                    residuals: list[Residual]) -> list[torch.Tensor]:
        """Run blocks ``which`` on ``stream``, appending each block's residual to ``residuals``; each block
        compiles alone under ``torch.compile`` (the residuals are taken host-side between them)."""
        for b in which:
            out = self._block(b, stream, inputs)
            residuals.append(_minus(out, stream))
            stream = out
        return stream

    def _run_span(self, span: str, stream: list[torch.Tensor], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run the blocks of ``self.spans[span]`` on ``stream``, recording nothing. Not skipped by Dynamo: under
        ``torch.compile`` the range is one frame, so its blocks compile into one graph, fused across their
        boundaries, with one guard check instead of one per block (the span's blocks one frame each had
        inductor cut a cached image-DiT run by 15 %, against 31 % for the uncached model)."""
        for b in self.spans[span]:
            stream = self._block(b, stream, inputs)
        return stream

    def _block(self, b: int, stream: list[torch.Tensor], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Block ``b`` on ``stream``: its outputs that carry the streams."""
        out = self.blocks[b](*self._args(b, stream, inputs))
        return [out[j] for j in self.slots[b]] if isinstance(out, (tuple, list)) else [out]

    def _args(self, b: int, stream: list[torch.Tensor], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Block ``b``'s arguments. A loop, not a comprehension: in Python 3.11 that is a frame of its own,
        which Dynamo, entering it from a skipped frame, compiles alone and breaks on."""
        args = []
        for kind, k in self.wiring[b]:
            args.append(stream[k] if kind == "stream" else inputs[k])
        return args

    @traced_around
    def _per_block(self, step: StepInfo, branch: str, stream: list[torch.Tensor],
                   inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        blocks, batch = self.cached, stream[0].shape[0]
        memory: BlockMemory = self.state[0].keep(
            f"{branch}/blocks", lambda: BlockMemory([None] * blocks, [0] * blocks, [0.0] * blocks))
        counts = self.runs[-1]
        for b, reuse in enumerate(self._block_schedule(step, memory)):
            if reuse:
                stream = _plus(stream, memory.residual[b])
                counts.skipped += batch
                continue
            residuals: list[Residual] = []
            stream = self._run_blocks(range(b, b + 1), stream, inputs, residuals)
            memory.residual[b] = residuals[0]
            counts.evaluated += batch
        return stream

    @host_side
    def _block_schedule(self, step: StepInfo, memory: BlockMemory) -> list[bool]:
        """Which blocks reuse at ``step``: per-block policies read no data, so every block is decided at once,
        on the host, and its reuse count and error estimate move on."""
        policy, blocks = self.policy, self.cached
        assert isinstance(policy, PerBlockPolicy)
        schedule = []
        for b in range(blocks):
            error = memory.error[b] + policy.block_error(b, step.t) * step.dt
            reuse = memory.residual[b] is not None and policy.reuse(step, b, blocks, memory.reuses[b], error)
            memory.reuses[b], memory.error[b] = (memory.reuses[b] + 1, error) if reuse else (0, 0.0)
            schedule.append(reuse)
        return schedule

    @traced_around
    def _span(self, step: StepInfo, branch: str, stream: list[torch.Tensor],
              inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        policy, batch, middle = self.policy, stream[0].shape[0], self.spans["middle"]
        recording = self.recorder is not None
        memory: SpanMemory = self.state[0].keep(f"{branch}/span", SpanMemory)
        counts = self.runs[-1]
        span_input = stream
        residuals: list[Residual] = []  # per block: only calibration reads them

        def run(span: str, stream: list[torch.Tensor]) -> list[torch.Tensor]:
            if recording:
                return self._run_blocks(self.spans[span], stream, inputs, residuals)
            return self._run_span(span, stream, inputs) if self.spans[span] else stream

        stream = run("front", stream)
        front_residual = _minus(stream, span_input)
        decision = False if recording else self._decide(step, memory, front_residual, span_input)
        keep = getattr(policy, "order", 0) + 1
        if decision is True:
            stream = _plus(stream, policy.estimate(step, memory))  # type: ignore[attr-defined]
            memory.reuses = memory.reuses + 1
            counts.skipped += batch * len(middle)
        elif decision is False:
            middle_input = stream
            stream = run("middle", stream)
            counts.evaluated += batch * len(middle)
            if not recording:
                memory.remember(step.t, _minus(stream, middle_input), keep)
                memory.reference = front_residual
                memory.reuses, memory.gamma, memory.error = 0, 1.0, 0.0
        else:  # some samples reuse: each gets what it would get alone
            rows = torch.tensor(decision, device=stream[0].device)
            estimate = policy.estimate(step, memory)  # type: ignore[attr-defined]
            computing = [k for k, reuse in enumerate(decision) if not reuse]
            kept = self._computed_rows(stream, inputs, rows, computing, estimate)
            counts.evaluated += len(computing) * len(middle)
            counts.skipped += (batch - len(computing)) * len(middle)
            stream = _plus(stream, kept)
            memory.remember(step.t, kept, keep, reused=rows)
            if memory.reference is not None:
                memory.reference = [where_rows(rows, r, f) for r, f in zip(memory.reference, front_residual)]
            memory.reuses = torch.where(rows, torch.as_tensor(memory.reuses) + 1, 0)
        stream = run("back", stream)
        counts.evaluated += batch * (len(self.spans["front"]) + len(self.spans["back"]))
        if self.recorder is not None:
            self.recorder.record(branch, step, span_input, residuals, _minus(stream, span_input))
        return stream

    @traced_around
    def _computed_rows(self, stream: list[torch.Tensor], inputs: Sequence[torch.Tensor],
                       rows: torch.Tensor, computing: list[int], estimate: Residual) -> Residual:
        """The middle's residual per sample: the estimate where ``rows`` reuse, computed elsewhere. With the
        batched inputs known only the computing samples run the blocks; otherwise every sample runs."""
        if not self.batched:
            computed = _minus(self._run_span("middle", stream, inputs), stream)
            return [where_rows(rows, e, c) for e, c in zip(estimate, computed)]
        index = torch.tensor(computing, device=rows.device)
        part = [x.index_select(0, index) for x in stream]
        part_inputs = [x.index_select(0, index) if k in self.batched else x for k, x in enumerate(inputs)]
        computed = _minus(self._run_span("middle", part, part_inputs), part)
        return [e.index_copy(0, index, c) for e, c in zip(estimate, computed)]

    @host_side
    def _decide(self, step: StepInfo, memory: SpanMemory, front_residual: Residual,
                span_input: Residual) -> list[bool] | bool:
        """True (every sample reuses), False (none does), or per sample whether it reuses."""
        policy = self.policy
        assert isinstance(policy, SpanPolicy)
        signal = {"front": front_residual, "input": span_input}.get(policy.signal)
        reuse = policy.decide(step, memory, signal)
        if not isinstance(reuse, torch.Tensor):
            return bool(reuse)
        mask = reuse.tolist()  # the call's one host sync
        return True if all(mask) else (mask if any(mask) else False)


@host_side
def _minus(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> Residual:
    return [x - y for x, y in zip(a, b)]


@host_side
def _plus(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x + y for x, y in zip(a, b)]
