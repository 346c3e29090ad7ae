"""graphopt in diffusers pipelines: ``optimize(pipe, step_cache=..., quality=...)`` and ``restore(pipe)``.

The one adapter over diffusers' pipeline conventions. ``optimize`` routes
``pipe.transformer``'s calls through graphs captured per input signature
(shapes, dtypes, non-tensor arguments), each rewritten by the ``step_cache``
pass and emitted as a torch module that keeps its own cache memory; the
scheduler's ``set_timesteps`` (called at the start of every sampling run)
resets that memory. ``restore`` puts the transformer and scheduler back as
they were.

With ``step_cache="auto"`` (or a policy name) and ``quality={"psnr": 30}``,
a few calibration samples (``calibration={...pipeline arguments, "seed": 0}``)
choose the policy and its setting (``passes/step_cache/calibrate.py``); the
plan (``pipe.graphopt.plan``) can be saved and given back as ``step_cache``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._torch_private import traced_around
from .errors import InvalidOptionError

logger = logging.getLogger(__name__)

ATTRIBUTE = "graphopt"


def optimize(pipe: Any, step_cache: str | Mapping[str, Any] | Path | Any = None, quality: Mapping[str, float] | None = None,
             calibration: Mapping[str, Any] | None = None, progress: bool = True,
             sparse_attention: float | str | Mapping[str, Any] | None = None) -> Any:
    """Install step caching and/or sparse attention on ``pipe.transformer`` (in place) and return ``pipe``.

    ``step_cache``: a policy name (``fora``, ``delta_dit``, ``first_block``, ``teacache``,
    ``magcache``, ``taylorseer``, ``dbcache``, ``smoothcache``), ``"auto"``, a dict of a
    policy and its options, or a saved plan (a ``Plan``, its JSON dict, or a path).
    ``quality`` calibrates a name or ``"auto"`` to a budget on ``calibration``'s samples.

    ``sparse_attention``: a density in (0, 1], the ``sparse_video_attention`` pass's options
    (``{"density": 0.25, "budget": 0.05, "dense_steps": 10, ...}``), or ``"auto"`` with ``quality``:
    the video self-attention runs head-kind sparse (Sparse VideoGen), profiled online per head and
    CFG branch. Both ``"auto"`` calibrate together under the one budget (``sparse_attention.calibrate``).
    """
    from graphopt.passes.step_cache.calibrate import check_quality

    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise InvalidOptionError(f"graphopt.diffusers.optimize needs a pipeline with a transformer denoiser "
                                 f"(pipe.transformer); {type(pipe).__name__} has none")
    if step_cache is None and sparse_attention is None:
        raise InvalidOptionError("graphopt.diffusers.optimize: say what to do, e.g. step_cache='fora', "
                                 "step_cache='auto', quality={'psnr': 30}, or sparse_attention=0.25")
    plan = _as_plan(step_cache) or _as_plan(sparse_attention)
    auto_sparse = sparse_attention == "auto"
    if auto_sparse and quality is None:
        raise InvalidOptionError("sparse_attention='auto' calibrates to a budget: give quality={'psnr': 30} "
                                 "and calibration={...pipeline arguments}")
    if plan is not None:
        _check_fingerprint(plan.fingerprint, pipe)
        sparse = plan.sparse
        spec = None if plan.curves is None else {**plan.spec, "curves": plan.curves.to_json()}
    else:
        sparse = {} if auto_sparse else _sparse_options(sparse_attention)
        if step_cache is None:
            spec = None
        elif quality is not None:
            check_quality(quality)
            if not isinstance(step_cache, str):
                raise InvalidOptionError("with quality=..., step_cache is 'auto' or one policy name to calibrate")
            spec = {"policy": "none"}
        elif step_cache == "auto":
            raise InvalidOptionError("step_cache='auto' calibrates to a budget: give quality={'psnr': 30} "
                                     "(or 'ssim', 'rel_error') and calibration={...pipeline arguments}")
        else:
            spec = {"policy": step_cache} if isinstance(step_cache, str) else dict(step_cache)
            _check_spec(spec)
    if quality is not None:
        check_quality(quality)
    installed = getattr(pipe, ATTRIBUTE, None)
    if installed is not None and installed.transformer is transformer and installed.serves(spec, sparse):
        installed.set_policy(spec)  # the graphs captured so far serve the new policy
        installed.set_sparse(sparse)
    else:
        restore(pipe)
        installed = Installed.install(pipe, spec, sparse)
    installed.plan = plan
    if plan is None and quality is not None and (spec is not None or auto_sparse):
        caching = step_cache if spec is not None else None
        try:
            installed.plan = _calibrate(pipe, installed, caching, auto_sparse, quality, calibration, progress)
        except BaseException:
            restore(pipe)
            raise
        chosen = installed.plan
        if chosen.curves is not None:
            installed.set_policy({**chosen.spec, "curves": chosen.curves.to_json()})
        installed.set_sparse(chosen.sparse)
    return pipe


def _sparse_options(sparse_attention: Any) -> dict[str, Any] | None:
    """The ``sparse_video_attention`` pass's options from a density or a dict of them, checked."""
    from graphopt.pass_manager import get_pass, instantiate

    if sparse_attention is None:
        return None
    if isinstance(sparse_attention, (int, float)) and not isinstance(sparse_attention, bool):
        options = {"density": float(sparse_attention)}
    elif isinstance(sparse_attention, Mapping):
        options = dict(sparse_attention)
    else:
        raise InvalidOptionError(f"sparse_attention is a density in (0, 1] or a dict of the sparse_video_attention "
                                 f"pass's options, got {sparse_attention!r}")
    instantiate(get_pass("sparse_video_attention"), options)._check_options()
    return options


