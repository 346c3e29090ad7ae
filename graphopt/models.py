"""Built-in model zoo: real architectures with random weights and tiny configs.

Every case builds a real model class from torchvision, timm, HF transformers or
diffusers with a small configuration (small images, 2 layers, hidden 32-64) so a
forward pass on a couple of CPU cores is fast.  Nothing is downloaded: weights are
random (``pretrained=False`` / ``weights=None`` / ``Model(config)``) and seeded so
that two builds of the same case are identical.

Each builder returns ``(model.eval(), example_inputs)`` where ``example_inputs`` is a
tuple of tensors and ``model(*example_inputs)`` returns a tensor or a tuple of
tensors.  Hugging Face models are wrapped so that their forward takes positional
tensors only; that is the form :func:`torch.export.export` (how graphopt captures
models) expects.

The third-party libraries are imported lazily inside the builders, so
``import graphopt.models`` is cheap and does not need them installed.

Usage::

    from graphopt.models import get_case
    model, inputs = get_case("torchvision.resnet18").build()
    out = model(*inputs)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["ModelCase", "MODEL_CASES", "get_case", "demo_cases", "case_names"]

SEED = 0

Builder = Callable[[], "tuple[nn.Module, tuple[torch.Tensor, ...]]"]


@dataclass(frozen=True)
class ModelCase:
    """One zoo entry.

    ``build()`` returns ``(model, example_inputs)``: the model in eval mode with
    deterministic random weights, and a tuple of positional input tensors.
    """

    name: str
    family: str  # "torchvision" | "timm" | "transformers" | "diffusers"
    build: Builder
    slow: bool = False


# ---------------------------------------------------------------------------
# Wrappers that give library models a positional-tensor forward.
# ---------------------------------------------------------------------------


class KwargsWrapper(nn.Module):
    """Calls ``model(**dict(zip(arg_names, args)), **static_kwargs)``.

    The result is reduced to tensors: ``output_attr`` picks an attribute of a
    ``ModelOutput`` (e.g. ``last_hidden_state``); otherwise a tuple result is
    reduced to its first element (diffusers' ``return_dict=False`` convention).
    """

    def __init__(
        self,
        model: nn.Module,
        arg_names: tuple[str, ...],
        static_kwargs: dict[str, Any] | None = None,
        output_attr: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.arg_names = tuple(arg_names)
        self.static_kwargs = dict(static_kwargs or {})
        self.output_attr = output_attr

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.arg_names, args))
        out = self.model(**kwargs, **self.static_kwargs)
        if self.output_attr is not None:
            return getattr(out, self.output_attr)
        if isinstance(out, (tuple, list)):
            return out[0]
        return out


def _finish(model: nn.Module, *inputs: torch.Tensor) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tuple(inputs)


def _image(batch: int, size: int, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size)


# ---------------------------------------------------------------------------
# torchvision / timm: data-driven tables of (model name, image size, kwargs).
# ---------------------------------------------------------------------------

# name -> (image size, slow)
_TORCHVISION: dict[str, tuple[int, bool]] = {
    "resnet18": (64, False),
    "resnet50": (64, False),
    "mobilenet_v2": (64, False),
    "mobilenet_v3_small": (64, False),
    "efficientnet_b0": (64, False),
    "convnext_tiny": (64, False),
    "densenet121": (64, False),
    "regnet_y_400mf": (64, False),
    "shufflenet_v2_x0_5": (64, False),
    "squeezenet1_0": (64, False),
}


def _torchvision_builder(arch: str, size: int) -> Builder:
    def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        import torchvision

        torch.manual_seed(SEED)
        model = torchvision.models.get_model(arch, weights=None, num_classes=10)
        return _finish(model, _image(1, size))

    build.__name__ = f"build_torchvision_{arch}"
    return build


# name -> (image size, extra create_model kwargs, slow)
_TIMM: dict[str, tuple[int, dict[str, Any], bool]] = {
    "vit_tiny_patch16_224": (64, {"img_size": 64}, False),
    "deit_tiny_patch16_224": (64, {"img_size": 64}, False),
    "swin_tiny_patch4_window7_224": (64, {"img_size": 64, "window_size": 4}, False),
    "resnet18": (64, {}, False),
    "resnet18d": (64, {}, False),
    "convnext_atto": (64, {}, False),
    "efficientnet_b0": (64, {}, False),
    "mobilenetv3_small_050": (64, {}, False),
    "regnetx_002": (64, {}, False),
}


def _timm_builder(arch: str, size: int, kwargs: dict[str, Any]) -> Builder:
    def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        import timm

        torch.manual_seed(SEED)
        model = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)
        return _finish(model, _image(1, size))

    build.__name__ = f"build_timm_{arch}"
    return build


# ---------------------------------------------------------------------------
# Hugging Face transformers: tiny configs (2 layers, hidden 32), seq len 16.
# ---------------------------------------------------------------------------

_ATTN = "sdpa"
_VOCAB = 128
_SEQ = 16


def _token_ids(batch: int = 2, seq: int = _SEQ) -> torch.Tensor:
    return torch.randint(0, _VOCAB, (batch, seq), dtype=torch.long)


def build_bert() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    config = BertConfig(
        vocab_size=_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, attn_implementation=_ATTN,
    )
    model = KwargsWrapper(
        BertModel(config, add_pooling_layer=False),
        ("input_ids", "attention_mask"),
        output_attr="last_hidden_state",
    )
    ids = _token_ids()
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # padding on the second sequence
    return _finish(model, ids, mask)


def build_gpt2() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=_VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
        bos_token_id=0, eos_token_id=0, use_cache=False, attn_implementation=_ATTN,
    )
    model = KwargsWrapper(
        GPT2Model(config), ("input_ids",), {"use_cache": False}, output_attr="last_hidden_state"
    )
    return _finish(model, _token_ids())


def build_llama() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        use_cache=False, attn_implementation=_ATTN,
    )
    model = KwargsWrapper(
        LlamaModel(config), ("input_ids",), {"use_cache": False}, output_attr="last_hidden_state"
    )
    return _finish(model, _token_ids())


_GQA_DECODERS = {  # family: (config class, model class, extra config)
    "mistral": ("MistralConfig", "MistralModel", {}),
    "qwen2": ("Qwen2Config", "Qwen2Model", {}),
    "phi3": ("Phi3Config", "Phi3Model", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gemma": ("GemmaConfig", "GemmaModel", {"head_dim": 16}),
}


def gqa_decoder_builder(family: str, attention: str = _ATTN, kv_cache: bool = False) -> Builder:
    """A decoder with grouped-query attention: 4 query heads share 2 key/value heads.

    ``attention``: ``"sdpa"`` (transformers repeats the key/value heads, ``repeat_kv``, where a mask is
    given, as on CPU), ``"grouped_sdpa"`` (passes them unrepeated to
    ``scaled_dot_product_attention(enable_gqa=True)``, as transformers does on CUDA without a mask) or
    ``"eager"`` (``repeat_kv``, then matmul and softmax). ``kv_cache`` returns the language-model logits with
    the cache on: the empty cache is a 1-D empty tensor that ``torch.cat`` skips.
    """

    def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        import transformers

        config_cls, model_cls, extra = _GQA_DECODERS[family]
        grouped_sdpa = attention == "grouped_sdpa"
        if grouped_sdpa:
            transformers.AttentionInterface.register(_GROUPED_SDPA, _grouped_sdpa_attention)
            transformers.masking_utils.AttentionMaskInterface.register(
                _GROUPED_SDPA, transformers.masking_utils.sdpa_mask)
        torch.manual_seed(SEED)
        config = getattr(transformers, config_cls)(
            vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, use_cache=kv_cache,
            attn_implementation=_GROUPED_SDPA if grouped_sdpa else attention, **extra,
        )
        if kv_cache:
            lm = getattr(transformers, model_cls.replace("Model", "ForCausalLM"))(config)
            return _finish(KwargsWrapper(lm, ("input_ids",), output_attr="logits"), _token_ids())
        model = KwargsWrapper(getattr(transformers, model_cls)(config), ("input_ids",), {"use_cache": False},
                              output_attr="last_hidden_state")
        return _finish(model, _token_ids())

    return build


_GROUPED_SDPA = "graphopt_grouped_sdpa"


def _grouped_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention with the key/value heads always unrepeated (``enable_gqa``)."""
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    causal = mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling, is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def build_t5_encoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(SEED)
    config = T5Config(
        vocab_size=_VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        attn_implementation=_ATTN,
    )
    model = KwargsWrapper(T5EncoderModel(config), ("input_ids",), output_attr="last_hidden_state")
    return _finish(model, _token_ids())


def build_hf_vit() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(SEED)
    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, attn_implementation=_ATTN,
    )
    model = KwargsWrapper(
        ViTModel(config, add_pooling_layer=False), ("pixel_values",), output_attr="last_hidden_state"
    )
    return _finish(model, _image(2, 32))


