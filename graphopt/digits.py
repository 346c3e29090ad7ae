"""A trained, CPU-sized class-conditional diffusion transformer on sklearn's 8×8 digits.

Why: step caching (reusing transformer-block outputs between sampling steps) is
lossy, and only a *trained* model shows whether the loss matters; random weights
give velocity fields with no structure between steps. This module ships a small
``FluxTransformer2DModel`` trained with rectified flow (Liu et al. 2022,
"Flow Straight and Fast"; Esser et al. 2024, SD3) on the digits upscaled to
32×32, wrapped in a ``DiffusionPipeline`` that follows ``FluxPipeline``'s calling
convention, so diffusers' own cache hooks (``transformer.enable_cache(...)``)
and graphopt's step-cache pass both apply to it. ``DigitsClassifier`` is the
judge: accuracy and Fréchet distance of its features (``graphopt.quality``).

Weights: ``python examples/train_digits_dit.py`` and
``python examples/train_digits_classifier.py`` write ``graphopt/data/*.safetensors``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from .errors import GraphoptError, InvalidOptionError

DATA_DIR = Path(__file__).parent / "data"
PIPELINE_WEIGHTS = DATA_DIR / "digits_dit.safetensors"
CLASSIFIER_WEIGHTS = DATA_DIR / "digits_classifier.safetensors"

NUM_CLASSES = 10
NO_CLASS = 10  # class-embedding row used for the unconditional branch of classifier-free guidance
IMAGE_SIZE = 32
PATCH = 4  # 4×4 pixel patches packed into channels (FLUX packs 2×2): one token per source 8×8 digit pixel

# Small FluxTransformer2DModel: 32×32×1 image → 8×8 = 64 tokens × 16 channels.
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=PATCH * PATCH,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)
CLASS_TOKENS = 2


def digits_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1797 8×8 digits, bicubically upscaled to ``size``×``size``.

    Returns images [N, 1, size, size] in [-1, 1] (the range the DiT is trained on)
    and integer labels [N].
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return images * 2.0 - 1.0, torch.tensor(digits.target, dtype=torch.long)


def pack_latents(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/4)(W/4), C·16] tokens, FLUX's packing with 4×4 instead of 2×2 patches."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents``."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.reshape(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Rotary position ids [(H/4)(W/4), 3] = (0, row, column) per token, as FluxPipeline makes them."""
    rows = torch.arange(height // PATCH, device=device, dtype=dtype)
    cols = torch.arange(width // PATCH, device=device, dtype=dtype)
    ids = torch.zeros(height // PATCH, width // PATCH, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


class DigitsClassEmbedding(nn.Module):
    """Digit label → the transformer's text inputs: ``CLASS_TOKENS`` encoder tokens and a pooled vector
    (none for transformers without one, ``pooled_projection_dim=None``).

    Row ``NO_CLASS`` is the learned "no class" used for the unconditional branch
    of classifier-free guidance (Ho & Salimans 2022).
    """

    def __init__(self, joint_attention_dim: int, pooled_projection_dim: int | None, tokens: int = CLASS_TOKENS):
        super().__init__()
        self.tokens = tokens
        self.joint_attention_dim = joint_attention_dim
        self.token_embedding = nn.Embedding(NUM_CLASSES + 1, tokens * joint_attention_dim)
        self.pooled_embedding = nn.Embedding(NUM_CLASSES + 1, pooled_projection_dim) if pooled_projection_dim else None

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.token_embedding(labels).reshape(labels.shape[0], self.tokens, self.joint_attention_dim)
        return tokens, self.pooled_embedding(labels) if self.pooled_embedding is not None else None


def build_modules(config: dict | None = None):
    """Untrained (transformer, class_embedding) for ``config`` (default ``TRANSFORMER_CONFIG``)."""
    config = dict(config or TRANSFORMER_CONFIG)
    config["axes_dims_rope"] = tuple(config["axes_dims_rope"])
    transformer = FluxTransformer2DModel(**config)
    class_embedding = DigitsClassEmbedding(config["joint_attention_dim"], config["pooled_projection_dim"])
    return transformer, class_embedding


def labels_tensor(class_labels) -> torch.Tensor:
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise InvalidOptionError(f"class_labels must be a non-empty list of digits 0-{NUM_CLASSES - 1}, got {class_labels!r}")
    return labels


def guided_velocity(transformer, velocity, latents: torch.Tensor, t: torch.Tensor, cond: tuple, uncond: tuple,
                    guidance_scale: float, batch_cfg: bool) -> torch.Tensor:
    """One step's classifier-free-guided velocity (Ho & Salimans 2022); ``velocity(hidden, condition, t)`` calls
    the transformer, ``cond`` and ``uncond`` are its conditioning tensors. Each call runs inside
    ``transformer.cache_context`` named as diffusers' pipelines name theirs (``cond``, ``uncond``, or
    ``cond_uncond`` for both in one batch), since diffusers' cache hooks keep one state per name."""
    if guidance_scale == 1.0:
        with transformer.cache_context("cond"):
            return velocity(latents, cond, t)
    if batch_cfg:
        both = tuple(torch.cat([c, u]) for c, u in zip(cond, uncond))
        with transformer.cache_context("cond_uncond"):
            v_cond, v_uncond = velocity(torch.cat([latents, latents]), both, t).chunk(2)
    else:
        with transformer.cache_context("cond"):
            v_cond = velocity(latents, cond, t)
        with transformer.cache_context("uncond"):
            v_uncond = velocity(latents, uncond, t)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional digits sampler with FluxPipeline's transformer calling convention.

    Each step calls ``transformer(hidden_states, encoder_hidden_states,
    pooled_projections, timestep=t/1000, img_ids, txt_ids, return_dict=False)``;
    with ``batch_cfg`` the conditional rows (first) and unconditional rows
    (second) share one call, otherwise the transformer runs twice per step
    (conditional first). ``guidance_scale=1`` skips the unconditional pass.
    """

    model_cpu_offload_seq = "class_embedding->transformer"

    def __init__(self, transformer, scheduler, class_embedding):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, class_embedding=class_embedding)

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int = 50, guidance_scale: float = 2.0,
                 generator: torch.Generator | None = None, batch_cfg: bool = True, output_type: str = "pt",
                 latents: torch.Tensor | None = None):
        """Images [B, 1, 32, 32] in [0, 1], one per entry of ``class_labels``; ``latents`` gives the initial
        noise ([B, 1, 32, 32]) instead of drawing it, so a sample can be run alone or in any batch."""
        if output_type != "pt":
            raise InvalidOptionError(f"output_type={output_type!r} is not supported; use output_type='pt'")
        if num_inference_steps < 1:
            raise InvalidOptionError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        device = self.transformer.device
        dtype = self.transformer.dtype
        labels = labels_tensor(class_labels).to(device)
        batch = labels.shape[0]

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is not None and tuple(latents.shape) != (batch, 1, IMAGE_SIZE, IMAGE_SIZE):
            raise InvalidOptionError(f"latents must have shape {(batch, 1, IMAGE_SIZE, IMAGE_SIZE)}, "
                                     f"got {tuple(latents.shape)}")
        noise = latents if latents is not None else torch.randn(
            (batch, 1, IMAGE_SIZE, IMAGE_SIZE), generator=generator,
            device=generator.device if generator is not None else "cpu", dtype=torch.float32)
        latents = pack_latents(noise).to(device=device, dtype=dtype)
        img_ids = image_ids(IMAGE_SIZE, IMAGE_SIZE, device=device, dtype=dtype)
        txt_ids = torch.zeros(self.class_embedding.tokens, 3, device=device, dtype=dtype)

        cond_tokens, cond_pooled = self.class_embedding(labels)
        uncond_tokens, uncond_pooled = self.class_embedding(torch.full_like(labels, NO_CLASS))
        cond_tokens, cond_pooled = cond_tokens.to(dtype), cond_pooled.to(dtype)
        uncond_tokens, uncond_pooled = uncond_tokens.to(dtype), uncond_pooled.to(dtype)

        def velocity(hidden, condition, t):
            tokens, pooled = condition
            timestep = (t / 1000).expand(hidden.shape[0]).to(dtype)
            return self.transformer(hidden_states=hidden, encoder_hidden_states=tokens, pooled_projections=pooled,
                                    timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]

        for t in self.progress_bar(self.scheduler.timesteps):
            v = guided_velocity(self.transformer, velocity, latents, t, (cond_tokens, cond_pooled),
                                (uncond_tokens, uncond_pooled), guidance_scale, batch_cfg)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]

        images = unpack_latents(latents.float(), IMAGE_SIZE, IMAGE_SIZE)
        self.maybe_free_model_hooks()
        return (images / 2 + 0.5).clamp(0.0, 1.0)


def make_scheduler():
    """Flow-matching Euler scheduler, shift 1 (32×32 images need no resolution shift)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def missing_weights(path: Path, script: str) -> GraphoptError:
    return GraphoptError(f"{path} is missing; run `python examples/{script}` to train and write it")


def save_digits_pipeline(transformer, class_embedding, config: dict, path: Path = PIPELINE_WEIGHTS) -> None:
    save_weights(transformer, class_embedding, config, path)


def save_weights(transformer, class_embedding, config: dict, path: Path) -> None:
    """Write both modules' weights in fp16 to one safetensors file, the transformer config in its metadata."""
    from safetensors.torch import save_file

    tensors = {f"transformer.{k}": v.detach().half().contiguous() for k, v in transformer.state_dict().items()}
    tensors.update({f"class_embedding.{k}": v.detach().half().contiguous() for k, v in class_embedding.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"transformer_config": json.dumps(config)})


def load_digits_pipeline(dtype: torch.dtype = torch.float32):
    """The trained ``DigitsPipeline`` from ``graphopt/data/digits_dit.safetensors``."""
    transformer, class_embedding = load_weights(PIPELINE_WEIGHTS, "train_digits_dit.py", build_modules)
    if dtype != torch.float32:  # the modules are built in float32; skip a no-op cast that diffusers warns about
        transformer, class_embedding = transformer.to(dtype), class_embedding.to(dtype)
    pipe = DigitsPipeline(transformer.eval(), make_scheduler(), class_embedding.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_weights(path: Path, script: str, build) -> tuple[nn.Module, nn.Module]:
    """(transformer, class_embedding) from ``save_weights``' file, built by ``build(config)``; a missing file
    names the ``examples/`` script that writes it."""
    from safetensors import safe_open

    if not path.exists():
        raise missing_weights(path, script)
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["transformer_config"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    transformer, class_embedding = build(config)
    for prefix, module in (("transformer.", transformer), ("class_embedding.", class_embedding)):
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return transformer, class_embedding


class DigitsClassifier(nn.Module):
    """Small CNN on [B, 1, 32, 32] images in [0, 1]; ``features`` is the penultimate layer for Fréchet distance."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16×16
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8×8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4×4
        )
        self.hidden = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 64] penultimate activations."""
        return F.relu(self.hidden(self.conv(images).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_digits_classifier() -> DigitsClassifier:
    """The trained ``DigitsClassifier`` (eval mode) from ``graphopt/data/digits_classifier.safetensors``."""
    from safetensors.torch import load_file

    if not CLASSIFIER_WEIGHTS.exists():
        raise missing_weights(CLASSIFIER_WEIGHTS, "train_digits_classifier.py")
    classifier = DigitsClassifier()
    classifier.load_state_dict({k: v.float() for k, v in load_file(str(CLASSIFIER_WEIGHTS)).items()})
    return classifier.eval()
