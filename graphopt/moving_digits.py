"""A trained, CPU-sized class-conditional *video* diffusion transformer: sklearn's digits moving on a canvas.

Why: step caching and sparse attention are lossy, and only a trained video
model shows whether the loss matters (random weights give no structure across
steps, and no spatial or temporal attention heads). This module ships a small
``WanTransformer3DModel`` trained with rectified flow (as ``graphopt.digits``)
on clips of ``FRAMES`` frames in which one digit, upscaled to 12×12, moves in a
straight line across a 24×24 canvas and bounces off its edges. The pipeline
follows ``WanPipeline``'s calling convention, so diffusers' own cache hooks
(``transformer.enable_cache(...)``) and graphopt's passes both apply to it.

A second, longer variant (``LONG``: 8 frames of a 32×32 canvas, 512 tokens)
is where attention is most of a step's work, as in real video DiTs: sparse
attention is measured on it.

Weights: ``python examples/train_moving_digits_dit.py [--variant long]`` writes
``graphopt/data/moving_digits_dit[_long].safetensors``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers import DiffusionPipeline, WanTransformer3DModel

from .digits import (DATA_DIR, NO_CLASS, DigitsClassEmbedding, digits_images, guided_velocity, labels_tensor,
                     load_weights, make_scheduler, save_weights)
from .errors import InvalidOptionError

PIPELINE_WEIGHTS = DATA_DIR / "moving_digits_dit.safetensors"

FRAMES = 6
CANVAS = 24
DIGIT = 12
MAX_SPEED = 2
"""Pixels per frame, per axis."""
PATCH = 4
"""4×4 pixel patches packed into channels: a frame is 6×6 tokens of 16 channels."""

# Small WanTransformer3DModel: 6 frames × 6×6 tokens = 216 tokens, width 64.
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 1, 1),
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=PATCH * PATCH,
    out_channels=PATCH * PATCH,
    text_dim=64,
    freq_dim=64,
    ffn_dim=128,
    num_layers=6,
    rope_max_seq_len=64,
)
CLASS_TOKENS = 2


@dataclass(frozen=True)
class Variant:
    """One trained moving-digits model: its clips' frames and canvas, its transformer, its weights file."""

    name: str
    frames: int
    canvas: int
    config: dict
    weights: Path

    @property
    def tokens(self) -> int:
        return self.frames * (self.canvas // PATCH) ** 2


SHORT = Variant("short", FRAMES, CANVAS, TRANSFORMER_CONFIG, PIPELINE_WEIGHTS)
LONG = Variant("long", 8, 32, {**TRANSFORMER_CONFIG, "num_layers": 4},
               DATA_DIR / "moving_digits_dit_long.safetensors")
"""8 frames of 8×8 tokens: attention is about 70 % of a step's FLOPs, against 36 % for ``SHORT``."""
VARIANTS = {v.name: v for v in (SHORT, LONG)}


def moving_clips(digits: torch.Tensor, generator: torch.Generator | None = None,
                 frames: int = FRAMES, canvas: int = CANVAS) -> torch.Tensor:
    """Each ``digits`` image ([N, 1, DIGIT, DIGIT] in [-1, 1]) moving on a blank canvas along a random straight
    line, bouncing off the edges: clips [N, frames, 1, canvas, canvas] in [-1, 1]."""
    n = digits.shape[0]
    room = canvas - DIGIT
    start = torch.randint(0, room + 1, (n, 2), generator=generator)
    velocity = torch.randint(-MAX_SPEED, MAX_SPEED + 1, (n, 2), generator=generator)
    clips = torch.full((n, frames, 1, canvas, canvas), -1.0)
    for f in range(frames):
        travelled = (start + f * velocity) % (2 * room)
        position = torch.where(travelled > room, 2 * room - travelled, travelled)  # reflected at the edges
        for k in range(n):
            y, x = position[k].tolist()
            clips[k, f, :, y:y + DIGIT, x:x + DIGIT] = digits[k]
    return clips


def moving_digits_clips(count: int, seed: int = 0, variant: Variant = SHORT) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` clips of sklearn's digits (in order, repeating) with seeded trajectories, and their labels."""
    images, labels = digits_images(DIGIT)
    index = torch.arange(count) % images.shape[0]
    clips = moving_clips(images[index], torch.Generator().manual_seed(seed), variant.frames, variant.canvas)
    return clips, labels[index]


def pack_video(clips: torch.Tensor) -> torch.Tensor:
    """[B, F, 1, H, W] clips → [B, 16, F, H/4, W/4] latents (4×4 pixel patches packed into channels)."""
    b, f, c, h, w = clips.shape
    x = clips.reshape(b, f, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 6, 1, 3, 5)
    return x.reshape(b, c * PATCH * PATCH, f, h // PATCH, w // PATCH)


def unpack_video(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_video``."""
    b, d, f, h, w = latents.shape
    c = d // (PATCH * PATCH)
    x = latents.reshape(b, c, PATCH, PATCH, f, h, w).permute(0, 4, 1, 5, 2, 6, 3)
    return x.reshape(b, f, c, h * PATCH, w * PATCH)


def build_modules(config: dict | None = None) -> tuple[WanTransformer3DModel, DigitsClassEmbedding]:
    """Untrained (transformer, class_embedding) for ``config`` (default ``TRANSFORMER_CONFIG``)."""
    config = dict(config or TRANSFORMER_CONFIG)
    config["patch_size"] = tuple(config["patch_size"])
    return WanTransformer3DModel(**config), DigitsClassEmbedding(config["text_dim"], None, CLASS_TOKENS)


class MovingDigitsPipeline(DiffusionPipeline):
    """Class-conditional moving-digit clips with WanPipeline's transformer calling convention.

    Each step calls ``transformer(hidden_states, timestep=t, encoder_hidden_states, return_dict=False)``;
    with ``batch_cfg`` the conditional rows (first) and unconditional rows (second) share one call,
    otherwise the transformer runs twice per step (conditional first).
    """

    model_cpu_offload_seq = "class_embedding->transformer"
    frames, canvas = FRAMES, CANVAS
    """The clips' shape: the variant's (``load_moving_digits_pipeline`` sets them)."""

    def __init__(self, transformer, scheduler, class_embedding):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, class_embedding=class_embedding)

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int = 50, guidance_scale: float = 2.0,
                 generator: torch.Generator | None = None, batch_cfg: bool = True, output_type: str = "pt",
                 latents: torch.Tensor | None = None):
        """Clips [B, frames, 1, canvas, canvas] in [0, 1], one per entry of ``class_labels``; ``latents`` gives the
        initial noise ([B, frames, 1, canvas, canvas]) instead of drawing it."""
        if output_type != "pt":
            raise InvalidOptionError(f"output_type={output_type!r} is not supported; use output_type='pt'")
        if num_inference_steps < 1:
            raise InvalidOptionError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        device, dtype = self.transformer.device, self.transformer.dtype
        labels = labels_tensor(class_labels).to(device)
        batch = labels.shape[0]
        shape = (batch, self.frames, 1, self.canvas, self.canvas)
        if latents is not None and tuple(latents.shape) != shape:
            raise InvalidOptionError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        noise = latents if latents is not None else torch.randn(
            shape, generator=generator, device=generator.device if generator is not None else "cpu")
        latents = pack_video(noise).to(device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        cond, _ = self.class_embedding(labels)
        uncond, _ = self.class_embedding(torch.full_like(labels, NO_CLASS))
        cond, uncond = cond.to(dtype), uncond.to(dtype)

        def velocity(hidden, condition, t):
            return self.transformer(hidden_states=hidden, timestep=t.expand(hidden.shape[0]),
                                    encoder_hidden_states=condition[0], return_dict=False)[0]

        for t in self.progress_bar(self.scheduler.timesteps):
            v = guided_velocity(self.transformer, velocity, latents, t, (cond,), (uncond,), guidance_scale, batch_cfg)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]

        clips = unpack_video(latents.float())
        self.maybe_free_model_hooks()
        return (clips / 2 + 0.5).clamp(0.0, 1.0)


def save_moving_digits_pipeline(transformer, class_embedding, config: dict, path: Path = PIPELINE_WEIGHTS) -> None:
    save_weights(transformer, class_embedding, config, path)


def load_moving_digits_pipeline(variant: str = "short") -> MovingDigitsPipeline:
    """The trained ``MovingDigitsPipeline`` of a variant (``"short"``, ``"long"``) from ``graphopt/data/``."""
    if variant not in VARIANTS:
        raise InvalidOptionError(f"no moving-digits variant {variant!r}; use one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    script = "train_moving_digits_dit.py" + ("" if v is SHORT else f" --variant {v.name}")
    transformer, class_embedding = load_weights(v.weights, script, build_modules)
    pipe = MovingDigitsPipeline(transformer.eval(), make_scheduler(), class_embedding.eval())
    pipe.frames, pipe.canvas = v.frames, v.canvas
    pipe.set_progress_bar_config(disable=True)
    return pipe


def centered_digits(clips: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Each frame's digit, cut out around the frame's brightness centroid and scaled to ``size``×``size``:
    clips [B, F, 1, canvas, canvas] in [0, 1] → [B·F, 1, size, size], the digits classifier's input."""
    frames = clips.reshape(-1, *clips.shape[-2:]).float()
    canvas = frames.shape[-1]
    rows, cols = torch.arange(canvas, dtype=torch.float32), torch.arange(canvas, dtype=torch.float32)
    mass = frames.sum(dim=(1, 2)).clamp_min(1e-6)
    centre = torch.stack([(frames.sum(2) * rows).sum(1) / mass, (frames.sum(1) * cols).sum(1) / mass], dim=1)
    corner = (centre - DIGIT / 2 + 0.5).round().clamp(0, canvas - DIGIT).long()
    crops = torch.stack([frame[y:y + DIGIT, x:x + DIGIT] for frame, (y, x) in zip(frames, corner.tolist())])
    return F.interpolate(crops[:, None], size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
