"""Constant folding: what folds, what must stay computed, and that outputs never change."""
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

import graphopt

from graphopt.ir import Graph, TensorType
from graphopt.ir.ops.opaque import Arg
from graphopt.passes.constant_folding import FoldConstants

from ir_interpreter import run_exact, run_graph


def f32(*shape):
    return TensorType(torch.float32, shape)


def test_constant_chain_folds_into_one_constant_and_drops_its_sources():
    g = Graph()
    x = g.add_input("x", f32(2, 3))
    a = g.add_constant(torch.randn(3), "a")
    b = g.add_constant(torch.randn(3), "b")
    scaled = g.add_node("mul", [g.add_node("add", [a, b]).output, g.add_node("exp", [b]).output])
    g.outputs = [g.add_node("add", [x, scaled.output]).output]
    result = run_exact(FoldConstants(), g)
    assert result.stats["nodes_folded"] == 3
    assert result.stats["constants_dropped"] == 4  # a, b, and the two intermediate results
    assert [n.op for n in g.nodes] == ["add"]
    (folded,) = g.constants.values()
    assert torch.equal(folded.data, (a.data + b.data) * b.data.exp())


def test_a_result_that_is_an_input_reuses_that_constant():
    g = Graph()
    x = g.add_input("x", f32(3))
    c = g.add_constant(torch.randn(3), "c")
    g.outputs = [g.add_node("add", [x, g.add_node("identity", [c]).output]).output]
    assert run_exact(FoldConstants(), g).stats["nodes_folded"] == 1
    assert list(g.constants.values()) == [c] and g.nodes[0].inputs == (x, c)


def test_multi_output_and_input_free_nodes_fold():
    g = Graph()
    x = g.add_input("x", TensorType(torch.int64, (4,)))
    steps = g.add_node("arange", [], {"start": 0, "end": 8, "dtype": torch.int64})
    halves = g.add_node("split", [steps.output], {"dim": 0, "sizes": [4, 4]})
    g.outputs = [g.add_node("add", [x, o]).output for o in halves.outputs]
    result = run_exact(FoldConstants(), g)
    assert result.stats["nodes_folded"] == 2
    assert [torch.equal(c.data, torch.arange(4) + k) for k, c in zip((0, 4), g.constants.values())] == [True, True]


def test_shape_of_a_static_input_folds_and_feeds_the_chain_behind_it():
    """ONNX's Shape -> Gather -> Concat -> Expand, made static."""
    g = Graph()
    x = g.add_input("x", f32(2, 3, 4))
    shape = g.add_node("shape", [x])
    last_two = g.add_node("take", [shape.output, g.add_constant(torch.tensor([1, 2]), "idx")], {"axis": 0})
    target = g.add_node("concat", [g.add_constant(torch.tensor([2]), "lead"), last_two.output], {"dim": 0})
    bias = g.add_node("broadcast_to", [g.add_constant(torch.randn(4), "bias"), target.output],
                      output_types=[f32(2, 3, 4)])
    g.outputs = [g.add_node("add", [bias.output, g.add_node("relu", [x]).output]).output]
    result = run_exact(FoldConstants(), g)
    assert result.stats["shape_ops_folded"] == 1
    # the broadcast reads a constant shape now; it folds too, being a small result of constants
    assert result.stats["nodes_folded"] == 3 and g.op_counts() == {"add": 1, "relu": 1}


def test_shape_folds_only_the_static_part_of_a_symbolic_shape():
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, ("batch", 3, 4)))
    static_part = g.add_node("shape", [x], {"start": 1, "end": None})
    whole = g.add_node("shape", [x])
    g.outputs = [g.add_node("concat", [whole.output, static_part.output], {"dim": 0}).output]
    result = run_exact(FoldConstants(), g)
    assert result.stats["shape_ops_folded"] == 1 and whole.graph is g and static_part.graph is None
    (folded,) = g.constants.values()
    assert folded.data.tolist() == [3, 4]


def test_picking_static_entries_of_a_symbolic_shape_folds_and_symbolic_ones_stay():
    g = Graph()
    x = g.add_input("x", f32("batch", 4, 6))
    shape = g.add_node("shape", [x]).output
    picks = {i: g.add_node("take", [shape, g.add_constant(torch.tensor(i), "i")], {"axis": 0}).output
             for i in (0, 2)}
    is_one = g.add_node("eq", [picks[0], g.add_constant(torch.tensor(1), "one")]).output  # never probed
    g.outputs = [g.add_node("mul", [picks[2], picks[0]]).output, is_one]
    result = run_exact(FoldConstants(), g)
    assert result.stats["shape_ops_folded"] == 1
    assert picks[2].producer.graph is None and picks[0].producer.graph is g and is_one.producer.graph is g
    assert g.outputs[0].producer.inputs[0].data.item() == 6


