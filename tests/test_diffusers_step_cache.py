"""``graphopt.diffusers``: step caching on a diffusers pipeline, on the trained digits DiT.

Quality metric: PSNR (and SSIM) of the cached images against the uncached
images of the same seed; bounds are set on this trained model, where caching
quality means something. Tests share one pipeline: ``optimize`` on an optimized
pipeline swaps the policy and keeps the captured graphs.
"""
import json
import logging
import re

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

import graphopt.diffusers as gd
from graphopt.digits import load_digits_pipeline
from graphopt.errors import GraphoptError, InvalidOptionError
from graphopt.quality import psnr, ssim

LABELS = [1, 4, 7, 9]
STEPS = 20


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(2)
    return load_digits_pipeline()


@pytest.fixture(scope="module")
def reference(pipe):
    return sample(pipe)


def sample(pipe, labels=LABELS, steps=STEPS, seed=0, **kwargs):
    return pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)


def skipped(pipe):
    return pipe.graphopt.denoiser.skipped_fraction()


def test_a_policy_that_never_reuses_changes_nothing(pipe, reference):
    gd.optimize(pipe, step_cache={"policy": "first_block", "threshold": 0.0})
    torch.testing.assert_close(sample(pipe), reference, atol=1e-5, rtol=0)
    assert skipped(pipe) == 0.0


def test_restore_gives_back_the_uncached_pipeline_exactly(pipe, reference):
    gd.optimize(pipe, step_cache={"policy": "fora", "interval": 3})
    assert not torch.equal(sample(pipe), reference)
    gd.restore(pipe)
    assert torch.equal(sample(pipe), reference)
    assert "forward" not in vars(pipe.transformer) and "set_timesteps" not in vars(pipe.scheduler)


def test_interval_2_skips_about_half_and_keeps_quality(pipe, reference):
    gd.optimize(pipe, step_cache={"policy": "fora", "interval": 2})
    images = sample(pipe)
    report = gd.report(pipe)["graphs"][0]["runs"][-1]
    assert report["calls"] == STEPS and 0.3 < report["skipped_fraction"] < 0.5  # warm-up and the tail block run
    assert psnr(images, reference) > 25


def test_every_run_starts_from_empty_state(pipe):
    gd.optimize(pipe, step_cache={"policy": "first_block", "threshold": 0.1})
    assert torch.equal(sample(pipe), sample(pipe))
    assert len(gd.report(pipe)["graphs"][0]["runs"]) == 2


def test_guidance_branches_keep_their_own_state(pipe):
    """Cond and uncond batched in one call, or two calls per step: the same decisions, the same images."""
    gd.optimize(pipe, step_cache={"policy": "first_block", "threshold": 0.1})
    batched = sample(pipe, batch_cfg=True)
    sequential = sample(pipe, batch_cfg=False)
    torch.testing.assert_close(batched, sequential, atol=1e-4, rtol=0)


def test_each_sample_of_a_batch_gets_what_it_gets_alone(pipe):
    noise = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    gd.optimize(pipe, step_cache={"policy": "first_block", "threshold": 0.1})
    batched = pipe(LABELS, num_inference_steps=STEPS, latents=noise)
    alone = torch.cat([pipe([c], num_inference_steps=STEPS, latents=noise[i:i + 1]) for i, c in enumerate(LABELS)])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def saved_plan(pipe, reference, tmp_path_factory):
    """A plan calibrated on the pipeline (other classes and seed than the tests sample; after the uncached
    ``reference``), saved; and the held-out samples it gives."""
    gd.optimize(pipe, step_cache="auto", quality={"psnr": 30, "ssim": 0.92},
                calibration={"class_labels": [0, 2, 5, 8], "num_inference_steps": STEPS, "seed": 11}, progress=False)
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    pipe.graphopt.plan.save(path)
    return pipe.graphopt.plan, path, sample(pipe)


@pytest.mark.slow
def test_calibration_meets_the_budget_and_the_plan_round_trips(pipe, reference, saved_plan):
    plan, path, held_out = saved_plan
    assert plan.measured["psnr"] >= 30 and plan.measured["ssim"] >= 0.92 and plan.skipped > 0.3
    assert psnr(held_out, reference) >= 28 and ssim(held_out, reference) >= 0.9
    assert json.loads(path.read_text())["fingerprint"] == gd.fingerprint(pipe)
    gd.optimize(pipe, step_cache=str(path))
    torch.testing.assert_close(sample(pipe), held_out, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", [UniPCMultistepScheduler, DPMSolverMultistepScheduler])
def test_a_plan_carries_to_another_scheduler(saved_plan, scheduler, caplog):
    """Decisions are keyed on the timestep: a plan calibrated with the Euler flow scheduler keeps its
    quality under a multistep solver, with a warning that names both."""
    _, path, _ = saved_plan
    other = load_digits_pipeline()
    other.scheduler = scheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                flow_shift=1.0)
    reference = sample(other)
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        gd.optimize(other, step_cache=str(path))
    assert f"calibrated with FlowMatchEulerDiscreteScheduler, used with {scheduler.__name__}" in caplog.text
    cached = sample(other)
    assert psnr(cached, reference) >= 28 and ssim(cached, reference) >= 0.9
    assert skipped(other) > 0.3


