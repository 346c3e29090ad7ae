"""Channel importance: one score per group channel, comparable across groups after normalisation.

A group channel lives in several tensors at once (a conv's output rows, the next conv's
input columns, a norm's scale...), so a score sums over every parameter member of the
group: each member's |W|^p (or Taylor's |W * dW|) is reduced over all dims except the
member's ``dim`` and gathered through its ``positions``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from graphopt.errors import InvalidOptionError
from graphopt.ir import Graph, Value

from .dependency import Group, Member

IMPORTANCES = ("l1", "l2", "taylor", "random")
NORMALIZATIONS = ("mean", "max", "none")

LossFn = Callable[[Any], torch.Tensor]

# Inputs of batch_norm that hold statistics, not weights: their magnitude says nothing about a channel.
_STATISTIC_INPUTS = {"batch_norm": (3, 4)}


def check_importance(importance: str, normalize: str = "mean", example_inputs: Any = None) -> None:
    """Refuse an unknown method or normalisation, and Taylor without data, before any work."""
    if importance not in IMPORTANCES:
        raise InvalidOptionError(f"unknown importance {importance!r}; use one of {', '.join(IMPORTANCES)}")
    if normalize not in NORMALIZATIONS:
        raise InvalidOptionError(f"unknown normalize {normalize!r}; use one of {', '.join(NORMALIZATIONS)}")
    if importance == "taylor" and example_inputs is None:
        raise InvalidOptionError("importance 'taylor' needs gradients: pass example_inputs")


def score_groups(graph: Graph, groups: Sequence[Group], importance: str = "l2", *, example_inputs: Any = None,
                 loss_fn: LossFn | None = None, normalize: str = "mean", seed: int = 0) -> dict[int, torch.Tensor]:
    """Group id -> float64 scores of shape (group.size,), higher meaning more important."""
    check_importance(importance, normalize, example_inputs)
    if importance == "random":
        generator = torch.Generator().manual_seed(seed)
        return {g.id: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in groups}
    grads = parameter_gradients(graph, example_inputs, loss_fn) if importance == "taylor" else {}

    def saliency(v: Value) -> torch.Tensor:
        w = v.data.detach().double()
        if importance == "taylor":
            return (w * grads[id(v)]).abs() if id(v) in grads else torch.zeros_like(w)
        return w.abs() if importance == "l1" else w.square()

    return {g.id: normalized(group_score(g, saliency), normalize) for g in groups}


def group_score(group: Group, saliency: Callable[[Value], torch.Tensor]) -> torch.Tensor:
    """Sum over the group's weight members of the member's per-channel saliency."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for member in group.parameters():
        if _is_weight(member):
            total += member_score(member, saliency(member.value))
    return total


def member_score(member: Member, saliency: torch.Tensor) -> torch.Tensor:
    """``saliency`` reduced to ``member.dim``, then summed over each group channel's k positions."""
    per_index = saliency.movedim(member.dim, 0).reshape(saliency.shape[member.dim], -1).sum(1).cpu()
    return per_index[member.positions].sum(1)


def _is_weight(member: Member) -> bool:
    v = member.value
    if v.data is None or not v.data.is_floating_point() or v.data.dim() == 0:
        return False
    uses = v.uses()
    return not uses or not all(i in _STATISTIC_INPUTS.get(n.op, ()) for n, i in uses)


def normalized(scores: torch.Tensor, normalize: str) -> torch.Tensor:
    """Scale a group's scores so groups of very different magnitudes can be ranked together."""
    if normalize == "none" or scores.numel() == 0:
        return scores
    scale = scores.mean() if normalize == "mean" else scores.max()
    return scores / scale if scale > 0 else scores


def parameter_gradients(graph: Graph, example_inputs: Any, loss_fn: LossFn | None = None) -> dict[int, torch.Tensor]:
    """id(Value) -> d loss / d value for the graph's float parameters, from one backward pass.

    Runs ``graph.to_torch()``; its parameters share storage with the graph's constants,
    which is how gradients are mapped back. The loss defaults to the sum of squared outputs.
    """
    module = graph.to_torch()
    by_storage = _parameters_by_storage(graph)
    leaves: dict[str, tuple[Value, torch.Tensor]] = {}
    for name, p in module.named_parameters():
        value = by_storage.get(_storage_key(p))
        if value is not None:  # a fresh leaf: the graph's own tensors may not require grad, and must not get any
            leaves[name] = value, p.detach().requires_grad_()
    inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    with torch.enable_grad():
        outputs = torch.func.functional_call(module, {name: t for name, (_, t) in leaves.items()}, inputs)
        loss = loss_fn(outputs) if loss_fn is not None else _sum_of_squares(outputs)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise InvalidOptionError("the Taylor loss must be a scalar tensor that depends on the model's parameters")
        grads = torch.autograd.grad(loss, [t for _, t in leaves.values()], allow_unused=True)
    return {id(value): g.detach().double() for (value, _), g in zip(leaves.values(), grads) if g is not None}


def _parameters_by_storage(graph: Graph) -> Mapping[tuple, Value]:
    return {_storage_key(v.data): v for v in graph.constants.values()
            if v.is_parameter and v.data is not None and v.data.is_floating_point()}


def _storage_key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), t.stride(), t.device


def _sum_of_squares(outputs: Any) -> torch.Tensor:
    leaves = [t for t in _tensors(outputs) if t.is_floating_point()]
    if not leaves:
        raise InvalidOptionError("the model returns no float tensor; pass loss_fn for Taylor importance")
    return sum(t.float().square().sum() for t in leaves)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []
