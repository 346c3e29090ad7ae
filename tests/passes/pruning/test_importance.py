"""Channel importance: planted zero channels rank last, methods differ, scores are per group channel."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.ir import Graph
from graphopt.passes.pruning import Member, build_groups, score_groups
from graphopt.passes.pruning.importance import member_score, normalized


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(y.mean((2, 3)))


@pytest.fixture()
def graph_and_inputs() -> tuple[Graph, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model, x = ConvNet().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return graphopt.optimize(graphopt.capture(model, (x,)), "O1"), (x,)


def plant_zeros(group, channels) -> None:
    """Zero every parameter slice of ``channels`` in ``group``, so they carry no magnitude at all."""
    for m in group.parameters():
        data = m.value.data.detach().clone()
        index = m.positions[channels].reshape(-1)
        data.index_fill_(m.dim, index, 0.0)
        m.value.data = data


def prunable(graph: Graph):
    groups = [g for g in build_groups(graph) if g.prunable]
    assert groups, "the test model must have prunable groups"
    return groups


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"])
def test_zero_planted_channels_rank_last(graph_and_inputs, importance):
    graph, inputs = graph_and_inputs
    group = max(prunable(graph), key=lambda g: g.size)
    planted = [1, 5, 7]
    plant_zeros(group, planted)
    scores = score_groups(graph, [group], importance, example_inputs=inputs)[group.id]
    assert scores.shape == (group.size,)
    assert sorted(torch.argsort(scores, stable=True)[: len(planted)].tolist()) == planted
    assert scores[planted].eq(0).all() and scores.min() < scores[[c for c in range(group.size) if c not in planted]].min()


def test_taylor_runs_and_differs_from_magnitude(graph_and_inputs):
    graph, inputs = graph_and_inputs
    groups = prunable(graph)
    l2 = score_groups(graph, groups, "l2")
    taylor = score_groups(graph, groups, "taylor", example_inputs=inputs)
    assert l2.keys() == taylor.keys()
    assert any(not torch.allclose(l2[k], taylor[k]) for k in l2)
    assert all(torch.isfinite(t).all() and (t >= 0).all() for t in taylor.values())
    custom = score_groups(graph, groups, "taylor", example_inputs=inputs, loss_fn=lambda out: out[:, 0].sum())
    assert any(not torch.allclose(custom[k], taylor[k]) for k in l2)
    assert all(p.grad is None for p in graph.to_torch().parameters())  # the graph's tensors carry no gradient


def test_random_is_seeded(graph_and_inputs):
    graph, _ = graph_and_inputs
    groups = prunable(graph)
    a, b = score_groups(graph, groups, "random", seed=1), score_groups(graph, groups, "random", seed=1)
    c = score_groups(graph, groups, "random", seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_normalisation():
    s = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert normalized(s, "mean").mean() == pytest.approx(1.0)
    assert normalized(s, "max").max() == pytest.approx(1.0)
    assert torch.equal(normalized(s, "none"), s)
    assert torch.equal(normalized(torch.zeros(3, dtype=torch.float64), "mean"), torch.zeros(3, dtype=torch.float64))


def test_member_score_reduces_other_dims_and_sums_positions():
    graph = Graph()
    weight = torch.arange(24, dtype=torch.float32).reshape(2, 4, 3)
    v = graph.add_constant(weight, "w", parameter=True)
    member = Member(v, 1, torch.tensor([[0, 1], [2, 3]]))  # group channel c = dim-1 slices 2c and 2c+1
    per_index = weight.sum((0, 2))
    assert member_score(member, weight).tolist() == [per_index[:2].sum().item(), per_index[2:].sum().item()]


@pytest.mark.parametrize("kwargs, message", [
    ({"importance": "l3"}, "unknown importance"),
    ({"importance": "taylor"}, "example_inputs"),
    ({"normalize": "median"}, "unknown normalize"),
])
def test_bad_arguments(graph_and_inputs, kwargs, message):
    graph, _ = graph_and_inputs
    with pytest.raises(ValueError, match=message):
        score_groups(graph, prunable(graph), **kwargs)