def build_whisper_encoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(SEED)
    config = WhisperConfig(
        vocab_size=_VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=8, max_target_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1,
        attn_implementation=_ATTN,
    )
    encoder = WhisperModel(config).get_encoder()
    model = KwargsWrapper(encoder, ("input_features",), output_attr="last_hidden_state")
    # The encoder requires 2 * max_source_positions input frames.
    return _finish(model, torch.randn(1, 16, 16))


# ---------------------------------------------------------------------------
# diffusers: tiny denoisers.  Timesteps / labels / ids are tensors.
# ---------------------------------------------------------------------------


def build_unet2d_condition() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=32, attention_head_dim=8,
    )
    model = KwargsWrapper(
        unet, ("sample", "timestep", "encoder_hidden_states"), {"return_dict": False}
    )
    return _finish(
        model,
        torch.randn(1, 4, 16, 16),
        torch.tensor([10], dtype=torch.long),
        torch.randn(1, 8, 32),
    )


def build_dit() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(SEED)
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )
    model = KwargsWrapper(
        dit, ("hidden_states", "timestep", "class_labels"), {"return_dict": False}
    )
    return _finish(
        model,
        torch.randn(1, 4, 8, 8),
        torch.tensor([10], dtype=torch.long),
        torch.tensor([3], dtype=torch.long),
    )


