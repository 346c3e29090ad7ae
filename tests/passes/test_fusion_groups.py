"""Fusion-group marking: which nodes one kernel computes, checked on small graphs and zoo models.

The pass only annotates, so every test also checks that the graph's structure
is untouched; convexity is checked independently of the pass's bit sets, with
networkx reachability on ``graph.to_networkx()``.
"""
import io

import networkx as nx
import pytest
import torch

import graphopt
from graphopt.ir import Graph, TensorType
from graphopt.models import get_case
from graphopt.passes.fusion_groups import MarkFusionGroups, fits_domain

from ir_interpreter import random_inputs, run_graph


def f32(*shape):
    return TensorType(torch.float32, shape)


def mark(graph, **options):
    """Run the pass and check it left the graph's structure and outputs alone."""
    inputs = random_inputs(graph)
    expected = run_graph(graph, *inputs)
    before = graph.structural_hash()
    result = MarkFusionGroups(**options).call(graph)
    graph.verify(check_types=True)
    assert graph.structural_hash() == before
    for got, want in zip(run_graph(graph, *inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    return result


def groups_by_ops(graph):
    """Each group as (kind, ops in execution order)."""
    node = {n.name: n for n in graph.nodes}
    return [(g["kind"], [node[name].op for name in g["nodes"]]) for g in graph.meta["fusion_groups"].values()]


def assert_well_formed(graph, max_size=16):
    """Groups are disjoint, agree with node meta, have 2..max_size nodes and are convex."""
    table = graph.meta["fusion_groups"]
    names = [name for g in table.values() for name in g["nodes"]]
    assert len(names) == len(set(names))
    assert {n.name: n.meta["fusion_group"] for n in graph.nodes if "fusion_group" in n.meta} == {
        name: k for k, g in table.items() for name in g["nodes"]}
    dag = nx.DiGraph(graph.to_networkx())
    for g in table.values():
        assert 2 <= len(g["nodes"]) <= max_size
        members = set(g["nodes"])
        below = set().union(*(nx.descendants(dag, n) for n in members)) - members
        above = set().union(*(nx.ancestors(dag, n) for n in members)) - members
        assert not below & above, f"group {g} is not convex: a path leaves it and comes back through {below & above}"


# --------------------------------------------------------------- small graphs
def test_matmul_epilogue_takes_bias_activation_and_residual():
    g = Graph()
    x, w = g.add_input("x", f32(4, 8)), g.add_constant(torch.randn(8, 8), "w")
    bias = g.add_constant(torch.randn(8), "bias")
    mm = g.add_node("matmul", [x, w])
    act = g.add_node("gelu", [g.add_node("add", [mm.output, bias]).output])
    out = g.add_node("add", [act.output, x])
    g.outputs = [out.output]
    result = mark(g)
    assert result.stats["epilogue_groups"] == 1 and not result.modified  # annotations are not changes
    assert groups_by_ops(g) == [("epilogue", ["matmul", "add", "gelu", "add"])]
    assert {n.meta["fusion_group"] for n in g.nodes} == {0}


def test_decomposed_layer_norm_is_one_reduction_group():
    g = Graph()
    x = g.add_input("x", f32(2, 5, 8))
    eps, w = g.add_constant(torch.tensor(1e-5), "eps"), g.add_constant(torch.randn(8), "w")
    mean = g.add_node("mean", [x], {"dims": [-1], "keepdim": True})
    centred = g.add_node("sub", [x, mean.output])
    var = g.add_node("mean", [g.add_node("mul", [centred.output, centred.output]).output], {"dims": [-1], "keepdim": True})
    inv = g.add_node("rsqrt", [g.add_node("add", [var.output, eps]).output])
    g.outputs = [g.add_node("mul", [g.add_node("mul", [centred.output, inv.output]).output, w]).output]
    mark(g)
    assert groups_by_ops(g) == [("reduction", ["mean", "sub", "mul", "mean", "add", "rsqrt", "mul", "mul"])]


def test_group_never_waits_for_a_node_outside_it():
    """exp -> permute -> add(exp, permute): {exp, add} would leave through the permute and come back."""
    g = Graph()
    x = g.add_input("x", f32(6, 6))
    e = g.add_node("exp", [x])
    t = g.add_node("permute", [e.output], {"dims": [1, 0]})
    s = g.add_node("add", [e.output, t.output])
    g.outputs = [g.add_node("relu", [s.output]).output]
    mark(g)
    assert groups_by_ops(g) == [("elementwise", ["add", "relu"])]
    assert "fusion_group" not in e.meta
    assert_well_formed(g)


def test_elementwise_chain_takes_a_smaller_broadcast_producer():
    g = Graph()
    x, scale = g.add_input("x", f32(2, 4, 3, 3)), g.add_input("scale", f32(4, 1, 1))
    gate = g.add_node("sigmoid", [scale])
    g.outputs = [g.add_node("tanh", [g.add_node("mul", [x, gate.output]).output]).output]
    mark(g)
    assert groups_by_ops(g) == [("elementwise", ["sigmoid", "mul", "tanh"])]


def test_group_size_cap_is_respected():
    g = Graph()
    v = g.add_input("x", f32(3))
    for _ in range(40):
        v = g.add_node("relu", [v]).output
    g.outputs = [v]
    result = mark(g, max_group_size=5)
    assert result.stats["elementwise_groups"] == 8 and result.stats["nodes_grouped"] == 40
    assert_well_formed(g, max_size=5)
    with pytest.raises(ValueError, match="at least 2"):
        MarkFusionGroups(max_group_size=1).call(g)


def test_counts_a_change_only_when_annotations_change():
    g = Graph()
    x = g.add_input("x", f32(3))
    g.outputs = [g.add_node("exp", [g.add_node("neg", [x]).output]).output]

    def changed():
        return mark(g).stats["annotations_changed"]

    assert changed()
    assert not changed()
    tanh = g.add_node("tanh", [x])
    g.outputs.append(tanh.output)
    tanh.meta["fusion_group"] = 7  # a stale annotation is cleared
    assert changed() and "fusion_group" not in tanh.meta
    g.meta["fusion_groups"] = {}
    assert changed() and len(g.meta["fusion_groups"]) == 1


def test_runs_in_a_verifying_pass_manager():
    g = Graph()
    x = g.add_input("x", f32(2, 3))
    g.outputs = [g.add_node("sigmoid", [g.add_node("abs", [x]).output]).output]
    g = graphopt.optimize(g, "O0", passes=["mark_fusion_groups"], verify=True)
    assert g.meta["report"].fired == [] and len(g.meta["fusion_groups"]) == 1  # an analysis changes nothing


def test_fits_domain():
    assert fits_domain((8,), (2, 4, 8)) and fits_domain((2, 1, 8), (2, 4, 8)) and fits_domain((2, 4), (2, 4, 8))
    assert not fits_domain((2, 4, 16), (2, 4, 8)) and not fits_domain(("n", 4), ("n", 8))
    assert fits_domain(("n", 1), ("n", 8))


# ------------------------------------------------------------------ zoo models
def captured(name):
    model, inputs = get_case(name).build()
    graph = graphopt.optimize(graphopt.capture(model, inputs), "O1")
    with torch.no_grad():
        return graph, inputs, model(*inputs)


@pytest.fixture(scope="module")
def resnet18():
    return captured("torchvision.resnet18")


@pytest.fixture(scope="module")
def vit():
    return captured("timm.vit_tiny_patch16_224")


def test_resnet18_convs_take_batch_norm_relu_and_residual_add(resnet18):
    graph = resnet18[0].clone()
    mark(graph)
    groups = groups_by_ops(graph)
    assert groups.count(("epilogue", ["conv", "batch_norm", "relu"])) == 9  # stem + first conv of 8 blocks
    assert groups.count(("epilogue", ["conv", "batch_norm", "add", "relu"])) == 8  # second conv of each block
    assert groups.count(("epilogue", ["conv", "batch_norm"])) == 3  # downsampling shortcuts
    assert len(groups) == 20
    assert_well_formed(graph)


def test_vit_linears_take_gelu_and_residual_add(vit):
    graph, inputs, expected = vit
    graph = graph.clone()
    mark(graph)
    groups = groups_by_ops(graph)
    assert groups.count(("epilogue", ["linear", "gelu"])) == 12  # fc1 of each block
    assert groups.count(("epilogue", ["linear", "add"])) == 24  # attention projection and fc2: residual adds
    assert_well_formed(graph)
    torch.testing.assert_close(graph.to_torch()(*inputs), expected, rtol=1e-5, atol=1e-6)


def test_groups_are_convex_on_onnx_exported_models():
    """Legacy ONNX export decomposes more (MatMul + Add, Softmax chains): more and bigger groups."""
    for name in ("transformers.bert", "diffusers.dit"):
        model, inputs = get_case(name).build()
        buffer = io.BytesIO()
        torch.onnx.export(model, inputs, buffer, dynamo=False)
        graph = graphopt.optimize(graphopt.load_onnx(buffer.getvalue()), "O1")
        result = mark(graph, max_group_size=6)
        assert result.stats["epilogue_groups"] and result.stats["nodes_grouped"] > len(graph) // 4
        assert_well_formed(graph, max_size=6)
