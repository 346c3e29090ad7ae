"""The step-cache runtime as a spec: what each policy computes, skips and keeps apart.

The blocks here are tiny residual MLPs; the pass on real diffusers transformers
is tested in test_step_cache_pass.py.
"""
import pytest
import torch

from graphopt.emitters.state import GraphState
from graphopt.errors import InvalidOptionError
from graphopt.passes.step_cache.policies import Curves, SpanMemory, make_policy
from graphopt.passes.step_cache.runtime import StepCache

BLOCKS = 4


class Block(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, temb):
        return (x + 0.1 * torch.tanh(self.lin(x) + temb),)


def make_cache(policy, blocks=BLOCKS, batched=()):
    # inputs: (stream x, side temb, timestep t); ``batched``: the inputs with a row per sample
    return StepCache([Block(b) for b in range(blocks)], [[("stream", 0), ("input", 1)]] * blocks, streams=1,
                     timestep=2, policy=make_policy(policy), state=GraphState(), batched=batched)


def uncached(x, temb):
    for b in range(BLOCKS):
        x = Block(b)(x, temb)[0]
    return x


def sample(cache, x, steps=10, calls_per_step=1):
    """A toy sampler: x moves a little each step; returns the outputs of every call."""
    outs = []
    for k in range(steps):
        t = torch.full((x.shape[0],), 1.0 - k / steps)
        temb = t[:, None].expand(-1, 8)
        for _ in range(calls_per_step):
            out = cache(x, temb, t)[0]
            outs.append(out)
        x = x + 0.05 * out
    return outs


def test_no_reuse_policies_equal_uncached_exactly():
    x = torch.randn(3, 8)
    for policy in ("none", {"policy": "first_block", "threshold": 0.0}, {"policy": "fora", "interval": 1}):
        cache = make_cache(policy)
        t = torch.ones(3)
        temb = t[:, None].expand(-1, 8)
        for _ in range(3):
            assert torch.equal(cache(x, temb, t)[0], uncached(x, temb))
        assert cache.report()["runs"][0]["skipped"] == 0


def test_fora_interval_2_skips_half_after_warmup():
    cache = make_cache({"policy": "fora", "interval": 2, "warmup": 0})
    sample(cache, torch.randn(2, 8), steps=10)
    run = cache.report()["runs"][0]
    assert run["calls"] == 10 and run["evaluated"] == 5 * BLOCKS * 2 and run["skipped"] == 5 * BLOCKS * 2