def restore(pipe: Any) -> Any:
    """Undo ``optimize``: the transformer and scheduler run as before it."""
    installed: Installed | None = getattr(pipe, ATTRIBUTE, None)
    if installed is not None:
        installed.uninstall(pipe)
    return pipe


def report(pipe: Any) -> dict[str, Any]:
    """Per captured input signature: the policy and the block evaluations skipped per sampling run."""
    installed: Installed | None = getattr(pipe, ATTRIBUTE, None)
    if installed is None:
        raise InvalidOptionError("this pipeline has no graphopt optimization; call graphopt.diffusers.optimize")
    policy = None if installed.spec is None else {k: v for k, v in installed.spec.items() if k != "curves"}
    return {"policy": policy, "graphs": [c.report() for c in installed.denoiser.step_caches()],
            "sparse_attention": installed.denoiser.sparse_report()}


# -------------------------------------------------------------- installation
@dataclass
class Installed:
    """What ``optimize`` changed on a pipeline, so ``restore`` can undo it."""

    transformer: torch.nn.Module
    scheduler: Any
    denoiser: CachedDenoiser
    spec: dict[str, Any] | None
    plan: Any = None

    @classmethod
    def install(cls, pipe: Any, spec: dict[str, Any] | None, sparse: dict[str, Any] | None = None) -> Installed:
        transformer = pipe.transformer
        denoiser = CachedDenoiser(transformer, spec, sparse)
        transformer.forward = denoiser
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is not None and hasattr(scheduler, "set_timesteps"):
            original = scheduler.set_timesteps

            def set_timesteps(*args: Any, **kwargs: Any) -> Any:
                denoiser.new_run()
                return original(*args, **kwargs)

            scheduler.set_timesteps = set_timesteps
        installed = cls(transformer, scheduler, denoiser, spec)
        setattr(pipe, ATTRIBUTE, installed)
        return installed

    def uninstall(self, pipe: Any) -> None:
        if "forward" in vars(self.transformer):
            del self.transformer.forward
        if self.scheduler is not None and "set_timesteps" in vars(self.scheduler):
            del self.scheduler.set_timesteps
        setattr(pipe, ATTRIBUTE, None)

    def set_policy(self, spec: dict[str, Any] | None) -> None:
        self.spec = spec
        if spec is not None:
            self.denoiser.set_policy(spec)

    def serves(self, spec: dict[str, Any] | None, sparse: dict[str, Any] | None) -> bool:
        """Whether the graphs captured so far have the passes asked for, and sparse options of the same
        structure (a new grid or dense layers rewrite the graph again)."""
        d = self.denoiser
        structural = ("video_shape", "text_tokens", "text_position", "dense_layers")
        return ((spec is None) == (d.spec is None) and (sparse is None) == (d.sparse is None)
                and all((sparse or {}).get(k) == (d.sparse or {}).get(k) for k in structural))

    def set_sparse(self, sparse: dict[str, Any] | None) -> None:
        self.denoiser.set_sparse(sparse)


