"""The pass manager: pipelines, name and option errors, custom passes, the report, verify mode,
ordering constraints and instruments."""
import io
import json
from dataclasses import dataclass

import pytest
import torch

import graphopt
from graphopt.errors import InvalidOptionError
from graphopt.ir import Graph, TensorType
from graphopt.pass_manager import (PASSES, PIPELINES, DumpAfter, Pass, PassContractError, PassKind, PassManager,
                                   PassResult, TimePasses, level_then_passes, pipeline, register_pass,
                                   register_pipeline)
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


@pytest.mark.parametrize("level, passes, expected", [
    ("O2", ["step_cache", "fuse_linear"], ["O1", "step_cache", "O2", "fuse_linear"]),
    ("O1", ["step_cache"], ["O1", "step_cache"]),
    ("O0", ["step_cache"], ["step_cache", "O0"]),
    ("O2", ["fuse_linear"], ["O2", "fuse_linear"]),
])
def test_a_pass_that_runs_before_the_level_runs_after_its_cleanup(level, passes, expected):
    # before: a level and passes, step_cache among them (it runs before the level's rewrites); expected: it
    # runs on the cleaned graph, as the regions it wraps are not entered by the level's passes
    assert level_then_passes(level, passes) == expected


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


def lying_pass(name, rewrite, claims):
    """Register a pass that applies ``rewrite`` to the graph and reports ``modified=claims``."""
    def call(self, graph):
        rewrite(graph)
        return PassResult(graph, claims)

    register_pass(dataclass(type(name, (Pass,), {"name": name, "call": call})))


def scale_first_constant_in_place(graph):
    next(iter(graph.constants.values())).data.mul_(2)


def replace_first_constant(graph):
    value = next(iter(graph.constants.values()))
    value.data = value.data * 2


@pytest.mark.parametrize("rewrite, changed", [
    (scale_first_constant_in_place, r"constant %one \(written in place\) changed"),
    (replace_first_constant, r"constant %one \(replaced\) changed"),
])
def test_verify_mode_catches_a_pass_that_hides_a_change_to_constant_data(scratch_registry, rewrite, changed):
    g = messy_graph()
    before = g.structural_hash()
    lying_pass("reweight", rewrite, claims=False)
    with pytest.raises(PassContractError, match=f"pass reweight changed the graph but reported modified=False: "
                                                f"{changed}"):
        PassManager(["reweight"], verify=True).run(g)
    assert g.structural_hash() == before  # what the structural hash alone would have let through


def test_verify_mode_catches_a_pass_that_claims_a_change_it_did_not_make(scratch_registry):
    lying_pass("boaster", lambda graph: None, claims=True)
    with pytest.raises(PassContractError, match="pass boaster reported modified=True but changed nothing"):
        PassManager(["boaster"], verify=True).run(messy_graph())
    PassManager(["boaster"], verify=False, max_iterations=2).run(messy_graph())  # unchecked without verify


def test_verify_mode_names_the_pass_that_left_an_invalid_graph(scratch_registry):
    def misfile_a_constant(graph):
        graph.constants["elsewhere"] = graph.constants.pop("one")

    lying_pass("misfiler", misfile_a_constant, claims=True)
    with pytest.raises(PassContractError, match="pass misfiler left an invalid graph: constant %one is filed "
                                                "under the key 'elsewhere'"):
        PassManager(["dce", "misfiler"], verify=True).run(messy_graph())


def test_a_broken_contract_dumps_the_graph_before_and_after_the_pass(scratch_registry, tmp_path):
    def drop_the_exp(graph):
        graph.remove_node(graph.find("exp")[0])

    lying_pass("sneaky", drop_the_exp, claims=False)
    dumps = tmp_path / "dumps"
    with pytest.raises(PassContractError) as caught:
        PassManager(["eliminate_noops", "sneaky"], verify=True, dump_dir=dumps).run(messy_graph())
    before, after = dumps / "001-sneaky.before.txt", dumps / "001-sneaky.after.txt"
    assert str(caught.value) == (f"pass sneaky changed the graph but reported modified=False: the graph structure "
                                 f"changed (graph before and after it: {before}, {after})")
    assert "= exp(" in before.read_text() and "= exp(" not in after.read_text()
    assert "= identity(" not in before.read_text()  # the graph as the pass got it: eliminate_noops ran first