def build_pixart() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(SEED)
    pixart = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=32, caption_channels=32, sample_size=8,
        patch_size=2, use_additional_conditions=False,
    )
    model = KwargsWrapper(
        pixart,
        ("hidden_states", "encoder_hidden_states", "timestep"),
        {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False},
    )
    return _finish(
        model,
        torch.randn(1, 4, 8, 8),
        torch.randn(1, 8, 32),
        torch.tensor([10], dtype=torch.long),
    )


def build_cogvideox(latent_frames: int = 2, layers: int = 2) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(SEED)
    cog = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=32, text_embed_dim=32, num_layers=layers, sample_width=8, sample_height=8,
        sample_frames=4 * (latent_frames - 1) + 1, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8,
    )
    model = KwargsWrapper(
        cog, ("hidden_states", "encoder_hidden_states", "timestep"), {"return_dict": False}
    )
    # (batch, latent frames, channels, height, width); 4 (n - 1) + 1 frames -> n latent frames.
    return _finish(
        model,
        torch.randn(1, latent_frames, 4, 8, 8),
        torch.randn(1, 8, 32),
        torch.tensor([10], dtype=torch.long),
    )


def _text_mask(tokens: int = 8, padding: int = 2) -> torch.Tensor:
    mask = torch.ones(1, tokens, dtype=torch.long)
    mask[0, -padding:] = 0
    return mask


def build_hunyuan_video(layers: int = 1) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``layers`` dual-stream and ``layers`` single-stream blocks."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(SEED)
    hunyuan = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=layers,
        num_single_layers=layers, num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6),
    )
    model = KwargsWrapper(hunyuan, ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask",
                                    "pooled_projections", "guidance"), {"return_dict": False})
    # (batch, channels, frames, height, width); the text mask pads 2 of 8 tokens (a boolean attention mask).
    return _finish(model, torch.randn(1, 4, 2, 8, 8), torch.tensor([10]), torch.randn(1, 8, 32), _text_mask(),
                   torch.randn(1, 32), torch.tensor([3000.0]))


def build_wan() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(SEED)
    wan = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )
    model = KwargsWrapper(wan, ("hidden_states", "timestep", "encoder_hidden_states"), {"return_dict": False})
    return _finish(model, torch.randn(1, 4, 2, 8, 8), torch.tensor([10]), torch.randn(1, 8, 32))


def build_ltx_video() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(SEED)
    ltx = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=2, caption_channels=32,
    )
    model = KwargsWrapper(ltx, ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask"),
                          {"num_frames": 2, "height": 4, "width": 4, "return_dict": False})
    # Packed latents: (batch, frames * height * width, channels).
    return _finish(model, torch.randn(1, 2 * 4 * 4, 8), torch.randn(1, 8, 32), torch.tensor([10]), _text_mask())


def build_flux(layers: int = 1) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``layers`` double-stream and ``layers`` single-stream blocks."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(SEED)
    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    )
    model = KwargsWrapper(
        flux,
        ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids"),
        {"return_dict": False},
    )
    h = w = 4
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return _finish(
        model,
        torch.randn(1, h * w, 16),  # packed latents: (batch, tokens, channels)
        torch.randn(1, 8, 32),
        torch.randn(1, 32),
        torch.tensor([0.5]),
        img_ids.reshape(h * w, 3),
        torch.zeros(8, 3),
    )


def build_sd3(layers: int = 2) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Stable Diffusion 3's MMDiT: joint text/image blocks, the last one updating the image stream only."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(SEED)
    sd3 = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=8,
    )
    model = KwargsWrapper(sd3, ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
                          {"return_dict": False})
    return _finish(model, torch.randn(1, 4, 8, 8), torch.randn(1, 8, 32), torch.randn(1, 32), torch.tensor([10]))


def build_sana(layers: int = 2) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Sana: linear self-attention, cross-attention to the text, a gated conv feed-forward."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(SEED)
    sana = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=layers,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        sample_size=8, patch_size=1,
    )
    model = KwargsWrapper(sana, ("hidden_states", "encoder_hidden_states", "timestep"), {"return_dict": False})
    return _finish(model, torch.randn(1, 4, 8, 8), torch.randn(1, 8, 32), torch.tensor([10]))