def _capture_batched(model: torch.nn.Module, tensors: tuple[torch.Tensor, ...]) -> Any:
    """The denoiser's graph with its batch dim symbolic where export finds one (so the samples of a batch
    that recompute can run alone), else static: the batch is the first dim of the first tensor argument, and
    export tells which other arguments share it (64 rotary rows beside 64 samples do not)."""
    from graphopt.api import capture
    from graphopt.errors import GraphoptError

    batch = tensors[0].shape[0] if tensors and tensors[0].dim() else None
    dynamic = {k: {0: "batch?"} for k, x in enumerate(tensors) if x.dim() and x.shape[0] == batch}
    if batch is not None and batch > 1:
        try:
            return capture(model, tensors, dynamic=dynamic)
        except (GraphoptError, RuntimeError, ValueError) as e:
            logger.info("graphopt.diffusers: symbolic-batch capture failed (%s); capturing static shapes",
                        str(e).splitlines()[0][:200])
    return capture(model, tensors)


class CachedDenoiser:
    """Stands in for ``transformer.forward``: each input signature is captured once into the IR, cleaned up
    (``O1``), the ``sparse_video_attention`` and ``step_cache`` passes run (those asked for), and the emitted
    module serves the calls."""

    def __init__(self, transformer: torch.nn.Module, spec: dict[str, Any] | None, sparse: dict[str, Any] | None = None):
        self.transformer = transformer
        self.original = type(transformer).forward.__get__(transformer)
        self.signature = inspect.signature(self.original)
        self.spec = spec
        self.sparse = sparse
        self.modules: dict[Any, torch.nn.Module] = {}

    @traced_around
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        tensors = {k: v for k, v in bound.arguments.items() if isinstance(v, torch.Tensor)}
        fixed = {k: v for k, v in bound.arguments.items()
                 if not isinstance(v, torch.Tensor) and v is not None and k != "return_dict"}
        return_dict = bound.arguments.get("return_dict", True)
        key = (tuple((k, tuple(v.shape), v.dtype) for k, v in tensors.items()), repr(sorted(fixed.items())))
        module = self.modules.get(key)
        if module is None:
            module = self.modules[key] = self._capture(tensors, fixed)
        out = module(*tensors.values())
        sample = out[0] if isinstance(out, (tuple, list)) else out
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)

    def _capture(self, tensors: dict[str, torch.Tensor], fixed: dict[str, Any]) -> torch.nn.Module:
        from graphopt.api import optimize as optimize_graph
        from graphopt.models import KwargsWrapper

        wrapper = KwargsWrapper(self.transformer, tuple(tensors), {**fixed, "return_dict": False})
        forward = self.transformer.__dict__.pop("forward")
        try:
            with torch.no_grad():
                graph = _capture_batched(wrapper, tuple(tensors.values()))
        finally:
            self.transformer.forward = forward
        passes, options = [], {}
        if self.sparse is not None:
            passes.append("sparse_video_attention")
            options["sparse_video_attention"] = self.sparse
        if self.spec is not None:
            passes.append("step_cache")
            options["step_cache"] = {"policy": self.spec}
        optimize_graph(graph, level="O1", passes=passes, options=options, verify=False)
        return graph.to_torch()

    def sparse_attentions(self) -> list[Any]:
        from graphopt.passes.sparse_attention.runtime import SparseVideoAttention

        return [m for module in self.modules.values() for m in module.modules() if isinstance(m, SparseVideoAttention)]

    def set_sparse(self, sparse: dict[str, Any] | None) -> None:
        """New runtime options (density, budget, steps) for the sparse attentions captured so far."""
        from graphopt.passes.sparse_attention.runtime import Settings

        self.sparse = sparse
        runtime = {k: v for k, v in (sparse or {}).items() if k in Settings.__dataclass_fields__}
        for attention in self.sparse_attentions():
            attention.set_options(**runtime)

    def attention_kept(self) -> float:
        """The share of the sparse attentions' dense FLOPs computed since the last reset (1.0 with none)."""
        works = [a.work() for a in self.sparse_attentions()]
        dense = sum(w[0] for w in works)
        return sum(w[1] for w in works) / dense if dense else 1.0

    def time_attention(self, on: bool) -> None:
        """Time each call of the sparse attentions (calibration's time model) or stop."""
        for attention in self.sparse_attentions():
            attention.timing = on

    def attention_timed(self) -> tuple[list[float], list[int]]:
        """The sparse attentions' timed seconds and calls since the last reset, each ``[run dense, the rest]``."""
        seconds, calls = [0.0, 0.0], [0, 0]
        for attention in self.sparse_attentions():
            s, n = attention.timed()
            seconds, calls = [a + b for a, b in zip(seconds, s)], [a + b for a, b in zip(calls, n)]
        return seconds, calls

    def attention_share(self, run: Any) -> tuple[Any, float]:
        """``run()``'s result, and the share of the denoiser's FLOPs in that run that its sparse attentions
        would spend dense: their own count over torch's count of everything else (FLOP counters do not see
        every attention kernel, so attention is counted here)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            result = run()
        attention = sum(a.work()[0] for a in self.sparse_attentions())
        other = sum(n for op, n in counter.get_flop_counts().get("Global", {}).items()
                    if "scaled_dot_product" not in str(op))
        return result, attention / (attention + other) if attention else 0.0

    def sparse_report(self) -> list[dict[str, Any]]:
        """Per sparse attention: its settings, the head kinds of its profiles and the calls each kernel ran."""
        reports = []
        for attention in self.sparse_attentions():
            s = attention.settings
            reports.append({"grid": (s.grid.frames, s.grid.height, s.grid.width), "text": s.grid.text,
                            "density": s.bands[0].density(s.grid.video), **attention.head_counts(),
                            "kernels": attention.kernel_calls()})
        return reports

    def step_caches(self) -> list[Any]:
        from graphopt.passes.step_cache.runtime import StepCache

        return [m for module in self.modules.values() for m in module.modules() if isinstance(m, StepCache)]

    def set_policy(self, spec: dict[str, Any]) -> None:
        from graphopt.passes.step_cache.policies import Curves, make_policy

        self.spec = spec
        spec = dict(spec)
        curves = spec.pop("curves", None)
        for cache in self.step_caches():
            cache.set_policy(make_policy(spec, Curves.from_json(curves) if curves else None))

    def new_run(self) -> None:
        for module in self.modules.values():
            state = getattr(module, "graphopt_state", None)
            if state is not None:
                state.reset()

    def skipped_fraction(self) -> float:
        evaluated = skipped = 0
        for cache in self.step_caches():
            for run in cache.runs:
                evaluated, skipped = evaluated + run.evaluated, skipped + run.skipped
        return skipped / max(evaluated + skipped, 1)


# --------------------------------------------------------------- calibration
SPARSE_OFF = {"dense_steps": 1 << 62}
"""Sparse attention's runtime options while a dense reference runs: every call dense."""


