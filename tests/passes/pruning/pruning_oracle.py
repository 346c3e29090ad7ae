"""The zero-planting oracle shared by the pruning tests.

Channels whose outgoing weights are all zero carry nothing to the output, so
removing exactly those channels must leave the outputs unchanged while the
parameter count falls by what the group's members predict. Planting zeroes the
producers (conv/linear rows and biases, batch-norm affine params, parameters
used directly by elementwise ops) and the consumers (conv/linear input columns),
which also covers heads whose value projection is shared (GQA with one kv head).

Groups whose dim is normalised by a layer_norm/rms_norm (a transformer's hidden
size) may be prunable, but removing channels changes the norm's statistics, so
they are not exactly removable and the oracle skips them.
"""
from __future__ import annotations

import math

import torch

from graphopt.ir import Graph
from graphopt.passes.pruning.apply import remove_channels
from graphopt.passes.pruning.dependency import Group, build_groups

ROW_NORMS = ("layer_norm", "rms_norm")


def exactly_removable(group: Group) -> bool:
    return group.prunable and not any(
        node.op in ROW_NORMS and i == 0 and m.dim >= m.value.type.rank - len(node.attrs["normalized_shape"])
        for m in group.members for node, i in m.value.uses())


def plant_zeros(group: Group, channels: list[int]) -> None:
    for m in group.parameters():
        idx = m.positions[channels].reshape(-1)
        for node, i in m.value.uses():
            producer = node.op in ("conv", "linear") and (i == 2 or (i == 1 and m.dim == 0))
            consumer = node.op in ("conv", "linear") and i == 1 and m.dim == 1 and node.attrs.get("groups", 1) == 1
            affine = node.op in ("batch_norm", "group_norm") and i in (1, 2)
            pointwise = node.op in ("add", "mul", "sub")
            if producer or consumer or affine or pointwise:
                with torch.no_grad():
                    m.value.data.index_fill_(m.dim, idx, 0.0)


def param_count(graph: Graph) -> int:
    return sum(v.data.numel() for v in graph.constants.values() if v.is_parameter)


def predicted_drop(groups: list[Group], removals: dict[int, list[int]]) -> int:
    """Parameters removed according to the groups' members alone (independent of apply)."""
    removed: dict[int, tuple] = {}
    for g in groups:
        if g.id not in removals:
            continue
        for m in g.parameters():
            if not m.value.is_parameter:
                continue
            value, dims = removed.setdefault(id(m.value), (m.value, {}))
            dims.setdefault(m.dim, set()).update(m.positions[removals[g.id]].reshape(-1).tolist())
    total = 0
    for value, dims in removed.values():
        shape = list(value.data.shape)
        total += math.prod(shape) - math.prod(n - len(dims.get(d, ())) for d, n in enumerate(shape))
    return total


def choose(groups: list[Group], count: int) -> dict[int, list[int]]:
    """Every third channel of up to ``count`` exactly removable groups spread over the model."""
    candidates = [g for g in groups if exactly_removable(g)]
    step = max(1, len(candidates) // count)
    return {g.id: list(range(0, g.size, 3))[:g.size - g.min_keep] for g in candidates[::step][:count]}


def run(graph: Graph, inputs: tuple) -> torch.Tensor:
    out = graph.to_torch()(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def check_oracle(graph: Graph, inputs: tuple, count: int = 6, heads: str = "heads",
                 groups: list[Group] | None = None, removals: dict[int, list[int]] | None = None) -> dict:
    """Plant, prune, compare; returns what was removed (group id -> channels)."""
    groups = build_groups(graph, heads=heads) if groups is None else groups
    removals = choose(groups, count) if removals is None else removals
    assert removals, "no exactly removable group"
    for gid, channels in removals.items():
        plant_zeros(groups[gid], channels)
    reference = run(graph, inputs)
    before = param_count(graph)
    expected = predicted_drop(groups, removals)
    remove_channels(graph, groups, removals)
    graph.verify(check_types=True)
    pruned = run(graph, inputs)
    assert pruned.shape == reference.shape
    torch.testing.assert_close(pruned, reference, rtol=1e-4, atol=1e-5)
    assert expected > 0 and before - param_count(graph) == expected
    return removals
