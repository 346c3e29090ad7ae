"""torch.compile trusts graphopt's optimized graph only after its first call: a graph graphopt emits wrongly
runs unoptimized with a warning (or raises with ``fallback=False``) instead of crashing the user's model.

The wrong graphs come from deliberately broken passes on a real decoder with grouped-query attention: one
drops ``enable_gqa`` from its sdpa nodes (the run-time crash users met: 4 query heads against 2 key/value
heads), one negates the graph's outputs (wrong values, no crash).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging

import pytest
import torch

from graphopt.models import gqa_decoder_builder
from graphopt.pass_manager import PASSES, Pass, PassResult, register_pass
from graphopt.testing import max_rel_error


@dataclasses.dataclass
class DropGroupedHeads(Pass):
    """Broken on purpose: sdpa forgets that its key/value have fewer heads than its query."""

    name = "test_drop_grouped_heads"

    def call(self, graph):
        nodes = [n for n in graph.find("sdpa") if n.attrs.pop("enable_gqa", False)]
        return PassResult(graph, bool(nodes))


@dataclasses.dataclass
class NegateOutputs(Pass):
    """Broken on purpose: every floating output comes out negated (once: pipelines repeat to a fixed point)."""

    name = "test_negate_outputs"

    def call(self, graph):
        outputs = [graph.add_node("neg", [v]).output
                   if v.type.dtype.is_floating_point and (v.producer is None or v.producer.op != "neg") else v
                   for v in graph.outputs]
        changed = outputs != list(graph.outputs)
        graph.outputs = outputs
        return PassResult(graph, changed)


@pytest.fixture(autouse=True, scope="module")
def broken_passes():
    """Registered for this module's tests only: other tests list the registered passes."""
    for cls in (DropGroupedHeads, NegateOutputs):
        register_pass(cls)
    yield
    for cls in (DropGroupedHeads, NegateOutputs):
        PASSES.pop(cls.name, None)


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@functools.lru_cache(maxsize=1)
def decoder():
    model, inputs = gqa_decoder_builder("mistral", "grouped_sdpa")()
    with torch.no_grad():
        return model, inputs, model(*inputs)


def compile_with(broken_pass: str, tmp_path, **options):
    model, inputs, reference = decoder()
    report = tmp_path / "report.json"
    compiled = torch.compile(model, backend="graphopt",
                             options={"level": "O2", "passes": [broken_pass], "report": str(report), **options})
    return compiled, inputs, reference, report


@pytest.mark.parametrize("broken_pass, problem", [(DropGroupedHeads.name, "it raised RuntimeError"),
                                                  (NegateOutputs.name, "its outputs differ")])
def test_a_wrongly_optimized_graph_runs_unoptimized_with_a_warning(broken_pass, problem, tmp_path, caplog):
    compiled, inputs, reference, report = compile_with(broken_pass, tmp_path)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="graphopt.compile_backend"):
        first, second = compiled(*inputs), compiled(*inputs)
    assert max_rel_error(reference, first) <= 1e-5 and max_rel_error(reference, second) <= 1e-5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "failed its check on the first call" in warnings[0] and problem in warnings[0]
    [entry] = json.loads(report.read_text())["graphs"]
    assert broken_pass in entry["passes_fired"] and problem in entry["fallback"]


def test_a_wrongly_optimized_graph_raises_when_fallback_is_off(tmp_path):
    compiled, inputs, _, report = compile_with(NegateOutputs.name, tmp_path, fallback=False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="failed its check on the first call: its outputs differ"):
        compiled(*inputs)


def test_a_correctly_optimized_graph_is_checked_once_and_trusted(tmp_path):
    model, inputs, reference = decoder()
    report = tmp_path / "report.json"
    compiled = torch.compile(model, backend="graphopt", options={"level": "O2", "report": str(report)})
    with torch.no_grad():
        for _ in range(2):
            assert max_rel_error(reference, compiled(*inputs)) <= 1e-5
    [entry] = json.loads(report.read_text())["graphs"]
    assert "fallback" not in entry and entry["checked"].startswith("first call matched the unoptimized graph")
