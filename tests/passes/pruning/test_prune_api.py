"""``graphopt.prune``: modules come back smaller and fine-tunable, graphs are pruned in place, bad input is refused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.models import get_case
from graphopt.passes.pruning import Pruner, build_groups, count_params


def prunable_channels(graph: graphopt.Graph) -> int:
    return sum(g.size for g in build_groups(graph) if g.prunable)


@pytest.fixture(scope="module")
def resnet18() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return get_case("torchvision.resnet18").build()


@pytest.mark.slow
def test_resnet18_ratio_half_halves_channels_and_runs(resnet18):
    model, inputs = resnet18
    graph = graphopt.optimize(graphopt.capture(model, inputs), "O1")
    channels, params = prunable_channels(graph), count_params(graph)
    assert graphopt.prune(graph, ratio=0.5, round_to=8) is graph
    graph.verify(check_types=True)
    assert 0.4 * channels <= prunable_channels(graph) <= 0.6 * channels
    assert count_params(graph) < 0.5 * params
    assert graph.meta["pruning_plan"].removed > 0
    out = graph.to_torch()(*inputs)
    assert out.shape == model(*inputs).shape and torch.isfinite(out).all()


@pytest.mark.slow
def test_resnet18_module_is_fine_tunable(resnet18):
    model, inputs = resnet18
    pruned = graphopt.prune(model, inputs, ratio=0.5, importance="taylor")
    params = list(pruned.parameters())
    assert params and all(isinstance(p, nn.Parameter) and p.requires_grad for p in params)
    assert sum(p.numel() for p in params) < 0.5 * sum(p.numel() for p in model.parameters())
    loss = pruned(*inputs).square().sum()
    loss.backward()
    assert all(p.grad is not None for p in params)
    before = model.conv1.weight.detach().clone()
    torch.optim.SGD(params, lr=0.1).step()
    assert torch.equal(model.conv1.weight, before)  # the original model is not fine-tuned along


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_module_comes_back_smaller_and_runs():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    pruned = graphopt.prune(model, (x,), ratio=0.5, importance="l1", round_to=4)
    assert isinstance(pruned, torch.fx.GraphModule)
    assert pruned(x).shape == (2, 10)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(isinstance(p, nn.Parameter) for p in pruned.parameters())
    assert model.conv1.weight.shape == (16, 3, 3, 3)  # the original module is left alone


def test_ignored_layers_and_random_importance():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 3, 8, 8)
    graph = graphopt.optimize(graphopt.capture(model, (x,)), "O1")
    graphopt.prune(graph, ratio=0.5, importance="random", ignored=["conv1"], seed=3)
    assert graph.constants["conv1.weight"].data.shape[0] == 16
    assert graph.constants["conv2.weight"].data.shape == (16, 16, 3, 3)
    with pytest.raises(ValueError, match="ignored layer 'nope'"):
        graphopt.prune(graph, ratio=0.5, ignored=["nope"])


def test_macs_target():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    graph = graphopt.optimize(graphopt.capture(Net().eval(), (x,)), "O1")
    from graphopt.passes.pruning import count_macs

    limit = count_macs(graph) // 3
    graphopt.prune(graph, target={"macs": limit})
    assert count_macs(graph) <= limit


@pytest.mark.slow
def test_latency_target_prunes_to_a_plan_its_own_timer_accepted(monkeypatch):
    """The real timer drives the search; no assertion depends on how fast this machine is at the moment
    (the speed itself is shown in benchmarks/prune_speed.py): the graph shrinks, and the plan kept is
    one whose timing the search saw under the target.

    The target is 0.6x the dense time. When a load spike slowed the timings that set it so much that the
    search then times the dense graph under it, keeping the dense graph is right; the target is set
    again from that timing and the search rerun (at most five tries: CI once saw three in a row)."""
    from graphopt.passes.pruning import count_macs, measure_latency, plan as plan_module

    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    dense = graphopt.optimize(graphopt.capture(Net().eval(), (x,)), "O1")
    dense_macs = count_macs(dense)
    dense_ms = min(measure_latency(dense, (x,)) for _ in range(3))
    timed: list[tuple[int, float]] = []

    def recording_timer(g: graphopt.Graph, *args, **kwargs) -> float:
        ms = measure_latency(g, *args, **kwargs)
        timed.append((count_macs(g), ms))
        return ms

    monkeypatch.setattr(plan_module, "measure_latency", recording_timer)
    for _ in range(5):
        limit, graph = 0.6 * dense_ms, dense.clone()
        timed.clear()
        graphopt.prune(graph, (x,), target={"latency_ms": limit})
        if timed[0][1] > limit:
            break
        assert count_macs(graph) == dense_macs  # a dense graph under the target is kept whole
        dense_ms = timed[0][1]
    assert count_macs(graph) < dense_macs
    assert len(timed) > 2  # the dense graph, the largest ratio, and bisection steps were timed
    assert any(macs == count_macs(graph) and ms <= limit for macs, ms in timed)


@pytest.mark.slow
def test_head_pruning_modes_are_passed_through():
    graph = graphopt.optimize(graphopt.capture(*get_case("timm.vit_tiny_patch16_224").build()), "O1")
    with_heads = Pruner(graph, heads="heads").groups
    with_dims = Pruner(graph, heads="head_dim").groups
    assert sorted(g.size for g in with_heads) != sorted(g.size for g in with_dims)


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.0}, r"ratio must be a number in \[0, 1\)"),
    ({"ratio": -0.1}, r"ratio must be"),
    ({"importance": "magic"}, "unknown importance"),
    ({"importance": "taylor", "example_inputs": None}, "needs gradients"),
    ({"example_inputs": None}, "pass example_inputs"),
    ({"round_to": 0}, "round_to"),
    ({"heads": "all"}, "heads must be"),
    ({"target": {"flops": 3}}, "target must be"),
    ({"target": {"latency_ms": 1.0}, "example_inputs": None}, "pass example_inputs"),
])
def test_bad_arguments_are_one_clear_value_error(kwargs, message):
    options = {"example_inputs": (torch.randn(1, 3, 8, 8),), **kwargs}
    with pytest.raises(ValueError, match=message):
        graphopt.prune(Net(), **options)
