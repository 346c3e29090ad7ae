"""Calibration's probe of fragile early steps, on a stand-in sampler.

Before: a sweep whose settings keep only their own warm-up, so a reuse at a step
where one reuse already turns a sample into another passes on the calibration
samples and fails on others. Expected: the probed onset, and every setting tried
with its warm-up stretched to it.
"""
import pytest
import torch

from graphopt.errors import GraphoptError
from graphopt.passes.step_cache.calibrate import OneReuse, calibrate, fragile_steps, tightened
from graphopt.passes.step_cache.policies import Curves

STEPS = 50
REFERENCE = torch.linspace(0.2, 0.8, 4 * 64).view(4, 1, 8, 8)
CURVES = Curves(t=[float(t) for t in range(STEPS - 1)])


class Sampler:
    """One reuse before step ``onset`` costs 0.1 RMSE on sample 2 (20 dB); anywhere else, 1e-4 (80 dB)."""

    def __init__(self, onset: int):
        self.onset, self.tried = onset, []

    def __call__(self, policy):
        self.tried.append(policy)
        error = torch.full_like(REFERENCE, 1e-4)
        if isinstance(policy, OneReuse) and policy.at < self.onset:
            error[2] = 0.1
        return REFERENCE + error, 1.0 / (1 + policy.warmup)


def test_one_reuse_may_cost_a_tenth_of_the_budgets_error():
    assert tightened({"psnr": 30, "ssim": 0.92, "rel_error": 0.1}) == pytest.approx(
        {"psnr": 50, "ssim": 0.992, "rel_error": 0.01})


@pytest.mark.parametrize("onset, expected", [(0, 0), (2, 2), (10, 12), (24, 25), (40, 26)])
def test_the_steps_up_to_the_probe_after_the_last_fragile_one_are_kept_computed(onset, expected):
    # probes at steps 1, 2, 3, 5, 8, 12, 16, 20, 25 of 50; fragile past the last probe: the step after it
    assert fragile_steps(Sampler(onset), REFERENCE, STEPS, {"psnr": 30}) == expected


def test_every_setting_is_tried_with_its_warmup_stretched_past_the_fragile_steps():
    sampler = Sampler(onset=10)
    best, trials, fragile = calibrate(sampler, REFERENCE, CURVES, {"psnr": 30}, policies=("fora", "teacache"))
    assert fragile == 12
    assert trials and all(t.spec["warmup"] >= 12 for t in trials)
    settings = [repr(t.spec) for t in trials]
    assert len(settings) == len(set(settings))  # warm-ups 2 and 6 both became 12: each such setting once
    assert best.spec["warmup"] == 12


def test_settings_that_reuse_nothing_meet_no_budget():
    # a run too short for any setting to reuse past its warm-up: exact, and no plan
    def nothing_reused(policy):
        return REFERENCE.clone(), 0.0

    with pytest.raises(GraphoptError, match="no step_cache setting reuses a block in a 50-step run"):
        calibrate(nothing_reused, REFERENCE, CURVES, {"psnr": 30}, policies=("fora",))
