"""The pass manager: pipelines, name and option errors, custom passes, the report, verify mode."""
import json
from dataclasses import dataclass

import pytest
import torch

import graphopt
from graphopt.errors import InvalidOptionError
from graphopt.ir import Graph, TensorType
from graphopt.pass_manager import (PASSES, PIPELINES, Pass, PassKind, PassManager, PassResult, pipeline,
                                   register_pass, register_pipeline)
from graphopt.passes.cleanup import CLEANUP_PIPELINE

from ir_interpreter import random_inputs, run_graph


def messy_graph() -> Graph:
    """Something for every cleanup pass: a constant chain, a no-op, a duplicate, dead code."""
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, (2, 3)))
    two = g.add_node("add", [g.add_constant(torch.ones(3), "one"), g.add_constant(torch.ones(3), "one")])
    h = g.add_node("identity", [g.add_node("mul", [x, two.output]).output])
    a, b = (g.add_node("tanh", [h.output]) for _ in range(2))
    g.add_node("exp", [a.output])
    g.outputs = [g.add_node("add", [a.output, b.output]).output]
    return g


@pytest.fixture
def scratch_registry():
    """Passes and pipelines a test registers are forgotten after it."""
    passes, pipelines = dict(PASSES), dict(PIPELINES)
    yield
    PASSES.clear()
    PASSES.update(passes)
    PIPELINES.clear()
    PIPELINES.update(pipelines)


def test_o0_is_empty_and_o1_is_the_cleanup_pipeline():
    assert pipeline("O0") == [] and pipeline("O1") == CLEANUP_PIPELINE
    g = messy_graph()
    before = g.structural_hash()
    assert graphopt.optimize(g, level="O0").structural_hash() == before


def test_o1_cleans_up_and_keeps_outputs():
    g = messy_graph()
    xs = random_inputs(g)
    expected = run_graph(g, *xs)
    g = graphopt.optimize(g, level="O1", verify=True)
    assert g.op_counts() == {"add": 1, "mul": 1, "tanh": 1}
    assert set(g.meta["report"].fired) == {"fold_constants", "eliminate_noops", "cse", "dce"}
    torch.testing.assert_close(run_graph(g, *xs), expected, rtol=0, atol=0)


def test_report_is_json_with_timing_and_node_counts():
    g = messy_graph()
    manager = PassManager(["O1"], verify=True)
    manager.run(g)
    records = json.loads(manager.report.to_json())
    first = records[0]
    assert first["name"] == "fold_constants" and first["seconds"] >= 0
    assert (first["nodes_before"], first["nodes_after"]) == (7, 6) and first["modified"] is True
    assert first["stats"]["nodes_folded"] == 1
    assert records[-1]["modified"] is False  # it ran to a fixed point
    assert records[-1]["nodes_after"] == len(g) == 3
    assert "fold_constants" in manager.report.table()


def test_unknown_pass_name_lists_the_known_ones():
    with pytest.raises(InvalidOptionError, match=r"unknown pass 'no_such_pass'; known passes: .*cse, dce"):
        PassManager(["no_such_pass"])


def test_option_errors_name_the_pass_and_its_options():
    with pytest.raises(InvalidOptionError, match="pass cse has no option max_size; its options: max_bytes"):
        PassManager(["O1"], options={"cse": {"max_size": 1}})
    with pytest.raises(InvalidOptionError, match="options given for passes not in the pipeline: fold_constants"):
        PassManager(["dce"], options={"fold_constants": {"fold_parameters": True}})


def test_options_reach_the_pass():
    manager = PassManager(["O1"], options={"fold_constants": {"max_output_bytes": 8}})
    fold = next(p for p in manager.passes if p.name == "fold_constants")
    assert fold.max_output_bytes == 8 and fold.fold_parameters is False


def test_lossy_pass_is_refused_in_a_pipeline(scratch_registry):
    @register_pass
    @dataclass
    class RoundWeights(Pass):
        """Round constants to one decimal (lossy)."""

        name = "round_weights"
        kind = PassKind.LOSSY
        quality_metric = "max abs error"

        def call(self, graph):
            return PassResult(graph, False)

    with pytest.raises(ValueError, match="cannot hold lossy pass round_weights"):
        register_pipeline("O9", ["dce", "round_weights"])
    assert "O9" not in PIPELINES

    with pytest.raises(ValueError, match="must declare its quality_metric"):
        @register_pass
        @dataclass
        class Unmeasured(Pass):
            name = "unmeasured"
            kind = PassKind.LOSSY


def test_user_registered_pass_runs_by_name(scratch_registry):
    @register_pass
    @dataclass
    class ReluToClamp(Pass):
        """Rewrite relu as clamp(min=0), a user's own rule."""

        name = "relu_to_clamp"
        minimum: float = 0.0

        def call(self, graph):
            count = 0
            for node in graph.find("relu"):
                clamp = graph.add_node("clamp", [node.inputs[0]], {"min": self.minimum}, after=node)
                node.output.replace_all_uses_with(clamp.output)
                graph.remove_node(node)
                count += 1
            return PassResult(graph, bool(count), {"rewritten": count})

    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, (4,)))
    g.outputs = [g.add_node("relu", [x]).output]
    g = graphopt.optimize(g, level="O0", passes=["relu_to_clamp"], options={"relu_to_clamp": {"minimum": 0.0}},
                          verify=True)
    assert g.op_counts() == {"clamp": 1}
    assert g.meta["report"].records[0].stats == {"rewritten": 1}
    assert g.meta["passes_applied"] == ["relu_to_clamp"]


def test_verify_mode_catches_a_pass_that_hides_a_change(scratch_registry):
    @register_pass
    @dataclass
    class Sneaky(Pass):
        """Removes dead nodes but claims it changed nothing."""

        name = "sneaky"

        def call(self, graph):
            for node in reversed(graph.nodes):
                if not node.output.uses() and node.output not in graph.outputs:
                    graph.remove_node(node)
            return PassResult(graph, False)

    with pytest.raises(AssertionError, match="sneaky changed the graph but reported modified=False"):
        PassManager(["sneaky"], verify=True).run(messy_graph())
    PassManager(["sneaky"], verify=False).run(messy_graph())  # unchecked without verify
