"""Structural pruning (DepGraph): remove coupled channels from the IR so the model really shrinks.

``dependency`` finds the groups of channels that must go together, ``importance`` scores
them, ``plan`` picks what to remove (ratios, budgets, alignment) and ``apply`` removes it.
``graphopt.prune`` is the one-call entry point; ``Pruner`` and ``PruningPlan`` are for
inspecting groups and saving or re-applying a choice.
"""
from .apply import remove_channels
from .dependency import Group, Member, build_groups
from .importance import IMPORTANCES, score_groups
from .plan import Pruner, PruningPlan, count_macs, count_params, measure_latency, prune_graph, select

__all__ = [
    "Group", "IMPORTANCES", "Member", "Pruner", "PruningPlan", "build_groups", "count_macs", "count_params",
    "measure_latency", "prune_graph", "remove_channels", "score_groups", "select",
]
