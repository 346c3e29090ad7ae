"""Passes read what an op is from its ``OpDef`` (schema and traits), not from op lists of their own.

Each test states a rewrite a trait or the attribute schema drives: the graph
before, and what the pass must leave.
"""
import torch

from graphopt.backends import triton_codegen
from graphopt.ir import Graph, TensorType, get_op
from graphopt.passes.cleanup import EliminateCommonSubexpressions
from graphopt.passes.layout import SinkTransposes


def f32(*shape):
    return TensorType(torch.float32, shape)


def test_sink_transposes_moves_softmax_to_its_default_dim():
    # before: permute(0, 2, 1) -> softmax (dim left to its default, -1) -> permute(0, 2, 1)
    # expected: softmax over dim 1 of x, no permute, and the same output
    g = Graph()
    x = g.add_input("x", f32(2, 3, 5))
    there = g.add_node("permute", [x], {"dims": [0, 2, 1]})
    soft = g.add_node("softmax", [there.output])
    g.outputs = [g.add_node("permute", [soft.output], {"dims": [0, 2, 1]}).output]
    data = torch.randn(2, 3, 5)
    expected = g.to_torch()(data)

    assert SinkTransposes().call(g).modified

    assert [(n.op, n.attrs) for n in g.nodes] == [("softmax", {"dim": 1})]
    torch.testing.assert_close(g.to_torch()(data), expected)


def test_cse_merges_operands_swapped_under_every_commutative_op():
    # before: mul(op(a, b), op(b, a)) for op in add, maximum, sub
    # expected: one add and one maximum (commutative in the registry), both subs
    g = Graph()
    a, b = g.add_input("a", f32(4)), g.add_input("b", f32(4))
    g.outputs = [g.add_node("mul", [g.add_node(op, [a, b]).output, g.add_node(op, [b, a]).output]).output
                 for op in ("add", "maximum", "sub")]

    result = EliminateCommonSubexpressions().call(g)

    assert result.stats["nodes_merged"] == 2
    assert g.op_counts() == {"add": 1, "maximum": 1, "sub": 2, "mul": 3}


def test_the_triton_row_kernel_writes_exactly_the_registry_row_ops():
    # the kernel picks its rows from OpDef.row_op; its capability list must not drift from the trait
    row_ops = {name for name in triton_codegen.lowered_ops() if get_op(name).row_op}
    assert row_ops == triton_codegen.ROW_OPS
