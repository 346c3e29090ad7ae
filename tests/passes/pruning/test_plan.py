"""Selection (ratios, alignment, min_keep, global ranking), budgets, and plans that round-trip through JSON."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.ir import Graph
from graphopt.passes.pruning import Group, Member, Pruner, PruningPlan, build_groups, count_macs, count_params, select


def make_group(gid: int, size: int, k: int = 1, prunable: bool = True, min_keep: int = 1, label: str = "") -> Group:
    graph = Graph()
    v = graph.add_constant(torch.ones(size * k, 3), f"w{gid}", parameter=True)
    positions = torch.arange(size * k).reshape(size, k)
    return Group(gid, size, [Member(v, 0, positions)], label or f"g{gid}", prunable=prunable,
                 reason="" if prunable else "touches an output", min_keep=min_keep)


def linear_scores(*groups: Group) -> dict[int, torch.Tensor]:
    return {g.id: torch.arange(g.size, 0, -1, dtype=torch.float64) for g in groups}  # last channels least important


def test_layer_ratio_removes_the_lowest_scores_of_every_group():
    a, b = make_group(0, 10), make_group(1, 4)
    removals = select([a, b], linear_scores(a, b), 0.5)
    assert removals == {0: [5, 6, 7, 8, 9], 1: [2, 3]}


@pytest.mark.parametrize("round_to", [8, 16, 64])
def test_round_to_keeps_multiples(round_to):
    groups = [make_group(i, size) for i, size in enumerate([64, 96, 128, 200, 256])]
    removals = select(groups, linear_scores(*groups), 0.4, round_to=round_to)
    for g in groups:
        keep = g.size - len(removals.get(g.id, []))
        assert keep % round_to == 0 or keep == g.size
        assert keep >= round_to
    assert removals, "something must be pruned"


def test_round_to_counts_each_group_channel_as_k_channels():
    heads = make_group(0, 12, k=64)  # 12 heads of 64: any head count is a multiple of 8 channels
    removals = select([heads], linear_scores(heads), 0.5, round_to=8)
    assert len(removals[0]) == 6


def test_min_keep_and_unprunable_groups_are_respected():
    kept = make_group(0, 8, min_keep=6)
    frozen = make_group(1, 8, prunable=False)
    removals = select([kept, frozen], linear_scores(kept, frozen), 0.9)
    assert removals == {0: [6, 7]}
    assert select([kept, frozen], linear_scores(kept, frozen), 0.9, ranking="global") == {0: [6, 7]}


def test_global_ranking_takes_the_lowest_scores_anywhere():
    a, b = make_group(0, 4), make_group(1, 4)
    scores = {0: torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64),
              1: torch.tensor([0.1, 2.0, 0.2, 3.0], dtype=torch.float64)}
    assert select([a, b], scores, 0.25, ranking="global") == {1: [0, 2]}


def test_per_label_ratios_and_globs():
    groups = [make_group(0, 8, label="layer1.conv"), make_group(1, 8, label="layer1.fc"), make_group(2, 8, label="head")]
    removals = select(groups, linear_scores(*groups), {"layer1.*": 0.5, "layer1.fc": 0.25})
    assert {k: len(v) for k, v in removals.items()} == {0: 4, 1: 2}
    with pytest.raises(ValueError, match="matches no group"):
        select(groups, linear_scores(*groups), {"nope": 0.5})


def test_a_real_label_names_its_group_despite_its_brackets():
    groups = [make_group(0, 8, label="layer1.0.conv1.weight[0]"), make_group(1, 8, label="fc.weight[1]")]
    removals = select(groups, linear_scores(*groups), {"layer1.0.conv1.weight[0]": 0.5, "fc.weight[[]1]": 0.25})
    assert {k: len(v) for k, v in removals.items()} == {0: 4, 1: 2}


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def fresh_graph() -> tuple[Graph, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    return graphopt.optimize(graphopt.capture(SmallNet().eval(), (x,)), "O1"), (x,)


def test_plan_json_round_trip_reproduces_the_same_graph():
    graph, (x,) = fresh_graph()
    pruner = Pruner(graph)
    plan = pruner.plan(0.5, round_to=4)
    assert plan.removed > 0
    text = plan.to_json()
    assert PruningPlan.from_json(text) == plan
    pruner.prune(plan)
    graph.verify(check_types=True)
    again, _ = fresh_graph()
    PruningPlan.from_json(text).apply(again)
    assert again.structural_hash() == graph.structural_hash()
    torch.testing.assert_close(again.to_torch()(x), graph.to_torch()(x))


def test_pruner_table_and_manual_indices():
    graph, (x,) = fresh_graph()
    pruner = Pruner(graph, importance="l1")
    table = pruner.table()
    assert all(g.label in table for g in pruner.groups)
    assert "l1 min / median / max" in table
    label = next(g.label for g in pruner.groups if g.prunable)
    size = pruner.group(label).size
    plan = pruner.prune({label: [0, 2]})
    assert plan.removals == {label: [0, 2]}
    assert pruner.group(label).size == size - 2  # groups are rebuilt after pruning
    assert graph.to_torch()(x).shape == (1, 10)
    with pytest.raises(ValueError, match="no group"):
        pruner.prune({"nope": [0]})


def test_bad_plans_are_refused():
    graph, _ = fresh_graph()
    with pytest.raises(ValueError, match="not a pruning plan"):
        PruningPlan.from_json("{not json")
    with pytest.raises(ValueError, match="does not have"):
        PruningPlan({"nope": [0]}, {"nope": 4}).apply(graph)
    label = next(g.label for g in build_groups(graph) if g.prunable)
    with pytest.raises(ValueError, match="made for"):
        PruningPlan({label: [0]}, {label: 999}).apply(graph)


@pytest.mark.parametrize("kind, count", [("macs", count_macs), ("params", count_params)])
def test_budget_targets_are_met(kind, count):
    graph, _ = fresh_graph()
    limit = 0.5 * count(graph)
    pruner = Pruner(graph)
    plan = pruner.plan_for({kind: limit})
    pruner.prune(plan)
    assert count(graph) <= limit
    assert count(graph) > 0.7 * limit  # and not much more than needed
    with pytest.raises(ValueError, match="out of reach"):
        Pruner(graph).plan_for({kind: 1})


def test_a_latency_target_picks_the_channel_alignment_that_needs_the_least_pruning(monkeypatch):
    """A (simulated) runtime where aligned channel counts run fast: the latency target finds the
    aligned plan that meets it removing fewer channels than any unaligned one would."""
    import graphopt.passes.pruning.plan as plan_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Conv2d(40, 40, 3), nn.ReLU(), nn.Conv2d(40, 4, 1))
    x = torch.randn(1, 3, 12, 12)
    graph = graphopt.optimize(graphopt.capture(model.eval(), (x,)), "O1")

    def simulated_ms(g, example_inputs, runs=5, runtime="torch"):
        widths = [n.inputs[1].type.shape[0] for n in g.find("conv")][:2]
        return sum(w if w % 8 == 0 else 2 * w for w in widths) / 10  # odd counts run at half speed

    monkeypatch.setattr(plan_module, "measure_latency", simulated_ms)
    dense = simulated_ms(graph, (x,))
    pruner = Pruner(graph, example_inputs=(x,))
    plan = pruner.plan_for({"onnxruntime_latency_ms": 0.8 * dense})
    pruner.prune(plan)
    widths = [n.inputs[1].type.shape[0] for n in graph.find("conv")][:2]
    assert all(w % 8 == 0 for w in widths) and simulated_ms(graph, (x,)) <= 0.8 * dense
    assert widths == [32, 32]  # 20% faster by alignment alone costs one block of 8 channels per layer