def test_the_dump_folder_can_come_from_the_environment(scratch_registry, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DUMP_DIR", str(tmp_path))
    lying_pass("boaster", lambda graph: None, claims=True)
    with pytest.raises(PassContractError, match="000-boaster.before.txt"):
        PassManager(["boaster"], verify=True).run(messy_graph())
    assert sorted(f.name for f in tmp_path.iterdir()) == ["000-boaster.after.txt", "000-boaster.before.txt"]


# ------------------------------------------------------------------ ordering
def declared_pass(name, requires=(), ensures=(), analysis=False):
    """Register a pass that only declares its place in the order."""
    namespace = {"name": name, "requires": requires, "ensures": ensures, "analysis": analysis,
                 "call": lambda self, graph: PassResult(graph, False)}
    register_pass(dataclass(type(name, (Pass,), namespace)))


def test_a_pass_must_come_after_the_pass_ensuring_what_it_requires(scratch_registry):
    declared_pass("make_canonical", ensures=("canonical",))
    declared_pass("fuse", requires=("canonical",))
    PassManager(["make_canonical", "fuse"])
    PassManager(["fuse"])  # run on its own, the caller vouches for the graph
    with pytest.raises(InvalidOptionError, match="^pass fuse requires canonical, which make_canonical ensures: "
                                                 "run make_canonical before fuse$"):
        PassManager(["fuse", "make_canonical"])
    with pytest.raises(InvalidOptionError, match="run make_canonical before fuse"):
        register_pipeline("O9", ["fuse", "make_canonical"])
    assert "O9" not in PIPELINES


def test_a_rewrite_after_an_analysis_leaves_its_annotation_stale(scratch_registry):
    declared_pass("annotate", ensures=("annotated",), analysis=True)
    declared_pass("read_annotations", requires=("annotated",))
    PassManager(["dce", "annotate", "read_annotations"])
    PassManager(["annotate", "annotate", "read_annotations"])  # an analysis keeps what others ensured
    with pytest.raises(InvalidOptionError, match="^pass read_annotations requires annotated, but dce rewrites the "
                                                 "graph after annotate annotates it: run annotate after dce$"):
        PassManager(["annotate", "dce", "read_annotations"])


@pytest.mark.parametrize("steps, message", [
    (["recognize_patterns", "fold_bias", "fuse_attention"], "fold_bias requires attention_fused"),
    (["fuse_linear", "recognize_patterns"], "fuse_linear requires patterns_recognized"),
    (["recognize_patterns", "fuse_horizontal", "fuse_linear"], "fuse_horizontal requires matmuls_as_linear"),
    (["recognize_patterns", "fuse_attention", "fuse_horizontal", "fold_bias"],
     "fuse_horizontal requires biases_folded"),
    (["lower_regions", "mark_fusion_groups"], "run mark_fusion_groups before lower_regions"),
    (["mark_fusion_groups", "fold_constants", "lower_regions"], "run mark_fusion_groups after fold_constants"),
    (["O2", "channels_last", "lower_regions"], "run mark_fusion_groups after channels_last"),
])
def test_the_built_in_passes_declare_their_order(steps, message):
    for level in PIPELINES:
        PassManager([level])
    with pytest.raises(InvalidOptionError, match=message):
        PassManager(steps)


# --------------------------------------------------------------- instruments
CLEANUP = ["fold_constants", "eliminate_noops", "cse", "dce"]


def test_dump_after_prints_the_graph_after_each_run_of_the_named_pass():
    stream = io.StringIO()
    PassManager(CLEANUP, instruments=[DumpAfter(["cse"], stream=stream)]).run(messy_graph())
    text = stream.getvalue()
    assert text.startswith("// graph after cse (step 2)\ngraph main(")
    assert text.count("// graph after cse") == 2  # the list ran twice, to its fixed point
    first = text.split("// graph after cse")[1]
    assert first.count("= tanh(") == 1 and "= exp(" in first  # cse merged the tanh twins; dce comes later


def test_dump_after_writes_one_file_per_run_to_a_folder(tmp_path):
    g = graphopt.optimize(messy_graph(), "O0", passes=CLEANUP,
                          instruments=[DumpAfter(["fold_constants", "dce"], tmp_path)])
    assert sorted(f.name for f in tmp_path.iterdir()) == ["000-fold_constants.txt", "003-dce.txt",
                                                          "004-fold_constants.txt", "007-dce.txt"]
    assert (tmp_path / "007-dce.txt").read_text() == f"{g}\n"


def test_dump_after_a_pass_the_pipeline_does_not_run_is_refused():
    with pytest.raises(InvalidOptionError, match="^dump_after names fuse_linear, which this pipeline does not run; "
                                                 "it runs: fold_constants, eliminate_noops, cse, dce$"):
        graphopt.optimize(messy_graph(), "O0", passes=CLEANUP, instruments=[DumpAfter(["fuse_linear"])])
    with pytest.raises(InvalidOptionError, match="dump_after must be a list of pass names, got 'dce'"):
        DumpAfter("dce")


def test_time_passes_prints_a_table_of_each_pass_all_runs_together():
    stream = io.StringIO()
    g = graphopt.optimize(messy_graph(), "O0", passes=CLEANUP, instruments=[TimePasses(stream)])
    lines = stream.getvalue().splitlines()
    assert lines[0] == "// pass times for graph" and lines[1].split() == ["pass", "runs", "ms", "share"]
    runs = {line.split()[0]: int(line.split()[1]) for line in lines[2:]}
    assert runs == {"fold_constants": 2, "eliminate_noops": 2, "cse": 2, "dce": 2, "total": 8}
    assert len(g.meta["report"].records) == 8
