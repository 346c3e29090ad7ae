"""Spec for benchmarks/step_cache_anchors.py: every third-party step cache applies to a custom
FLUX pipeline and to the moving-digits Wan pipeline, changes its output at the most aggressive
setting, and ``remove`` gives back the exact uncached output."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.step_cache_anchors import anchor_methods  # noqa: E402
from graphopt.moving_digits import load_moving_digits_pipeline  # noqa: E402

STEPS = 10
LATENT_SIDE = 8  # 8x8 tokens of 4 channels (the digits model packs 2x2 pixels of a 1-channel image)
CONDITION_DIM = 32


class StandInDigitsPipeline(DiffusionPipeline):
    """Same interface and transformer call as graphopt.digits' pipeline, random weights, smaller latents."""

    def __init__(self, transformer, scheduler, class_embedding):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, class_embedding=class_embedding)

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps=STEPS, guidance_scale=3.0, generator=None, batch_cfg=True):
        batch = len(class_labels)
        null_label = self.class_embedding.num_embeddings - 1
        cond = self.class_embedding(torch.tensor(class_labels))
        uncond = self.class_embedding(torch.full((batch,), null_label))
        tokens = LATENT_SIDE * LATENT_SIDE
        latents = torch.randn(batch, tokens, 4, generator=generator)
        rows, cols = torch.meshgrid(torch.arange(LATENT_SIDE), torch.arange(LATENT_SIDE), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(tokens, 3).float()
        txt_ids = torch.zeros(1, 3)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:

            def denoise(x, embedding):
                return self.transformer(
                    hidden_states=x,
                    encoder_hidden_states=embedding[:, None, :],
                    pooled_projections=embedding,
                    timestep=(t / 1000).expand(x.shape[0]),
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                    return_dict=False,
                )[0]

            if batch_cfg:
                v_cond, v_uncond = denoise(torch.cat([latents, latents]), torch.cat([cond, uncond])).chunk(2)
            else:
                v_cond, v_uncond = denoise(latents, cond), denoise(latents, uncond)
            latents = self.scheduler.step(v_uncond + guidance_scale * (v_cond - v_uncond), t, latents).prev_sample
        image = latents.reshape(batch, LATENT_SIDE, LATENT_SIDE, 2, 2).permute(0, 1, 3, 2, 4)
        return image.reshape(batch, 1, 2 * LATENT_SIDE, 2 * LATENT_SIDE).clamp(-1, 1) * 0.5 + 0.5


def build_stand_in_pipeline() -> StandInDigitsPipeline:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=CONDITION_DIM, pooled_projection_dim=CONDITION_DIM,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    return StandInDigitsPipeline(transformer, FlowMatchEulerDiscreteScheduler(), torch.nn.Embedding(11, CONDITION_DIM))


CALL = dict(class_labels=[3], guidance_scale=3.0)


def sample(pipe, batch_cfg):
    return pipe(**CALL, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1), batch_cfg=batch_cfg)


def methods(batch_cfg):
    calibration = dict(CALL, generator=torch.Generator().manual_seed(2), batch_cfg=batch_cfg)
    return anchor_methods(num_inference_steps=STEPS, calibration_kwargs=calibration, separate_cfg_calls=not batch_cfg)


METHODS = methods(batch_cfg=True)
NAMES = list(dict.fromkeys(method.name for method in METHODS))


def test_every_tool_has_several_settings():
    names = [method.name for method in METHODS]
    expected = {
        "diffusers.first_block", "diffusers.pyramid_attention_broadcast", "diffusers.taylorseer",
        "diffusers.mag_cache", "diffusers.faster_cache_attention", "diffusers.sea_cache",
        "cache_dit.dbcache", "cache_dit.dbcache_taylorseer",
    }
    assert set(names) == expected
    assert all(names.count(name) >= 3 for name in expected)


PIPELINES = {"flux": build_stand_in_pipeline, "wan": load_moving_digits_pipeline}


@pytest.mark.parametrize("model", PIPELINES)
@pytest.mark.parametrize("batch_cfg", [True, False], ids=["batch_cfg", "separate_cfg"])
@pytest.mark.parametrize("name", NAMES)
def test_aggressive_setting_changes_output_and_remove_restores_it(name, batch_cfg, model):
    torch.set_num_threads(1)
    method = [m for m in methods(batch_cfg) if m.name == name][-1]  # settings are listed light to aggressive
    pipe = PIPELINES[model]()
    before = sample(pipe, batch_cfg)

    method.apply(pipe)
    cached = sample(pipe, batch_cfg)
    cached_again = sample(pipe, batch_cfg)
    skipped = method.skipped(pipe)
    method.remove(pipe)
    after = sample(pipe, batch_cfg)

    assert not torch.equal(cached, before), f"{method.name} {method.setting} skipped nothing in {STEPS} steps"
    assert torch.equal(cached_again, cached), "cache state leaked from one sampling run into the next"
    assert 0 < skipped < 1
    assert torch.equal(after, before)
    assert pipe.transformer.forward.__func__ is type(pipe.transformer).forward, "the transformer's own forward is back"
