"""The shipped moving-digits video DiT: its data, its samples, and step caching on it.

Quality metric for caching: PSNR per frame against the uncached clips of the
same seed; bounds are set on this trained model.
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import graphopt.diffusers as gd  # noqa: E402
from graphopt import digits, moving_digits as md, quality  # noqa: E402
from graphopt.errors import InvalidOptionError  # noqa: E402

LABELS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 8]
STEPS = 20


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(2)
    return md.load_moving_digits_pipeline()


@pytest.fixture(scope="module")
def score():
    return quality.ClassifierScore(digits.load_digits_classifier())


def sample(pipe, labels=LABELS, seed=0, **kwargs):
    return pipe(labels, num_inference_steps=kwargs.pop("num_inference_steps", STEPS),
                generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.fixture(scope="module")
def reference(pipe):
    return sample(pipe)


def centroids(clips):
    """[B, F, 2] brightness centroid (row, column) of every frame."""
    frames = clips[:, :, 0]
    grid = torch.arange(clips.shape[-1], dtype=torch.float32)
    mass = frames.sum(dim=(2, 3))
    return torch.stack([(frames.sum(3) * grid).sum(2) / mass, (frames.sum(2) * grid).sum(2) / mass], dim=-1)


def test_a_training_clip_is_one_digit_on_a_straight_bouncing_path():
    # before: [N, 1, 12, 12] digits; expected: each frame is blank but for the whole digit, moved by a constant
    # velocity that flips sign at a wall
    images, _ = digits.digits_images(md.DIGIT)
    clips = md.moving_clips(images[:50], torch.Generator().manual_seed(0))
    assert clips.shape == (50, md.FRAMES, 1, md.CANVAS, md.CANVAS)
    assert torch.equal((clips > -1).flatten(2).sum(2), (images[:50] > -1).flatten(1).sum(1, keepdim=True)
                       .expand(50, md.FRAMES))  # the whole digit in every frame, nothing else
    step = centroids(clips / 2 + 0.5).diff(dim=1).abs()
    assert (step <= md.MAX_SPEED + 1e-4).all()
    assert (step.flatten(1).amax(1) > 0).float().mean() > 0.8  # nearly every digit moves


def test_packing_into_latents_round_trips():
    clips, _ = md.moving_digits_clips(3)
    latents = md.pack_video(clips)
    assert latents.shape == (3, 16, md.FRAMES, md.CANVAS // 4, md.CANVAS // 4)
    assert torch.equal(md.unpack_video(latents), clips)


def test_centered_digits_let_the_digits_classifier_read_real_clips(score):
    clips, labels = md.moving_digits_clips(100, seed=3)
    crops = md.centered_digits(clips / 2 + 0.5)
    assert crops.shape == (100 * md.FRAMES, 1, 32, 32)
    assert score.accuracy(crops, labels.repeat_interleave(md.FRAMES)) >= 0.95


def test_samples_are_clips_of_the_requested_digits_moving(reference, score):
    # before: nothing trained shipped; expected: the classifier reads the requested digit in most frames, and
    # the digit's centre moves between frames at about the training data's speeds
    assert reference.shape == (len(LABELS), md.FRAMES, 1, md.CANVAS, md.CANVAS)
    assert 0.0 <= reference.min() and reference.max() <= 1.0
    crops = md.centered_digits(reference)
    assert score.accuracy(crops, torch.tensor(LABELS).repeat_interleave(md.FRAMES)) >= 0.6
    speed = centroids(reference).diff(dim=1).norm(dim=-1)
    assert speed.median() <= 2 * md.MAX_SPEED
    assert (speed.mean(dim=1) > 0.3).float().mean() >= 0.5


def test_the_long_variant_samples_its_digits_moving_on_a_larger_canvas(score):
    # before: the short variant's 6 frames of 24 x 24; expected: 8 frames of 32 x 32 (512 tokens), trained less (40
    # minutes): the classifier reads the requested digit in a third of the frames (chance: a tenth), and it moves
    long = md.load_moving_digits_pipeline("long")
    clips = sample(long)
    assert clips.shape == (len(LABELS), md.LONG.frames, 1, md.LONG.canvas, md.LONG.canvas) and md.LONG.tokens == 512
    assert score.accuracy(md.centered_digits(clips), torch.tensor(LABELS).repeat_interleave(md.LONG.frames)) >= 0.3
    speed = centroids(clips).diff(dim=1).norm(dim=-1)
    assert speed.median() <= 2 * md.MAX_SPEED and (speed.mean(dim=1) > 0.3).float().mean() >= 0.5


def test_an_unknown_variant_is_refused_in_one_line():
    with pytest.raises(InvalidOptionError, match=r"no moving-digits variant 'huge'; use one of \['long', 'short'\]"):
        md.load_moving_digits_pipeline("huge")


def test_samples_beat_noise_on_the_classifiers_features(reference, score):
    images, _ = digits.digits_images()
    data = images[:200] / 2 + 0.5
    noise = torch.rand_like(reference)
    fd = score.frechet_distance(md.centered_digits(reference), data)
    assert fd < score.frechet_distance(md.centered_digits(noise), data)


def test_batched_and_separate_guidance_passes_agree(pipe, reference):
    separate = sample(pipe, labels=LABELS[:3], batch_cfg=False)
    torch.testing.assert_close(separate, reference[:3], atol=1e-4, rtol=0)


def test_bad_latents_get_one_line(pipe):
    with pytest.raises(InvalidOptionError, match="latents must have shape"):
        pipe([1], num_inference_steps=2, latents=torch.zeros(1, 1, 32, 32))


@pytest.mark.slow
def test_step_caching_finds_the_wan_blocks_and_keeps_quality(pipe, reference):
    # a policy that never reuses: the clips exactly; FORA interval 2: about half the blocks skipped, PSNR per
    # frame bounded on this trained model
    try:
        gd.optimize(pipe, step_cache="none")
        torch.testing.assert_close(sample(pipe), reference, atol=1e-5, rtol=0)
        gd.optimize(pipe, step_cache={"policy": "fora", "interval": 2})
        cached = sample(pipe)
        assert 0.4 <= pipe.graphopt.denoiser.skipped_fraction() <= 0.5
        assert quality.psnr(cached, reference) >= 24
    finally:
        gd.restore(pipe)


@pytest.mark.slow
def test_auto_calibrated_on_four_clips_holds_its_budget_on_32_it_never_saw(pipe):
    # Before the probe of fragile steps, auto picked TaylorSeer with a 6-step warm-up here: 30 dB on the
    # calibration clips, 28.3 dB on these; a reuse in the first steps turned some clips into others.
    held_out = [i % 10 for i in range(32)]
    reference = sample(pipe, held_out, seed=1234, num_inference_steps=50)
    try:
        gd.optimize(pipe, step_cache="auto", quality={"psnr": 30, "ssim": 0.92}, progress=False,
                    calibration={"class_labels": [0, 3, 5, 8], "seed": 7, "num_inference_steps": 50})
        plan = pipe.graphopt.plan
        assert plan.fragile_steps >= 8 and plan.spec["warmup"] >= plan.fragile_steps
        cached = sample(pipe, held_out, seed=1234, num_inference_steps=50)
        assert pipe.graphopt.denoiser.skipped_fraction() >= 0.5
        assert quality.psnr(cached, reference) >= 30 and quality.ssim(cached, reference) >= 0.92
    finally:
        gd.restore(pipe)