def test_a_plan_for_another_model_is_refused(pipe, tmp_path):
    plan = {"plan": "graphopt.step_cache/1", "policy": "fora", "interval": 2, "curves": {"t": [0.0, 1.0]},
            "fingerprint": {"model": "0123456789abcdef", "scheduler": "FlowMatchEulerDiscreteScheduler"},
            "quality": {"psnr": 30}, "measured": {"psnr": 31}, "skipped_fraction": 0.5}
    with pytest.raises(InvalidOptionError, match="calibrated on another model"):
        gd.optimize(pipe, step_cache=plan)


def test_an_unreachable_budget_says_what_the_best_reached(pipe):
    with pytest.raises(GraphoptError, match="no step_cache policy meets .* the closest, .* reached psnr"):
        gd.optimize(pipe, step_cache="fora", quality={"psnr": 200},
                    calibration={"class_labels": [0], "num_inference_steps": 8}, progress=False)
    assert getattr(pipe, "graphopt", None) is None  # nothing left installed


@pytest.mark.parametrize("kwargs, message", [
    ({"step_cache": "sometimes"}, "unknown step_cache policy 'sometimes'"),
    ({"step_cache": {"policy": "fora", "threshold": 1}}, "fora has no option threshold"),
    ({"step_cache": "auto"}, "step_cache='auto' calibrates to a budget: give quality="),
    ({"step_cache": "auto", "quality": {"fid": 3}}, "quality must map one or more of psnr, ssim, rel_error"),
    ({"step_cache": "auto", "quality": {"psnr": 30}}, "calibrating needs the samples to run: calibration="),
])
def test_bad_input_gets_one_line(pipe, kwargs, message):
    with pytest.raises(InvalidOptionError, match=message):
        gd.optimize(pipe, **kwargs)


def test_cached_blocks_are_captured_cleaned_up():
    """Before: Wan's rotary embedding writes two strided halves into an empty buffer (captured as the buffer,
    a mask and a where per half). Expected: the cached blocks join the halves in one concat each, with no
    where and no buffer left (cleanup ran before the pass), and sampling matches the uncached pipeline."""
    from graphopt.moving_digits import load_moving_digits_pipeline

    video = load_moving_digits_pipeline()
    reference = sample(video, labels=[3], steps=2)
    gd.optimize(video, step_cache={"policy": "teacache", "threshold": 0.0})
    assert torch.equal(sample(video, labels=[3], steps=2), reference)
    code = "\n".join(block.code for cache in video.graphopt.denoiser.step_caches() for block in cache.blocks)
    assert "where" not in code and "empty" not in code and "concat" in code


def test_a_pipeline_without_a_transformer_is_refused():
    with pytest.raises(InvalidOptionError, match="needs a pipeline with a transformer denoiser"):
        gd.optimize(object(), step_cache="fora")


def calibrated(pipe, spec):
    """A plan whose curves span the schedule, so decisions read calibrated curves (numpy interpolation)."""
    t = [float(x) for x in torch.linspace(0.01, 1.0, STEPS)]
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    curves = {"t": t, "block_rate": [[1e-4] * len(t)] * blocks}
    return {"plan": "graphopt.step_cache/1", **spec, "curves": curves, "fingerprint": gd.fingerprint(pipe),
            "quality": {"psnr": 30}, "measured": {"psnr": 31}, "skipped_fraction": 0.5}


@pytest.mark.parametrize("spec", [{"policy": "fora", "interval": 2},
                                  {"policy": "smoothcache", "alpha": 0.05},
                                  {"policy": "first_block", "threshold": 0.1}], ids=lambda s: s["policy"])
def test_under_torch_compile_blocks_compile_whole_and_steps_do_not_recompile(pipe, spec):
    """The policy's decisions run on the host, outside the compiled graphs (their one break, at the cached
    span's entry), even where they read calibrated curves; the blocks compile whole, once."""
    from torch._dynamo.utils import counters

    gd.optimize(pipe, step_cache=calibrated(pipe, spec))
    eager = sample(pipe)
    original = pipe.transformer
    torch._dynamo.reset()
    counters.clear()
    pipe.transformer = torch.compile(original, backend="eager")
    try:
        compiled = sample(pipe)
        graphs = counters["stats"]["unique_graphs"]
        again = sample(pipe, seed=5)
    finally:
        pipe.transformer = original
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs  # a second run, other noise: nothing recompiled
    assert not torch.equal(again, compiled)
    reasons = [str(r) for r in counters["graph_break"]]
    assert all("disable" in r.lower() for r in reasons), reasons


def test_under_torch_compile_the_cached_span_compiles_as_one_graph(pipe):
    """The middle span's blocks are traced as one frame, into one graph: one graph a block leaves inductor
    no fusion across their boundaries and costs a guard check per block."""
    graphs: list[set[str]] = []  # per graph, the step cache's blocks whose weights it reads

    def backend(gm, example_inputs):
        graphs.append({m.group(1) for node in gm.graph.nodes
                       for m in [re.match(r"l_self_modules_blocks_modules_(\d+)_", node.name)] if m})
        return gm.forward

    gd.optimize(pipe, step_cache={"policy": "first_block", "threshold": 0.1})
    sample(pipe, steps=2)  # captures, eager
    original = pipe.transformer
    torch._dynamo.reset()
    pipe.transformer = torch.compile(original, backend=backend)
    try:
        sample(pipe, steps=4)
    finally:
        pipe.transformer = original
        gd.restore(pipe)
    spans = [blocks for blocks in graphs if blocks]  # graphs traced from the step cache's own frame
    assert max(map(len, spans), default=0) >= 3, graphs  # the middle, every block of it