def build_mochi(layers: int = 2) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Mochi: asymmetric joint video/text blocks, the last one updating the video stream only."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(SEED)
    mochi = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=layers, pooled_projection_dim=32,
        in_channels=4, text_embed_dim=32, time_embed_dim=32, max_sequence_length=8,
    )
    model = KwargsWrapper(mochi, ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask"),
                          {"return_dict": False})
    # (batch, channels, frames, height, width); the text mask pads 2 of 8 tokens.
    return _finish(model, torch.randn(1, 4, 2, 8, 8), torch.randn(1, 8, 32), torch.tensor([10]), _text_mask())


def build_auraflow(mmdit: int = 2, single: int = 3) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """AuraFlow: joint text/image blocks, then the two streams joined into one for single-stream blocks."""
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(SEED)
    aura = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=mmdit, num_single_dit_layers=single,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        out_channels=4, pos_embed_max_size=16,
    )
    model = KwargsWrapper(aura, ("hidden_states", "encoder_hidden_states", "timestep"), {"return_dict": False})
    return _finish(model, torch.randn(1, 4, 8, 8), torch.randn(1, 8, 32), torch.tensor([0.5]))


def build_allegro(layers: int = 2) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Allegro: a video DiT with 3D rotary embeddings and cross-attention to the text."""
    from diffusers import AllegroTransformer3DModel

    torch.manual_seed(SEED)
    allegro = AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        num_layers=layers, cross_attention_dim=32, sample_height=8, sample_width=8, sample_frames=2,
        caption_channels=32,
    )
    model = KwargsWrapper(allegro, ("hidden_states", "encoder_hidden_states", "timestep"), {"return_dict": False})
    # (batch, channels, frames, height, width)
    return _finish(model, torch.randn(1, 4, 2, 8, 8), torch.randn(1, 8, 32), torch.tensor([10]))


# ---------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------


def _make_registry() -> dict[str, ModelCase]:
    cases: list[ModelCase] = []
    for arch, (size, slow) in _TORCHVISION.items():
        cases.append(ModelCase(f"torchvision.{arch}", "torchvision", _torchvision_builder(arch, size), slow))
    for arch, (size, kwargs, slow) in _TIMM.items():
        cases.append(ModelCase(f"timm.{arch}", "timm", _timm_builder(arch, size, kwargs), slow))
    for short, fn in [
        ("bert", build_bert),
        ("gpt2", build_gpt2),
        ("llama", build_llama),
        ("t5_encoder", build_t5_encoder),
        ("vit", build_hf_vit),
        ("whisper_encoder", build_whisper_encoder),
    ]:
        cases.append(ModelCase(f"transformers.{short}", "transformers", fn))
    for family in _GQA_DECODERS:
        cases.append(ModelCase(f"transformers.{family}", "transformers", gqa_decoder_builder(family), slow=True))
    for short, fn in [
        ("unet2d_condition", build_unet2d_condition),
        ("dit", build_dit),
        ("pixart", build_pixart),
        ("cogvideox", build_cogvideox),
        ("flux", build_flux),
    ]:
        cases.append(ModelCase(f"diffusers.{short}", "diffusers", fn))
    # SD3, Sana, Mochi, AuraFlow and Allegro builders serve the step-cache tests only
    # (Mochi's capture has data-dependent ops).
    for short, fn in [("hunyuan_video", build_hunyuan_video), ("wan", build_wan), ("ltx_video", build_ltx_video)]:
        cases.append(ModelCase(f"diffusers.{short}", "diffusers", fn, slow=True))
    return {c.name: c for c in cases}


MODEL_CASES: dict[str, ModelCase] = _make_registry()

_DEMO_NAMES = ("torchvision.resnet18", "timm.vit_tiny_patch16_224", "diffusers.dit")


def case_names(family: str | None = None, include_slow: bool = True) -> list[str]:
    """Names of registered cases, optionally filtered by family / slowness."""
    return [
        n for n, c in MODEL_CASES.items()
        if (family is None or c.family == family) and (include_slow or not c.slow)
    ]


def get_case(name: str) -> ModelCase:
    """Look up a case by name; the KeyError lists the valid names."""
    try:
        return MODEL_CASES[name]
    except KeyError:
        valid = ", ".join(sorted(MODEL_CASES))
        raise KeyError(f"unknown model case {name!r}; valid names: {valid}") from None


def demo_cases() -> list[ModelCase]:
    """A torchvision ResNet, a timm ViT and a diffusers DiT."""
    return [MODEL_CASES[n] for n in _DEMO_NAMES]
