"""Horizontal fusion: sibling linear/matmul/conv nodes on one input become one node and a split.

A wider GEMM may sum in another order, so outputs are compared within a
relative tolerance; the graph must stay valid with checked types and the
pass's ``modified`` claim must be honest.
"""
import io

import pytest
import torch

import graphopt
from graphopt.ir import Graph, TensorType
from graphopt.passes.horizontal import FuseHorizontal
from graphopt.testing import max_rel_error, run_onnxruntime

from ir_interpreter import random_inputs, run_graph

RTOL = 1e-5


def f32(*shape):
    return TensorType(torch.float32, shape)


def run_fusion(graph, **options):
    inputs = random_inputs(graph)
    expected = run_graph(graph, *inputs)
    before = graph.structural_hash()
    result = FuseHorizontal(**options).call(graph)
    graph.verify(check_types=True)
    assert result.modified == (graph.structural_hash() != before), result
    assert max_rel_error(expected, run_graph(graph, *inputs)) <= RTOL
    return result


def siblings(op, outs, *, bias=True, parameter=False, x_shape=(2, 5, 8), attrs=None, weight_shape=None):
    """``len(outs)`` nodes of ``op`` reading one input, each feeding a relu that the graph returns."""
    g = Graph()
    x = g.add_input("x", f32(*x_shape))
    results = []
    for n in outs:
        shape = weight_shape(n) if weight_shape else (n, x_shape[-1])
        w = g.add_constant(torch.randn(shape), "w", parameter=parameter)
        inputs = [x, w]
        if op != "matmul":
            inputs.append(g.add_constant(torch.randn(n), "b", parameter=parameter) if bias else None)
        results.append(g.add_node("relu", [g.add_node(op, inputs, attrs or {}).output]).output)
    g.outputs = results
    return g


# ------------------------------------------------------------ what fuses
@pytest.mark.parametrize("bias", [True, False])
def test_sibling_linears_become_one_linear_and_a_split(bias):
    g = siblings("linear", [4, 6, 3], bias=bias)
    assert run_fusion(g).stats == {"groups_fused": 1, "nodes_merged": 3}
    assert g.op_counts() == {"linear": 1, "relu": 3, "split": 1}
    (linear,), (split,) = g.find("linear"), g.find("split")
    assert split.attrs == {"dim": 2, "sizes": [4, 6, 3]}
    assert linear.inputs[1].type == f32(13, 8) and not linear.inputs[1].is_parameter
    assert len(g.constants) == (2 if bias else 1)  # the sibling weights went with their nodes
    assert (linear.inputs[2] is None) is not bias


def test_sibling_matmuls_by_constant_matrices_fuse_along_the_columns():
    g = siblings("matmul", [4, 5], x_shape=(3, 8), weight_shape=lambda n: (8, n))
    run_fusion(g)
    assert g.op_counts() == {"matmul": 1, "relu": 2, "split": 1}
    assert g.find("matmul")[0].inputs[1].type == f32(8, 9) and g.find("split")[0].attrs["dim"] == 1


def test_sibling_convolutions_fuse_along_the_output_channels():
    attrs = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    g = siblings("conv", [4, 2, 6], x_shape=(1, 3, 8, 8), attrs=attrs, weight_shape=lambda n: (n, 3, 3, 3))
    run_fusion(g)
    assert g.op_counts() == {"conv": 1, "relu": 3, "split": 1}
    assert g.find("split")[0].attrs == {"dim": 1, "sizes": [4, 2, 6]}


def test_a_graph_output_keeps_its_name():
    g = Graph()
    x = g.add_input("x", f32(2, 8))
    g.outputs = [g.add_node("linear", [x, g.add_constant(torch.randn(n, 8)), None], name=f"head{n}").output
                 for n in (3, 5)]
    run_fusion(g)
    assert [v.name for v in g.outputs] == ["head3", "head5"]


# ------------------------------------------------------- what must not fuse
def unchanged(g, **options):
    before = g.structural_hash()
    assert run_fusion(g, **options).modified is False and g.structural_hash() == before


def test_trainable_weights_stay_separate_unless_asked():
    unchanged(siblings("linear", [4, 4], parameter=True))
    g = siblings("linear", [4, 4], parameter=True)
    g.meta["source"] = "onnx"  # initializers are constants
    assert run_fusion(g).modified
    g = siblings("linear", [4, 4], parameter=True)
    assert run_fusion(g, fuse_trainable=True).modified
    (linear,) = g.find("linear")
    assert not linear.inputs[1].is_parameter and not linear.inputs[2].is_parameter  # new constants


def test_fewer_siblings_than_min_branches_stay_separate():
    unchanged(siblings("linear", [4, 4]), min_branches=3)
    unchanged(siblings("linear", [4]))


