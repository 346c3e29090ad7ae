"""Lowering: each region of the graph runs on the backend the cost models pick for it.

``LowerRegions`` partitions the graph into regions that compiling backends
support (fusion groups kept whole), asks the cost models what each candidate
backend would cost per call, counts compile time against the expected number
of calls, compiles the winner and replaces the region by one ``kernel_call``
node. Nodes no region takes stay as they are and run eagerly. Every decision
(candidates, predictions, measurements, the choice and why) is kept in
``graph.meta["lowering"]``: what ``graphopt explain`` prints. A region
decided once is not decided again when a fixed-point pipeline reruns the pass.
"""
from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from graphopt.ir import Graph, TensorType
from graphopt.testing import max_rel_error
from graphopt.pass_manager import PIPELINES, Pass, PassKind, PassResult, register_pass, register_pipeline

from .base import BACKENDS, QUICK_COMPILE_SECONDS, Backend, CompiledRegion, Kernel, random_inputs
from .region import Region, partition

logger = logging.getLogger(__name__)

COST_MODELS = ("measured", "analytical", "learned")
DEFAULT_BACKENDS = ("onnxruntime", "inductor", "triton", "torch")
"""TVM is a candidate only when named: untuned (its default) it lost every region it was timed on here, 20-45x
slower than onnxruntime on the convnets' regions, after 4-6 s of compiling each; tuned it takes minutes."""
SHAPE_ONLY = frozenset({"shape", "data"})
"""Op categories that compute nothing (views, reshapes, constants): a region of only these is not worth a call."""


@dataclass
class Candidate:
    """One backend's case for one region."""

    backend: str
    status: str = "ok"
    """``ok``; or why it was not in the running: ``unavailable``, ``unsupported``, ``forbidden``, ``pruned``
    (never compiled: the learned model predicts it far slower than another), ``over_budget`` (never
    compiled: its compile would not fit in what is left of ``compile_budget_s``), ``failed``."""
    reason: str = ""
    predicted: dict[str, float] = field(default_factory=dict)
    """Seconds per call, by cost model name."""
    measured: float | None = None
    spread: float | None = None
    compile_seconds: float | None = None
    max_error: float | None = None


@dataclass
class Decision:
    """What was chosen for one region, among which candidates, by which cost model."""

    region: int
    hash: str
    nodes: int
    ops: dict[str, int]
    flops: int
    candidates: list[Candidate]
    chosen: str | None
    cost_model: str
    note: str = ""
    seconds: float = 0.0
    """Wall time spent deciding (predicting, compiling, timing, checking the winner)."""


