"""The shipped digits DiT pipeline and the quality metrics that judge lossy passes on it."""
from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

diffusers = pytest.importorskip("diffusers")

from graphopt import digits, quality  # noqa: E402
from graphopt.errors import InvalidOptionError  # noqa: E402

TWO_PER_CLASS = [digit for digit in range(10) for _ in range(2)]


@pytest.fixture(scope="module")
def pipe():
    return digits.load_digits_pipeline()


@pytest.fixture(scope="module")
def score():
    return quality.ClassifierScore(digits.load_digits_classifier())


def sample(pipe, labels=TWO_PER_CLASS, seed=0, **kwargs):
    return pipe(labels, num_inference_steps=kwargs.pop("num_inference_steps", 20),
                generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.fixture(scope="module")
def reference(pipe):
    return sample(pipe)


def test_samples_are_images_of_the_requested_digits(reference, score):
    # before: nothing trained shipped; expected: 20 steps, two samples per digit, the classifier reads most right
    assert reference.shape == (20, 1, 32, 32) and reference.dtype == torch.float32
    assert 0.0 <= reference.min() and reference.max() <= 1.0
    assert score.accuracy(reference, TWO_PER_CLASS) >= 0.8


def test_samples_are_closer_to_the_data_than_noise_is(reference, score):
    images, _ = digits.digits_images()
    data = images[:200] / 2 + 0.5
    noise = torch.rand(20, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert score.frechet_distance(reference, data) < score.frechet_distance(noise, data)


def test_same_seed_gives_the_same_samples_and_another_seed_does_not(pipe, reference):
    assert torch.equal(sample(pipe), reference)
    assert not torch.allclose(sample(pipe, labels=TWO_PER_CLASS[:2], seed=1), reference[:2])


def test_batched_and_separate_guidance_passes_agree(pipe, reference):
    # batch_cfg=False calls the transformer twice per step instead of once on a doubled batch
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        separate = sample(pipe, num_inference_steps=20, batch_cfg=False)
    finally:
        hook.remove()
    assert len(calls) == 40
    assert (separate - reference).abs().max() < 1e-4


def test_guidance_scale_one_skips_the_unconditional_pass(pipe):
    batch_sizes = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        sample(pipe, labels=[3, 4], num_inference_steps=2, guidance_scale=1.0)
        sample(pipe, labels=[3, 4], num_inference_steps=2)
    finally:
        hook.remove()
    assert batch_sizes == [2, 2, 4, 4]


def test_diffusers_first_block_cache_hooks_apply_to_the_transformer(pipe, reference):
    # threshold 0.05 never skips on this model at 20 steps (output identical); 0.2 skips some steps (PSNR ~40 dB)
    pipe.transformer.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.2))
    try:
        cached = sample(pipe)
    finally:
        pipe.transformer.disable_cache()
    assert not torch.equal(cached, reference)
    assert quality.psnr(cached, reference) > 30
    assert torch.equal(sample(pipe), reference)


def test_bad_class_labels_get_a_one_line_error(pipe):
    with pytest.raises(InvalidOptionError, match="digits 0-9"):
        pipe([3, 12], num_inference_steps=1)


def test_psnr_and_ssim_match_torchmetrics(reference):
    noisy = (reference + 0.05 * torch.randn(reference.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert quality.psnr(noisy, reference) == pytest.approx(float(peak_signal_noise_ratio(noisy, reference, data_range=1.0)))
    assert quality.ssim(noisy, reference) == pytest.approx(
        float(structural_similarity_index_measure(noisy, reference, data_range=1.0)))
    assert 20 < quality.psnr(noisy, reference) < 40 and 0 < quality.ssim(noisy, reference) < 1


def test_identical_images_have_infinite_psnr_and_unit_ssim(reference):
    assert quality.psnr(reference, reference) == math.inf
    assert quality.ssim(reference, reference) == pytest.approx(1.0)


def test_per_sample_values_score_each_sample_alone(reference):
    changed = reference.clone()
    changed[1] = (changed[1] + 0.1).clamp(0, 1)
    per_sample = quality.psnr(changed, reference, per_sample=True)
    assert len(per_sample) == 20 and per_sample[0] == math.inf and math.isfinite(per_sample[1])
    assert per_sample[1] == pytest.approx(quality.psnr(changed[1:2], reference[1:2]))
    ssims = quality.ssim(changed, reference, per_sample=True)
    assert ssims[0] == pytest.approx(1.0) and ssims[1] == pytest.approx(quality.ssim(changed[1:2], reference[1:2]))


def test_videos_are_scored_per_frame_and_averaged():
    generator = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 1, 32, 32, generator=generator)
    noisy = (video + 0.05 * torch.randn(video.shape, generator=generator)).clamp(0, 1)
    frame_psnrs = [float(peak_signal_noise_ratio(noisy[:, f], video[:, f], data_range=1.0)) for f in range(3)]
    assert quality.psnr(noisy, video) == pytest.approx(sum(frame_psnrs) / 3)
    assert quality.ssim(noisy, video) == pytest.approx(
        float(structural_similarity_index_measure(noisy.flatten(0, 1), video.flatten(0, 1), data_range=1.0)))
    assert len(quality.psnr(noisy, video, per_sample=True)) == 2


def test_mismatched_shapes_get_a_one_line_error(reference):
    with pytest.raises(InvalidOptionError, match="does not match"):
        quality.psnr(reference, reference[:3])
    with pytest.raises(InvalidOptionError, match="does not match"):
        quality.ssim(reference, reference[..., :16])