def test_mixed_bias_dtype_attributes_or_inputs_stay_separate():
    g = Graph()
    x, y = g.add_input("x", f32(2, 8)), g.add_input("y", f32(2, 8))
    linear = [(x, True), (x, False), (y, True)]  # one with bias, one without, one on another input
    g.outputs = [g.add_node("linear", [v, g.add_constant(torch.randn(3, 8)),
                                       g.add_constant(torch.randn(3)) if b else None]).output for v, b in linear]
    unchanged(g)

    g = Graph()
    x = g.add_input("x", f32(1, 3, 8, 8))
    g.outputs = [g.add_node("conv", [x, g.add_constant(torch.randn(4, 3, 1, 1)), None],
                            {"stride": [s, s], "padding": [0, 0], "dilation": [1, 1], "groups": 1}).output
                 for s in (1, 2)]
    unchanged(g)


def test_grouped_convolutions_and_runtime_weights_stay_separate():
    attrs = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 2}
    unchanged(siblings("conv", [4, 4], x_shape=(1, 4, 6, 6), attrs=attrs, weight_shape=lambda n: (n, 2, 1, 1)))
    g = Graph()
    x, w = g.add_input("x", f32(2, 8)), g.add_input("w", f32(8, 4))
    g.outputs = [g.add_node("matmul", [x, w]).output, g.add_node("matmul", [x, w]).output]
    unchanged(g)


# ------------------------------------------------------------- real models
def test_bert_query_key_value_projections_fuse_into_one_linear_per_layer():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, attn_implementation="sdpa")
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 64, (2, 12))
    graph = graphopt.optimize(graphopt.capture(model, (ids, torch.ones_like(ids))), "O1")
    linears = len(graph.find("linear"))

    assert FuseHorizontal().call(graph).modified is False  # BERT's weights are trainable parameters
    result = FuseHorizontal(fuse_trainable=True).call(graph)
    graph.verify(check_types=True)
    assert result.stats == {"groups_fused": 2, "nodes_merged": 6}
    assert len(graph.find("linear")) == linears - 4 and len(graph.find("split")) == 2
    assert all(s.attrs["sizes"] == [32, 32, 32] for s in graph.find("split"))
    with torch.no_grad():
        assert max_rel_error(model(ids, torch.ones_like(ids)), graph.to_torch()(ids, torch.ones_like(ids))) <= RTOL


def test_onnx_export_of_bert_fuses_its_projection_matmuls_with_constant_initializers():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, attn_implementation="sdpa")
    bert = BertModel(config, add_pooling_layer=False).eval()

    class Bert(torch.nn.Module):  # the exporter's positional call clashes with BertModel's keyword arguments
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, ids):
            return self.bert(input_ids=ids).last_hidden_state

    model, ids = Bert().eval(), torch.randint(0, 64, (2, 12))
    f = io.BytesIO()
    torch.onnx.export(model, (ids,), f, dynamo=False, opset_version=17)
    graph = graphopt.optimize(graphopt.load_onnx(f.getvalue()), "O1")
    matmuls = len(graph.find("matmul"))
    result = FuseHorizontal().call(graph)  # ONNX initializers are constants: no option needed
    graph.verify(check_types=True)
    assert result.stats == {"groups_fused": 2, "nodes_merged": 6} and len(graph.find("matmul")) == matmuls - 4
    with torch.no_grad():
        assert max_rel_error(model(ids), run_onnxruntime(graph, (ids,))) <= RTOL


def test_inception_branches_fuse_their_one_by_one_convolutions():
    nn = torch.nn

    class Inception(nn.Module):
        def __init__(self):
            super().__init__()
            self.b1 = nn.Conv2d(8, 4, 1)
            self.b2 = nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
            self.b3 = nn.Sequential(nn.Conv2d(8, 2, 1), nn.ReLU(), nn.Conv2d(2, 4, 5, padding=2))
            self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 4, 1))

        def forward(self, x):
            return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)

    torch.manual_seed(0)
    model, x = Inception().eval(), torch.randn(2, 8, 16, 16)
    graph = graphopt.optimize(graphopt.capture(model, (x,)), "O1")
    result = FuseHorizontal(fuse_trainable=True).call(graph)
    graph.verify(check_types=True)
    assert result.stats == {"groups_fused": 1, "nodes_merged": 3}  # the pooled branch reads another input
    assert len(graph.find("conv")) == 4 and graph.find("split")[0].attrs == {"dim": 1, "sizes": [4, 6, 2]}
    with torch.no_grad():
        assert max_rel_error(model(x), graph.to_torch()(x)) <= RTOL
