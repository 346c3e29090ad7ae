"""The op registry's attribute schema: derived from each op's torch implementation, enforced by add_node."""
import pytest
import torch

from graphopt.ir import Graph, TensorType, get_op
from graphopt.ir.registry import REQUIRED, AttrSpec


def graph_with_input(shape=(2, 3, 4)):
    g = Graph()
    return g, g.add_input("x", TensorType(torch.float32, shape))


def test_schema_comes_from_the_torch_signature():
    assert get_op("softmax").attrs == (AttrSpec("dim", -1, "int", True),)
    assert get_op("einsum").attr("equation").default is REQUIRED
    assert get_op("relu").attrs == ()  # a torch builtin's own keywords (inplace) are not IR attributes
    assert get_op("conv").default("groups") == 1
    assert get_op("sum").dim_attrs == ("dims",)


def test_add_node_fills_every_default():
    g, x = graph_with_input()
    node = g.add_node("softmax", [x])
    assert node.attrs == {"dim": 2}  # the default -1, made positive against the input's rank
    gelu = g.add_node("gelu", [x])
    assert gelu.attrs == {"approximate": "none"}


def test_add_node_refuses_unknown_and_missing_attributes():
    g, x = graph_with_input()
    with pytest.raises(ValueError, match="op softmax has no attribute 'axis'; its attributes: dim"):
        g.add_node("softmax", [x], {"axis": 1})
    with pytest.raises(ValueError, match="op einsum needs attribute 'equation'"):
        g.add_node("einsum", [x])
    assert not x.uses() and len(g) == 0  # nothing half-added


@pytest.mark.parametrize("op, attrs, expected", [
    ("sum", {"dims": [-1, 0]}, {"dims": [2, 0], "keepdim": False}),
    ("flatten", {"start_dim": -2}, {"start_dim": 1, "end_dim": 2}),
    ("unsqueeze", {"dims": [-1]}, {"dims": [3]}),  # a position in the rank-4 output
    ("cumsum", {"dim": -3}, {"dim": 0}),
])
def test_negative_dims_are_normalised_against_the_rank_they_index(op, attrs, expected):
    g, x = graph_with_input()
    node = g.add_node(op, [x], attrs)
    assert node.attrs == expected
    reference = get_op(op).torch_impl(torch.randn(2, 3, 4), **attrs)
    assert node.output.type.shape == tuple(reference.shape)


def test_stack_and_concat_dims_count_the_joined_rank():
    g, x = graph_with_input()
    assert g.add_node("stack", [x, x], {"dim": -1}).attrs == {"dim": 3}
    empty = g.add_input("cache", TensorType(torch.float32, (0,)))  # torch.cat skips an empty 1-D placeholder
    assert g.add_node("concat", [empty, x], {"dim": -1}).attrs == {"dim": 2}


def test_symbolic_rank_unknown_keeps_negative_dims():
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, None))
    node = g.add_node("softmax", [x], output_types=[TensorType(torch.float32, None)])
    assert node.attrs == {"dim": -1}