@register_pass
@dataclass
class LowerRegions(Pass):
    """Lower each supported region to the backend with the lowest predicted cost (no change to the math).

    Partitioning as in TVM's BYOC flow (Chen et al. 2021, "Bring Your Own
    Codegen to Deep Learning Compiler", MLSys) and selection by cost models
    as in TVM's AutoTVM/Ansor (Chen et al. 2018, "Learning to Optimize Tensor
    Programs", NeurIPS), applied to whole backends: each candidate's cost is
    its predicted seconds per call plus its compile (and tuning) seconds
    spread over ``expected_calls``. ``cost_model`` is ``measured`` (compile
    and time every candidate once; records are cached by structural hash,
    device and library versions), ``analytical`` (roofline) or ``learned``
    (trained on the timing database). Measuring, candidates the learned model
    (when one is trained) predicts ``prune_factor`` times slower than the
    fastest are neither compiled nor timed; the others are compiled first,
    then timed in turns, the quickest to compile first. ``compile_budget_s`` bounds
    the wall time one run spends on this: a candidate whose expected compile time
    (its earlier compiles here, else its backend's ``compile_seconds``) does not fit
    in what is left is not compiled, and once the budget is spent the remaining
    regions are not measured: each goes to the backend the learned model (else the
    analytical one) predicts fastest among those that compile in about a second
    (onnxruntime, torch). ``force`` picks one backend wherever it supports a
    region; ``forbid`` removes backends. A chosen kernel is checked against
    eager on random inputs (``check``) and dropped if it differs.
    """

    name = "lower_regions"
    kind = PassKind.EXACT
    requires = ("fusion_groups",)  # regions keep fusion groups whole

    backends: tuple[str, ...] = DEFAULT_BACKENDS
    cost_model: str = "measured"
    expected_calls: int = 1000
    force: str | None = None
    forbid: tuple[str, ...] = ()
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str | None = None
    """Where the kernels run; default: where the graph's inputs were captured (``graph.meta["device"]``)."""
    check: bool = True
    tolerance: float = 1e-3
    """Largest relative difference from eager a kernel may show (raised for half-precision outputs)."""
    repeats: int = 10
    prune_factor: float | None = 2.0
    """Leave-one-model-out on 858 CPU timings of 12 models (``benchmarks/cost_model_accuracy.py``), a
    factor of 2 skips a quarter of the candidates and the fastest one in 0-3 of 286 regions, depending
    on the run; None measures every candidate."""
    source: str = ""
    """A label stored with the timings (the model's name), so a learned model can hold out whole models."""
    compile_budget_s: float | None = 20.0
    """Seconds one run may spend compiling and timing candidates (None: no limit). On this 2-core CPU
    inductor took 5-35 s per region (up to minutes with other jobs running), so by default it is not
    compiled and regions go to onnxruntime or torch: measured with inductor too, every region of the
    CPU zoo went to onnxruntime anyway (``benchmarks/results/lowering_compare*.md``); with every
    candidate (TVM too), ResNet-18's one region took 72 s to decide."""

    def __post_init__(self) -> None:
        """Bad options fail when the pass is made (a torch.compile option, an explain flag), naming the first."""
        unknown = sorted({*self.backends, *self.forbid, *([self.force] if self.force else [])} - set(_known()))
        if unknown:
            raise ValueError(f"unknown backend {', '.join(unknown)}; known backends: {', '.join(_known())}")
        if self.cost_model not in COST_MODELS:
            raise ValueError(f"unknown cost_model {self.cost_model!r}; choose one of {', '.join(COST_MODELS)}")
        if self.force and self.force not in self.backends:
            raise ValueError(f"force={self.force!r} is not among backends={list(self.backends)}")
        if self.expected_calls < 1:
            raise ValueError(f"expected_calls must be at least 1, got {self.expected_calls}")
        if self.prune_factor is not None and not self.prune_factor >= 1:
            raise ValueError(f"prune_factor must be at least 1 (or None), got {self.prune_factor}")
        if self.compile_budget_s is not None and not self.compile_budget_s > 0:
            raise ValueError(f"compile_budget_s must be positive seconds (or None for no limit), "
                             f"got {self.compile_budget_s}")

    def call(self, graph: Graph) -> PassResult:
        from . import load_builtin_backends

        load_builtin_backends()
        deadline = None if self.compile_budget_s is None else time.perf_counter() + self.compile_budget_s
        device = torch.device(self.device) if self.device else _device_of(graph)
        backends = {name: BACKENDS[name](**self.backend_options.get(name, {})) for name in self.backends}
        compilers = [b for name, b in backends.items() if name != "torch"]
        regions = partition(graph, lambda n: n.op != "kernel_call" and any(b.supports(n) for b in compilers))
        decided: list[Decision] = graph.meta.setdefault("lowering", [])
        seen = {d.hash for d in decided}
        decisions, lowered = [], 0
        estimator = None  # loads the timing database and the learned model: only when a region needs them
        for region in regions:
            if not worth_lowering(region) or region.hash in seen:  # decided on an earlier run: left to eager
                continue
            estimator = estimator or _Estimator(self, device, deadline)
            start = time.perf_counter()
            decision, kernel = self._decide(region, backends, device, estimator)
            decision.seconds = time.perf_counter() - start
            decisions.append(decision)
            if kernel is not None and decision.chosen != "torch":
                _replace(graph, region, kernel, decision.chosen)
                lowered += 1
        graph.remove_unused_constants()
        decided.extend(decisions)
        return PassResult(graph, lowered > 0, {"regions": len(decisions), "lowered": lowered})

    def _decide(self, region: Region, backends: dict[str, Backend], device: torch.device,
                estimator: _Estimator) -> tuple[Decision, Kernel | None]:
        candidates = [self._candidate(region, name, backend, device, estimator) for name, backend in backends.items()]
        cost_model, note = self.cost_model, ""
        if cost_model == "measured" and estimator.seconds_left() <= 0:
            cost_model = "learned" if estimator.learned is not None else "analytical"
            note = (f"compile budget of {self.compile_budget_s:g} s spent: chosen by the {cost_model} model "
                    f"among quick-to-compile backends, not measured")
            for c in candidates:
                slow = backends[c.backend].compile_seconds > QUICK_COMPILE_SECONDS
                if c.status == "ok" and c.backend != self.force and slow:
                    c.status, c.reason = "over_budget", note.split(":")[0]
        elif cost_model == "measured":
            self._prune(candidates)
            estimator.measure(region, [c for c in candidates if c.status == "ok" and c.measured is None], backends)
        decision = Decision(region.index, region.hash, len(region.nodes), region.graph.op_counts(), region.flops,
                            candidates, None, cost_model, note)

        def cost(c: Candidate) -> float | None:
            seconds = c.measured if cost_model == "measured" else c.predicted.get(cost_model)
            return None if seconds is None else seconds + (c.compile_seconds or 0.0) / self.expected_calls

        for _ in candidates:  # the best candidate whose kernel fails is marked failed; rank the rest again
            ranked = sorted((c for c in candidates if c.status == "ok" and cost(c) is not None), key=cost)
            forced = [c for c in candidates if c.backend == self.force and c.status == "ok"]
            ranked = forced + [c for c in ranked if c not in forced]
            if not ranked:
                decision.note = "; ".join(filter(None, [note, "no candidate has an estimate; the region stays eager"]))
                return decision, None
            best = ranked[0]
            kernel = estimator.kernel(region, best, backends[best.backend])
            if kernel is not None:
                decision.chosen = best.backend
                return decision, kernel
        return decision, None

    def _candidate(self, region: Region, name: str, backend: Backend, device: torch.device,
                   estimator: _Estimator) -> Candidate:
        candidate = Candidate(name)
        if name in self.forbid:
            candidate.status, candidate.reason = "forbidden", "forbidden by the forbid option"
        elif (reason := backend.unavailable(device)) is not None:
            candidate.status, candidate.reason = "unavailable", reason
        elif not all(backend.supports(n) for n in region.graph.nodes):
            missing = sorted({n.op for n in region.graph.nodes if not backend.supports(n)})
            candidate.status, candidate.reason = "unsupported", "unsupported ops: " + ", ".join(missing[:5])
        else:
            estimator.predict(region, candidate)
        return candidate

    def _prune(self, candidates: list[Candidate]) -> None:
        """Take out the untimed candidates the learned model predicts ``prune_factor`` times slower than the
        fastest (the forced backend stays)."""
        predicted = {c.backend: c.predicted["learned"] for c in candidates if c.status == "ok" and "learned" in c.predicted}
        if self.prune_factor is None or len(predicted) < 2:
            return
        fastest = min(predicted.values())
        for c in candidates:
            if c.backend in predicted and c.measured is None and c.backend != self.force \
                    and predicted[c.backend] > self.prune_factor * fastest:
                c.status = "pruned"
                c.reason = f"learned model predicts {predicted[c.backend] / fastest:.1f}x the fastest candidate's time"