def test_full_like_folds_only_for_static_shapes():
    g = Graph()
    x = g.add_input("x", f32(2, 3))
    y = g.add_input("y", TensorType(torch.float32, ("n", 3)))
    ones = [g.add_node("full_like", [v], {"value": 1.0}) for v in (x, y)]
    g.outputs = [g.add_node("add", [v, o.output]).output for v, o in zip((x, y), ones)]
    result = run_exact(FoldConstants(), g)
    assert result.stats["shape_ops_folded"] == 1 and ones[0].graph is None and ones[1].graph is g


def test_results_over_the_size_limit_stay_computed():
    g = Graph()
    x = g.add_input("x", f32(1024, 1024))
    big = g.add_node("full", [], {"shape": [1024, 1024], "value": 2.0})
    g.outputs = [g.add_node("mul", [x, big.output]).output]
    result = run_exact(FoldConstants(), g)
    assert not result.modified and result.stats["skipped_too_large"] == 1
    assert run_exact(FoldConstants(max_output_bytes=4 << 20), g).stats["nodes_folded"] == 1


def test_trainable_parameters_are_folded_only_when_asked():
    def build():
        g = Graph()
        x = g.add_input("x", f32(2, 3))
        weight = g.add_constant(torch.randn(4, 3), "weight", parameter=True)
        shape = g.add_constant(torch.tensor([3, 4]), "shape", parameter=True)  # an integer "parameter"
        transposed = g.add_node("permute", [weight], {"dims": [1, 0]})
        shape_plus_one = g.add_node("add", [shape, g.add_constant(torch.tensor(1), "one")])
        g.outputs = [g.add_node("matmul", [x, transposed.output]).output, shape_plus_one.output]
        g.outputs.append(g.add_node("neg", [shape_plus_one.output]).output)
        return g

    g = build()
    assert run_exact(FoldConstants(), g).modified is False  # the add is a graph output, the permute reads a weight
    g.outputs.pop(1)
    assert run_exact(FoldConstants(), g).stats["nodes_folded"] == 1  # the add: integers cannot be trained
    assert g.find("permute")
    assert run_exact(FoldConstants(fold_parameters=True), g).stats["nodes_folded"] == 1
    assert not g.find("permute") and "weight" not in g.constants


def test_impure_nodes_are_never_evaluated_ahead_of_time():
    g = Graph()
    c = g.add_constant(torch.randn(8), "c")
    opaque = g.add_node("torch.opaque", [c], {"target": torch.ops.aten.mul.Tensor, "args": (Arg(0), Arg(0))})
    dropout = g.add_node("dropout", [c], {"p": 0.5, "training": True})
    g.outputs = [g.add_node("add", [opaque.output, dropout.output]).output]
    assert run_exact(FoldConstants(), g).modified is False


def test_standard_onnx_ops_graphopt_keeps_opaque_still_fold():
    """A Slice with a negative step has no canonical form, but it is a function of its constant inputs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    data = onnx.numpy_helper.from_array(np.arange(8, dtype=np.int64), "data")
    ints = [onnx.numpy_helper.from_array(np.array([v], np.int64), n) for n, v in
            [("start", -1), ("end", -100), ("axis", 0), ("step", -2)]]
    noise = helper.make_node("RandomNormal", [], ["noise"], shape=[2, 3])
    nodes = [helper.make_node("Slice", ["data", "start", "end", "axis", "step"], ["picked"]),
             helper.make_node("ReduceSum", ["picked"], ["total"], keepdims=0),
             helper.make_node("Cast", ["total"], ["total_f"], to=TensorProto.FLOAT),
             noise, helper.make_node("Add", ["x", "noise"], ["xn"]),
             helper.make_node("Mul", ["xn", "total_f"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [data, *ints]),
                              opset_imports=[helper.make_opsetid("", 18)])
    g = graphopt.load_onnx(model)
    assert {"Slice", "RandomNormal"} <= {n.attrs["op_type"] for n in g.find("onnx.opaque")}
    assert FoldConstants().call(g).modified
    assert [n.attrs["op_type"] for n in g.find("onnx.opaque")] == ["RandomNormal"]  # random draws stay
    (mul,) = g.find("mul")
    assert float(mul.inputs[1].data) == 7 + 5 + 3 + 1


def test_nothing_to_fold():
    g = Graph()
    x = g.add_input("x", f32(2))
    g.outputs = [g.add_node("add", [x, g.add_constant(torch.ones(2), "one")]).output]
    result = run_exact(FoldConstants(), g)
    assert result.modified is False and result.stats["nodes_folded"] == 0


def test_folding_a_captured_model_spares_its_weights_unless_asked():
    import graphopt

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            scale = torch.ones(x.shape[1]).sum()  # static: folds to a constant
            return (x @ self.weight.t()) * scale

    model, x = Scaled().eval(), torch.randn(2, 3)
    g = graphopt.capture(model, (x,))
    result = run_exact(FoldConstants(), g, [x])
    assert result.stats["nodes_folded"] == 2 and not g.find("full")
    assert g.find("permute") and g.constants["weight"].is_parameter
    run_exact(FoldConstants(fold_parameters=True), g, [x])
    assert not g.find("permute") and "weight" not in g.constants
    with torch.no_grad():
        torch.testing.assert_close(run_graph(g, x)[0], model(x))
