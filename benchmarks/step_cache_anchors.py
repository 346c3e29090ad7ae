"""Third-party step caches to compare graphopt's step cache against: diffusers' cache hooks and cache-dit.

``anchor_methods()`` lists every method that runs on a ``FluxTransformer2DModel`` or a
``WanTransformer3DModel`` inside a custom ``DiffusionPipeline`` (the digits and
moving-digits pipelines), each at settings from light to aggressive. ``apply(pipe)`` installs it on ``pipe.transformer`` (or ``pipe``
for cache-dit), ``remove(pipe)`` restores the uncached model exactly, ``skipped(pipe)``
is the fraction of attention evaluations the last sampling run skipped, counted the
same way for every tool (calls of each attention's ``to_q``, cross-attention
included, against an uncached run's), so block-skipping caches (FirstBlockCache, MagCache, DBCache) and
attention-skipping ones (PAB, TaylorSeer) are on one scale.

diffusers' stateful hooks (FirstBlockCache, MagCache, TaylorSeer, SeaCache) key their
state by ``transformer.cache_context(name, ...)`` (SeaCache also reads step, sigma and
step count from it), which diffusers' own pipelines enter around
every denoiser call. A custom pipeline does not, so ``apply`` installs
``_SchedulerCacheContext``: it enters that context around every transformer call,
naming the k-th call of a scheduler step ``"cond"`` / ``"uncond"`` (separate CFG
branches keep separate state, as in diffusers' FluxPipeline), passing step index,
sigma and step count read from ``pipe.scheduler``, and resetting hook state when the
scheduler gets new timesteps (the start of a sampling run).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Calls of one scheduler step, in the order the digits pipeline makes them.
_BRANCH_NAMES = ("cond", "uncond")


@dataclass(frozen=True)
class AnchorMethod:
    """One third-party cache at one setting on a pipeline.

    ``skipped(pipe)``: fraction of attention evaluations the last sampling run skipped
    (None before any run); read it before ``remove``.
    """

    name: str
    setting: str
    apply: Callable[[object], None]
    remove: Callable[[object], None]
    skipped: Callable[[object], float | None]


class _SchedulerCacheContext:
    """Enter ``transformer.cache_context`` around each transformer call of a custom pipeline, and count attention calls.

    The scheduler is the source of truth for where sampling is: ``step_index`` is
    ``None`` before the first ``step()`` and counts steps after; ``set_timesteps``
    replaces ``timesteps``, which marks a new run and resets the hooks' state.
    """

    def __init__(self, pipe):
        self.transformer = pipe.transformer
        self.scheduler = pipe.scheduler
        self._run_timesteps = None
        self._step = None
        self._calls_in_step = 0
        self._open_context = None
        self.transformer_calls = 0  # in the current sampling run
        self.attention_calls = 0
        queries = [m for n, m in self.transformer.named_modules() if re.search(r"attn\d*\.to_q$", n)]
        self.attentions_per_call = len(queries)
        self._handles = [
            self.transformer.register_forward_pre_hook(self._enter, with_kwargs=True),
            self.transformer.register_forward_hook(self._exit, always_call=True),
            *(query.register_forward_hook(self._count_attention) for query in queries),
        ]

    def _count_attention(self, module, args, output):
        self.attention_calls += 1

    def _enter(self, module, args, kwargs):
        timesteps = self.scheduler.timesteps
        if timesteps is not self._run_timesteps:
            self._run_timesteps = timesteps
            self._step = None
            self.transformer_calls = 0
            self.attention_calls = 0
            self.transformer._reset_stateful_cache()
        step = self.scheduler.step_index or 0
        self._calls_in_step = self._calls_in_step + 1 if step == self._step else 0
        self._step = step
        self.transformer_calls += 1
        name = _BRANCH_NAMES[self._calls_in_step] if self._calls_in_step < len(_BRANCH_NAMES) else f"call{self._calls_in_step}"
        self._open_context = self.transformer.cache_context(
            name,
            step_index=step,
            num_inference_steps=len(timesteps),
            timestep=timesteps[step],
            sigma=float(self.scheduler.sigmas[step]),
        )
        self._open_context.__enter__()
        return None

    def _exit(self, module, args, output):
        self._open_context.__exit__(None, None, None)
        self._open_context = None
        return None

    def current_timestep(self) -> float:
        """The scheduler's timestep (0..1000) for PAB / FasterCache's ``current_timestep_callback``."""
        return float(self.scheduler.timesteps[self.scheduler.step_index or 0])

    def skipped_attention_fraction(self) -> float | None:
        """Fraction of the last run's attention evaluations the cache skipped (None before any run)."""
        if not self.transformer_calls:
            return None
        return 1 - self.attention_calls / (self.transformer_calls * self.attentions_per_call)

    def close(self):
        for handle in self._handles:
            handle.remove()