class _Estimator:
    """Predictions and measurements for one lowering run; compiled kernels are kept for the winner."""

    def __init__(self, options: LowerRegions, device: torch.device, deadline: float | None = None):
        from graphopt.cost_models.analytical import AnalyticalCostModel
        from graphopt.cost_models.database import TimingDatabase
        from graphopt.cost_models.learned import LearnedCostModel

        self.options = options
        self.device = device
        self.deadline = deadline
        self.compiled_seconds: dict[str, float] = {}
        """The longest compile of each backend in this run."""
        self.database = TimingDatabase()
        self.analytical = AnalyticalCostModel()
        try:
            self.learned: LearnedCostModel | None = LearnedCostModel.load()
        except (OSError, ValueError, TypeError, pickle.UnpicklingError):  # none trained yet, or another version's
            self.learned = None
        self.kernels: dict[tuple[str, str], Kernel] = {}

    def predict(self, region: Region, c: Candidate) -> None:
        """The cost models' predictions, and the timing recorded earlier if there is one."""
        from graphopt.cost_models.database import device_key

        for model in (self.analytical, self.learned):
            if model is not None and (seconds := model.predict(region, c.backend, self.device)) is not None:
                c.predicted[model.name] = seconds
        record = self.database.lookup(region.hash, self.record_name(c.backend), device_key(self.device))
        if record is not None:
            c.measured, c.spread, c.compile_seconds = record.seconds, record.spread, record.compile_seconds
        else:
            c.compile_seconds = self._typical_compile_seconds(self.record_name(c.backend))

    def record_name(self, backend: str) -> str:
        """The backend's name in the timing database, with its options (``tvm[tune_trials=64]``): timings of
        differently configured backends must not stand in for each other."""
        options = self.options.backend_options.get(backend)
        return backend if not options else f"{backend}[{','.join(f'{k}={v}' for k, v in sorted(options.items()))}]"

    def seconds_left(self) -> float:
        """What is left of the compile budget (infinite without one)."""
        return float("inf") if self.deadline is None else self.deadline - time.perf_counter()

    def expected_compile_seconds(self, c: Candidate, backend: Backend) -> float:
        """This run's longest compile of the backend, else the one recorded for the region (or the backend's
        median) here, else the backend's own guess."""
        return self.compiled_seconds.get(c.backend) or c.compile_seconds or backend.compile_seconds

    def measure(self, region: Region, candidates: list[Candidate], backends: dict[str, Backend]) -> None:
        """Compile the candidates, the quickest first, as long as each fits in the budget (the forced one
        always), then time them in turns (the records go to the database)."""
        from graphopt.cost_models.measured import measure_in_turns

        compiled = {}
        for c in sorted(candidates, key=lambda c: self.expected_compile_seconds(c, backends[c.backend])):
            expected = self.expected_compile_seconds(c, backends[c.backend])
            if c.backend != self.options.force and expected > self.seconds_left():
                c.status = "over_budget"
                c.reason = (f"an expected {expected:.1f} s compile does not fit in what is left of the "
                            f"{self.options.compile_budget_s:g} s compile budget")
            elif (kernel := self._compile(region, c, backends[c.backend])) is not None:
                compiled[self.record_name(c.backend)] = c, kernel
        if not compiled:
            return
        kernels = {name: (kernel, c.compile_seconds or 0.0) for name, (c, kernel) in compiled.items()}
        records = measure_in_turns(region, kernels, random_inputs(region, self.device), self.options.source,
                                   database=self.database, repeats=self.options.repeats)
        for name, (c, _) in compiled.items():
            c.measured, c.spread = records[name].seconds, records[name].spread

    def kernel(self, region: Region, c: Candidate, backend: Backend) -> Kernel | None:
        """The candidate's compiled kernel, checked against eager; None (and the candidate failed) if not."""
        kernel = self.kernels.get((region.hash, c.backend)) or self._compile(region, c, backend)
        if kernel is None or not self.options.check or c.backend == "torch":
            return kernel
        inputs = random_inputs(region, self.device, seed=1)
        with torch.no_grad():
            expected = region.graph.to_torch().to(self.device)(*inputs)
            got = kernel(*inputs)
        try:
            c.max_error = max_rel_error(expected, got)
        except AssertionError:  # another number or shape of outputs
            c.max_error = float("inf")
        limit = max([self.options.tolerance, *(_ROUNDING.get(e.dtype, 0.0) for e in expected)])
        if not c.max_error <= limit:
            c.status, c.reason = "failed", f"output differs from eager by {c.max_error:.2e} (relative)"
            return None
        return kernel

    def _compile(self, region: Region, c: Candidate, backend: Backend) -> Kernel | None:
        start = time.perf_counter()
        try:
            kernel = backend.compile(region, self.device)
        except Exception as exc:  # a backend failing on a region leaves the others in the running
            c.status, c.reason = "failed", f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            logger.info("%s could not compile region %d: %s", c.backend, region.index, c.reason)
            return None
        c.compile_seconds = time.perf_counter() - start
        self.compiled_seconds[c.backend] = max(c.compile_seconds, self.compiled_seconds.get(c.backend, 0.0))
        self.kernels[(region.hash, c.backend)] = kernel
        return kernel

    def _typical_compile_seconds(self, backend: str) -> float:
        """Median compile seconds recorded for this backend, 0 when it was never measured."""
        seconds = sorted(r.compile_seconds for r in self.database if r.backend == backend)
        return seconds[len(seconds) // 2] if seconds else 0.0


def _known() -> list[str]:
    from . import load_builtin_backends

    load_builtin_backends()
    return sorted(BACKENDS)


def _device_of(graph: Graph) -> torch.device:
    """Where the graph runs: the device its inputs were captured on, else its weights', else the CPU."""
    if "device" in graph.meta:
        return torch.device(graph.meta["device"])
    return next((v.data.device for v in graph.constants.values() if v.is_parameter), torch.device("cpu"))


def worth_lowering(region: Region) -> bool:
    """Regions that compute something, on static tensors (compiled kernels have fixed signatures)."""
    if all(n.opdef.category in SHAPE_ONLY for n in region.graph.nodes):
        return False
    values = [*region.graph.inputs, *region.graph.outputs]
    return all(isinstance(v.type, TensorType) and v.type.is_static for v in values)


def _replace(graph: Graph, region: Region, kernel: Kernel, backend: str) -> None:
    """One ``kernel_call`` node in place of the region's nodes."""
    module = CompiledRegion(kernel, backend, region.hash)
    call = graph.add_node("kernel_call", region.inputs, {"kernel": module, "num_outputs": len(region.outputs)},
                          output_types=[v.type for v in region.outputs], name=f"region{region.index}_{backend}",
                          meta={"backend": backend, "region_hash": region.hash})
    for old, new in zip(region.outputs, call.outputs):
        old.replace_all_uses_with(new)
    for node in reversed(region.nodes):
        graph.remove_node(node)
    graph.sort()


_ROUNDING = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
"""Errors a few roundings of a half-precision result reach: a correct kernel that rounds in
another order than eager differs by this much, so the check accepts it."""


register_pipeline("O3", [*PIPELINES["O2"], "lower_regions"])