def test_a_new_run_starts_when_the_timestep_rises():
    cache = make_cache({"policy": "fora", "interval": 2})
    x = torch.randn(2, 8)
    first = sample(cache, x)
    second = sample(cache, x)
    assert len(cache.report()["runs"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # nothing carried over


def test_each_sample_of_a_batch_gets_what_it_gets_alone():
    torch.manual_seed(0)
    x = torch.randn(4, 8) * torch.tensor([[0.1], [3.0], [0.1], [3.0]])  # two calm, two lively samples
    policy = {"policy": "first_block", "threshold": 0.02, "warmup": 1}
    batched = torch.stack(sample(make_cache(policy), x))
    alone = torch.stack([torch.stack(sample(make_cache(policy), x[i:i + 1]))[:, 0] for i in range(4)], 1)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_with_the_batched_inputs_known_only_recomputing_samples_run_the_blocks():
    torch.manual_seed(0)
    x = torch.randn(4, 8) * torch.tensor([[0.1], [3.0], [0.1], [3.0]])
    policy = {"policy": "first_block", "threshold": 0.02, "warmup": 1}
    cache = make_cache(policy, batched=(1, 2))
    rows = []
    for block in cache.blocks:
        block.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    batched = torch.stack(sample(cache, x))
    alone = torch.stack([torch.stack(sample(make_cache(policy), x[i:i + 1]))[:, 0] for i in range(4)], 1)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert any(0 < r < 4 for r in rows)  # some steps ran part of the batch
    assert sum(rows) == cache.report()["runs"][0]["evaluated"] < 4 * BLOCKS * 10


def test_two_calls_per_step_keep_separate_memories():
    """Classifier-free guidance run as two calls per step (cond, then uncond) at the same timestep."""
    x_cond, x_uncond = torch.randn(1, 8), torch.randn(1, 8) * 2
    policy = {"policy": "first_block", "threshold": 0.05, "warmup": 1}
    shared = make_cache(policy)
    outs = []
    for k in range(8):
        t = torch.full((1,), 1.0 - k / 8)
        temb = t[:, None].expand(-1, 8)
        outs.append((shared(x_cond + 0.01 * k, temb, t)[0], shared(x_uncond - 0.01 * k, temb, t)[0]))
    for branch, x in ((0, x_cond), (1, x_uncond)):
        alone = make_cache(policy)
        for k in range(8):
            t = torch.full((1,), 1.0 - k / 8)
            temb = t[:, None].expand(-1, 8)
            assert torch.equal(alone(x + (0.01 if branch == 0 else -0.01) * k, temb, t)[0], outs[k][branch])


def test_taylor_forecast_of_order_1_is_exact_on_a_residual_linear_in_t():
    memory = SpanMemory()
    for t in (1.0, 0.9):
        memory.remember(t, [torch.full((1, 2), 3.0 * t + 1.0)], keep=2)
    torch.testing.assert_close(memory.forecast(0.7, 1)[0], torch.full((1, 2), 3.0 * 0.7 + 1.0))
    torch.testing.assert_close(memory.forecast(0.7, 0)[0], torch.full((1, 2), 3.0 * 0.9 + 1.0))


def test_taylor_forecast_of_order_2_is_exact_on_a_quadratic():
    memory = SpanMemory()
    for t in (1.0, 0.8, 0.6):
        memory.remember(t, [torch.tensor([[t * t - t]])], keep=3)
    torch.testing.assert_close(memory.forecast(0.3, 2)[0], torch.tensor([[0.09 - 0.3]]))


def test_a_forecast_per_sample_extrapolates_only_that_samples_computed_residuals():
    """Two samples on different lines; at t=0.8 sample 0 reused (its row holds a wrong estimate) while
    sample 1 computed. Sample 0's forecast still runs through its own computed points (1.0 and 0.9):
    an estimate taken as a point would turn its error into a slope."""
    line = [lambda t: 3.0 * t + 1.0, lambda t: -2.0 * t]
    memory = SpanMemory()
    for t in (1.0, 0.9):
        memory.remember(t, [torch.tensor([[line[0](t)], [line[1](t)]])], keep=2)
    reused = torch.tensor([True, False])
    memory.remember(0.8, [torch.tensor([[100.0], [line[1](0.8)]])], keep=2, reused=reused)
    expected = torch.tensor([[line[0](0.6)], [line[1](0.6)]])
    torch.testing.assert_close(memory.forecast(0.6, 1)[0], expected)


def test_a_sample_with_one_computed_step_forecasts_its_residual_unchanged():
    memory = SpanMemory()
    memory.remember(1.0, [torch.tensor([[5.0], [7.0]])], keep=2)
    memory.remember(0.9, [torch.tensor([[0.0], [6.0]])], keep=2, reused=torch.tensor([True, False]))
    torch.testing.assert_close(memory.forecast(0.5, 1)[0], torch.tensor([[5.0], [2.0]]))


def test_calibrated_policies_need_their_curves():
    with pytest.raises(InvalidOptionError, match="magcache reads calibrated span_log_ratio_rate"):
        make_cache("magcache")
    ts = [k / 10 for k in range(1, 10)]  # the toy sampler's timesteps after its first
    curves = Curves(t=ts, span_log_ratio_rate=[0.1] * 9, block_rate=[[0.1] * 9] * BLOCKS)
    cache = StepCache([Block(b) for b in range(BLOCKS)], [[("stream", 0), ("input", 1)]] * BLOCKS, 1, 2,
                      make_policy({"policy": "smoothcache", "alpha": 0.05}, curves), GraphState())
    sample(cache, torch.randn(2, 8))
    assert cache.report()["runs"][0]["skipped"] > 0


def test_a_plans_step_counts_are_stretches_of_timestep_so_they_hold_at_another_step_count():
    # before: warm-up 2 and at most 2 reuses, calibrated on a 10-step run (t = 1.0, 0.9, ..., 0.1)
    curves = Curves(t=[round(1.0 - k / 10, 2) for k in range(9, 0, -1)])
    policy = {"policy": "first_block", "threshold": 1e9, "warmup": 2, "max_reuse": 2}

    def computed(steps):
        cache = StepCache([Block(b) for b in range(BLOCKS)], [[("stream", 0), ("input", 1)]] * BLOCKS, 1, 2,
                          make_policy(policy, curves), GraphState())
        ts = []
        cache.blocks[1].register_forward_hook(lambda *_: ts.append(round(t, 2)))
        x = torch.randn(1, 8)
        for k in range(steps):
            t = 1.0 - k / steps
            x = x + 0.05 * cache(x, torch.full((1, 8), t), torch.full((1,), t))[0]
        return ts

    # expected: at 10 steps, steps 0-1 warm and every third computed; at 20 steps the same stretches of t:
    # warm while t > 0.8 (4 steps), then at most 0.2 of t (4 steps) reused in a row
    assert computed(10) == [1.0, 0.9, 0.6, 0.3]
    assert computed(20) == [1.0, 0.95, 0.9, 0.85, 0.6, 0.35, 0.1]
    # at 5 steps the warm-up still spans 2 of this run's steps (t > 0.8 alone would be 1), then one reuse (0.2 of t)
    assert computed(5) == [1.0, 0.8, 0.4]


@pytest.mark.parametrize("spec, message", [
    ("fast", "unknown step_cache policy 'fast'; policies: none, fora"),
    ({"policy": "fora", "threshold": 0.1}, "step_cache policy fora has no option threshold; its options: warmup"),
    ({"policy": "dbcache", "front": 2, "back": 2}, "front \\+ back must leave a middle of the 4 blocks"),
])
def test_bad_policies_get_one_line(spec, message):
    with pytest.raises(InvalidOptionError, match=message):
        make_cache(spec)