def _diffusers_method(name: str, setting: str, make_config: Callable[[object, _SchedulerCacheContext], object]) -> AnchorMethod:
    def apply(pipe):
        pipe._anchor_context = _SchedulerCacheContext(pipe)  # first, so remove() undoes a failed enable_cache
        pipe.transformer.enable_cache(make_config(pipe, pipe._anchor_context))

    def remove(pipe):
        context = pipe.__dict__.pop("_anchor_context", None)
        if context is None:  # apply failed before installing anything (MagCache's calibration run)
            return
        pipe.transformer.disable_cache()
        context.close()

    return AnchorMethod(name, setting, apply, remove, _skipped_attention_fraction)


def _skipped_attention_fraction(pipe) -> float | None:
    return pipe._anchor_context.skipped_attention_fraction()


def calibrate_mag_ratios(pipe, num_inference_steps: int, pipe_kwargs: dict) -> list[float]:
    """Per-step residual magnitude ratios of ``pipe.transformer`` from diffusers' ``MagCacheConfig(calibrate=True)`` run.

    MagCache (Ma et al. 2025, arXiv:2506.09045) needs these model-specific ratios; the
    tool's calibration mode runs one uncached sampling pass and prints them. With
    separate CFG calls it prints one list per branch; the cond branch's list is used.
    """
    from diffusers import MagCacheConfig

    printed = io.StringIO()
    context = _SchedulerCacheContext(pipe)
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=num_inference_steps))
    try:
        with contextlib.redirect_stdout(printed):
            pipe(num_inference_steps=num_inference_steps, **pipe_kwargs)
    finally:
        pipe.transformer.disable_cache()
        context.close()
    # The tool prints a header line, then each branch's ratios as a Python list.
    ratio_lists = [ast.literal_eval(line) for line in printed.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
    if not ratio_lists:
        raise RuntimeError("MagCache calibration printed no ratios; the transformer blocks were not hooked.")
    return ratio_lists[0]


def _mag_cache_method(threshold: float, num_inference_steps: int, calibration_kwargs: dict) -> AnchorMethod:
    """MagCache at ``threshold``; ``apply`` first calibrates the ratios on the pipeline (once per pipeline and step count)."""
    from diffusers import MagCacheConfig

    method = _diffusers_method(
        "diffusers.mag_cache",
        f"threshold={threshold}",
        lambda pipe, context: MagCacheConfig(
            threshold=threshold,
            num_inference_steps=num_inference_steps,
            mag_ratios=pipe._anchor_mag_ratios[num_inference_steps],
        ),
    )
    install = method.apply

    def apply(pipe):
        ratios = pipe.__dict__.setdefault("_anchor_mag_ratios", {})
        if num_inference_steps not in ratios:
            ratios[num_inference_steps] = calibrate_mag_ratios(pipe, num_inference_steps, calibration_kwargs)
        install(pipe)

    return dataclasses.replace(method, apply=apply)


def _taylorseer_identifiers(pipe) -> list[str] | None:
    """diffusers' TaylorSeer hooks the modules whose names fullmatch ``^blocks.*attn`` (and FLUX's block
    lists); Wan names its attentions ``attn1`` and ``attn2``, so by default nothing is hooked there."""
    return None if hasattr(pipe.transformer, "single_transformer_blocks") else [r"^blocks\.\d+\.attn\d"]


def _raw_vision_latents(pipe):
    """SeaCache's view of the latents: FLUX needs ``_flux_raw_vision_latents``; diffusers ships Wan's."""
    return _flux_raw_vision_latents if hasattr(pipe.transformer, "single_transformer_blocks") else None


def _flux_raw_vision_latents(module, args, kwargs) -> list[torch.Tensor]:
    """SeaCache's view of a FLUX call: each sample's latent tokens as a (C, 1, H, W) image, positions from ``img_ids``.

    SeaCache (arXiv:2602.18993) filters the input latents spectrally, so it needs
    them on their 2-D grid; diffusers ships this adapter only for Cosmos 3 and Wan,
    and without one it runs fail-open (never caches).
    """
    tokens, positions = kwargs["hidden_states"], kwargs["img_ids"]
    if positions.ndim == 3:
        positions = positions[0]
    height, width = int(positions[:, 1].max()) + 1, int(positions[:, 2].max()) + 1
    order = (positions[:, 1] * width + positions[:, 2]).long().argsort()
    return [sample[order].transpose(0, 1).reshape(tokens.shape[-1], 1, height, width) for sample in tokens]


def _cache_dit_adapter(pipe):
    """cache-dit's own set-up for the transformer's family (its ``FluxPipeline`` or ``WanPipeline``
    adapter), named for a custom pipeline.

    FLUX: both block lists form one cache unit: the FLUX patch functor makes the single-stream
    blocks take and return (hidden, encoder_hidden) like the double-stream ones, so
    ``Fn_compute_blocks`` counts from the first double-stream block. Passing the two
    lists separately instead makes two units, each computing its own first Fn blocks.
    Wan: one list of blocks that return the hidden state alone (cache-dit's pattern 2).
    """
    from cache_dit import BlockAdapter, ForwardPattern
    from cache_dit.caching.patch_functors import FluxPatchFunctor

    transformer = pipe.transformer
    if not hasattr(transformer, "single_transformer_blocks"):
        return BlockAdapter(pipe=pipe, transformer=transformer, blocks=transformer.blocks,
                            forward_pattern=ForwardPattern.Pattern_2)
    return BlockAdapter(
        pipe=pipe,
        transformer=transformer,
        blocks=transformer.transformer_blocks + transformer.single_transformer_blocks,
        blocks_name="transformer_blocks",
        dummy_blocks_names=["single_transformer_blocks"],
        patch_functor=FluxPatchFunctor(),
        forward_pattern=ForwardPattern.Pattern_1,
    )


def _cache_dit_method(setting: str, cache_kwargs: dict, taylorseer_order: int | None = None) -> AnchorMethod:
    """cache-dit DBCache (Fn first blocks always computed, residual-diff threshold on them), optionally with TaylorSeer."""
    import cache_dit
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    def apply(pipe):
        calibrator = None if taylorseer_order is None else TaylorSeerCalibratorConfig(taylorseer_order=taylorseer_order)
        unpatched = [module for module in pipe.transformer.modules() if "forward" not in vars(module)]
        cache_dit.enable_cache(_cache_dit_adapter(pipe), cache_config=DBCacheConfig(**cache_kwargs), calibrator_config=calibrator)
        pipe._anchor_context = _SchedulerCacheContext(pipe)
        pipe._anchor_unpatched = unpatched

    def remove(pipe):
        cache_dit.disable_cache(pipe)
        # disable_cache keeps the patch functor's forwards (same numbers, but not the model's own code).
        for module in pipe._anchor_unpatched:
            vars(module).pop("forward", None)
            vars(module).pop("_is_patched", None)
        pipe._anchor_context.close()
        del pipe._anchor_context, pipe._anchor_unpatched

    name = "cache_dit.dbcache_taylorseer" if taylorseer_order is not None else "cache_dit.dbcache"
    return AnchorMethod(name, setting, apply, remove, _skipped_attention_fraction)


def anchor_methods(
    num_inference_steps: int = 50, calibration_kwargs: dict | None = None, separate_cfg_calls: bool = False
) -> list[AnchorMethod]:
    """Every third-party step cache that runs on the digits pipeline, light to aggressive within each method.

    ``calibration_kwargs``: pipeline arguments (without ``num_inference_steps``) for
    MagCache's calibration run; MagCache is left out without them.
    ``separate_cfg_calls``: the pipeline will be called with ``batch_cfg=False`` (cond
    then uncond call per step). cache-dit must be told (its ``enable_separate_cfg``),
    else it takes the two calls for two steps and compares cond with uncond; the
    diffusers hooks follow either way through the per-call cache context.
    """
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        PyramidAttentionBroadcastConfig,
        SeaCacheConfig,
        TaylorSeerCacheConfig,
    )

    methods = [
        _diffusers_method("diffusers.first_block", f"threshold={t}", lambda pipe, ctx, t=t: FirstBlockCacheConfig(threshold=t))
        for t in (0.02, 0.05, 0.1, 0.2, 0.4)
    ]
    methods += [
        _diffusers_method(
            "diffusers.pyramid_attention_broadcast",
            f"skip_range={r}",
            lambda pipe, ctx, r=r: PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=r,
                spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=ctx.current_timestep,
            ),
        )
        for r in (2, 3, 4)
    ]
    methods += [
        _diffusers_method(
            "diffusers.taylorseer",
            f"interval={i},order={o}",
            lambda pipe, ctx, i=i, o=o: TaylorSeerCacheConfig(
                cache_interval=i, disable_cache_before_step=3, max_order=o, taylor_factors_dtype=torch.float32,
                cache_identifiers=_taylorseer_identifiers(pipe),
            ),
        )
        for i, o in ((2, 1), (3, 1), (5, 1), (5, 2))
    ]
    # FasterCache's unconditional-branch reuse assumes video latents (BCFHW / BFCHW) and fails
    # on FLUX's [batch, tokens, channels] output; its attention reuse alone runs.
    methods += [
        _diffusers_method(
            "diffusers.faster_cache_attention",
            f"skip_range={r}",
            lambda pipe, ctx, r=r: FasterCacheConfig(
                spatial_attention_block_skip_range=r,
                current_timestep_callback=ctx.current_timestep,
                attention_weight_callback=lambda _: 0.5,
                is_guidance_distilled=True,
            ),
        )
        for r in (2, 3, 4)
    ]
    methods += [
        _diffusers_method(
            "diffusers.sea_cache",
            f"threshold={t}",
            lambda pipe, ctx, t=t: SeaCacheConfig(threshold=t, raw_vision_callback=_raw_vision_latents(pipe)),
        )
        for t in (0.1, 0.25, 0.5, 1.0)
    ]
    if calibration_kwargs is not None:
        methods += [_mag_cache_method(t, num_inference_steps, calibration_kwargs) for t in (0.02, 0.06, 0.12, 0.24)]
    dbcache = dict(
        Fn_compute_blocks=1,
        Bn_compute_blocks=0,
        max_warmup_steps=4,
        num_inference_steps=num_inference_steps,
        enable_separate_cfg=separate_cfg_calls,
    )
    methods += [
        _cache_dit_method(f"Fn=1,Bn=0,threshold={t}", dict(dbcache, residual_diff_threshold=t)) for t in (0.04, 0.08, 0.16, 0.24, 0.4)
    ]
    methods += [
        _cache_dit_method(f"Fn=1,Bn=0,threshold={t},taylorseer_order=1", dict(dbcache, residual_diff_threshold=t), taylorseer_order=1)
        for t in (0.08, 0.24, 0.4)
    ]
    return methods