def _calibrate(pipe: Any, installed: Installed, step_cache: str | None, auto_sparse: bool,
               quality: Mapping[str, float], calibration: Mapping[str, Any] | None, progress: bool) -> Any:
    """Calibrate the step-cache policy (``step_cache``: ``"auto"`` or a name; None: no caching) and, with
    ``auto_sparse``, sparse attention, under the one ``quality`` budget; the plan."""
    from graphopt.passes.sparse_attention import calibrate as sparse_calibration
    from graphopt.passes.step_cache.calibrate import AUTO, Plan, calibrate, check_quality, fit_curves, measure, meets
    from graphopt.passes.step_cache.policies import make_policy
    from graphopt.passes.step_cache.runtime import Recorder

    if not isinstance(calibration, Mapping):
        raise InvalidOptionError("calibrating needs the samples to run: calibration={...pipeline arguments, "
                                 "'seed': 0}, e.g. a few prompts or class labels and num_inference_steps")
    arguments = dict(calibration)
    seed = int(arguments.pop("seed", 0))
    quality = check_quality(quality)
    denoiser = installed.denoiser
    sparse = dict(denoiser.sparse) if denoiser.sparse is not None else None

    def run() -> torch.Tensor:
        with torch.no_grad():
            return images_of(pipe(**arguments, generator=torch.Generator().manual_seed(seed)))

    if sparse is not None:
        denoiser.set_sparse({**sparse, **SPARSE_OFF})
    run()  # captures every input signature the pipeline uses
    caches = denoiser.step_caches()
    recorders = [Recorder() for _ in caches]
    for cache, recorder in zip(caches, recorders):
        cache.recorder = recorder
    reference, share = denoiser.attention_share(run)
    for cache in caches:
        cache.recorder = None
    if sparse is not None and not auto_sparse:
        denoiser.set_sparse(sparse)  # a given sparse attention is part of what the step cache calibrates on
    bar = tqdm(desc="calibrating", unit="trial", disable=not progress)

    def note(line: str) -> None:
        bar.set_postfix_str(line)

    def sample(policy: Any) -> tuple[torch.Tensor, float]:
        for cache in denoiser.step_caches():
            cache.set_policy(policy)
        images = run()
        bar.update(1)
        return images, denoiser.skipped_fraction()

    curves, cache_trials, fragile, best = None, [], 0, None
    try:
        if step_cache is not None:
            curves = fit_curves(recorders, caches[0].cached)
            policies = AUTO if step_cache == "auto" else (step_cache,)
            best, trials, fragile = calibrate(sample, reference, curves, quality, policies, note)
            cache_trials = [sparse_calibration.Measured(t.spec, t.measured, skipped=t.skipped, time=1 - t.skipped)
                            for t in trials if t.skipped > 0]
        if not auto_sparse:
            return Plan(best.spec, curves, fingerprint(pipe), dict(quality), best.measured, best.skipped, trials,
                        fragile, sparse=sparse)
        for cache in caches:
            cache.set_policy(make_policy({"policy": "none"}))
        denoiser.time_attention(True)
        start = time.perf_counter()
        run()  # every attention dense, as in the reference run, which FLOP counting slowed
        dense_seconds = time.perf_counter() - start
        attention_seconds, attention_calls = denoiser.attention_timed()
        time_share = attention_seconds[0] / dense_seconds
        dense_call = attention_seconds[0] / max(attention_calls[0], 1)

        def attention_time() -> float:
            seconds, calls = denoiser.attention_timed()
            return sparse_calibration.time_left(time_share, seconds, calls, dense_call)

        def sample_sparse(options: dict[str, Any]) -> tuple[torch.Tensor, float, float]:
            denoiser.set_sparse({**sparse, **options})
            images = run()
            bar.update(1)
            return images, denoiser.attention_kept(), attention_time()

        steps = int(arguments.get("num_inference_steps", 50))
        sparse_trials = sparse_calibration.sweep(sample_sparse, reference, steps, measure, note)

        def run_pair(c: Any, s: Any) -> Any:
            for cache in caches:
                cache.set_policy(make_policy(dict(c.options), curves))
            images, kept, took = sample_sparse(s.options)
            skipped = denoiser.skipped_fraction()
            return sparse_calibration.Measured(None, measure(images, reference), skipped, kept, (1 - skipped) * took)

        pairs = sparse_calibration.candidates(cache_trials, sparse_trials, quality, meets)
        c, s, both = sparse_calibration.choose(pairs, run_pair, quality, meets)
    finally:
        bar.close()
        denoiser.time_attention(False)
    spec = dict(c.options) if c is not None else {"policy": "none"}
    options = {**sparse, **s.options} if s is not None else None
    alone = {name: sparse_calibration.best_alone(trials, share, quality, meets)
             for name, trials in (("step_cache", cache_trials), ("sparse_attention", sparse_trials))}
    return Plan(spec, curves, fingerprint(pipe), dict(quality), both.measured, both.skipped, [], fragile,
                sparse=options, attention_share=share,
                work=sparse_calibration.work(both.skipped, both.kept, share), time=both.time, alone=alone)


def images_of(output: Any) -> torch.Tensor:
    """A pipeline's output as a float tensor in [0, 1] (``[B, C, H, W]``, video ``[B, F, C, H, W]``)."""
    for name in ("images", "frames", "videos"):
        if hasattr(output, name):
            output = getattr(output, name)
            break
    if isinstance(output, (tuple, list)) and output and not isinstance(output[0], (int, float)):
        output = output[0] if len(output) == 1 and isinstance(output[0], torch.Tensor) else output
    if isinstance(output, torch.Tensor):
        return output.float()
    array = np.asarray(output, dtype=np.float32)
    if array.max() > 1.0:
        array = array / 255.0
    return torch.from_numpy(array).movedim(-1, -3)


# -------------------------------------------------------------- fingerprints
def fingerprint(pipe: Any) -> dict[str, str]:
    """What a plan was calibrated on: the transformer (class, config, weights) and the scheduler."""
    transformer = pipe.transformer
    h = hashlib.sha256(type(transformer).__name__.encode())
    config = {k: v for k, v in dict(getattr(transformer, "config", {})).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    # Parameters by content, not name: hooks that wrap blocks (cache tools) rename them.
    for entry in sorted(f"{tuple(p.shape)}{float(p.detach().double().sum()):.6e}" for p in transformer.parameters()):
        h.update(entry.encode())
    scheduler = getattr(pipe, "scheduler", None)
    return {"model": h.hexdigest()[:16], "scheduler": type(scheduler).__name__}


def _check_fingerprint(recorded: Mapping[str, str], pipe: Any) -> None:
    now = fingerprint(pipe)
    if recorded.get("model") != now["model"]:
        raise InvalidOptionError(f"this step-cache plan was calibrated on another model (fingerprint "
                                 f"{recorded.get('model')}, this transformer's is {now['model']}); calibrate "
                                 f"again with step_cache='auto', quality=...")
    if recorded.get("scheduler") != now["scheduler"]:
        logger.warning("step-cache plan calibrated with %s, used with %s: its decisions are keyed on the "
                       "timestep, so it carries over; check the quality", recorded.get("scheduler"), now["scheduler"])


def _as_plan(step_cache: Any) -> Any:
    from graphopt.passes.step_cache.calibrate import Plan

    if isinstance(step_cache, Plan):
        return step_cache
    if isinstance(step_cache, Mapping) and "plan" in step_cache:
        return Plan.from_json(step_cache)
    if isinstance(step_cache, Path) or (isinstance(step_cache, str) and step_cache.endswith(".json")):
        return Plan.load(step_cache)
    return None


def _check_spec(spec: dict[str, Any]) -> None:
    from graphopt.passes.step_cache.policies import make_policy

    spec = dict(spec)
    spec.pop("curves", None)
    make_policy(spec)
