"""The shared pattern matcher (``graphopt.ir.pattern``): what a pattern matches, and what it binds."""
import math

import torch

from graphopt.ir import Graph, TensorType
from graphopt.ir.pattern import Const, Var, any_of, match, matches, op


def graph(*shape):
    g = Graph()
    return g, g.add_input("x", TensorType(torch.float32, shape)), g.add_input("y", TensorType(torch.float32, shape))


def node(g, name, *inputs, **attrs):
    return g.add_node(name, list(inputs), attrs).output


def constant(g, value, dtype=torch.float32):
    return g.add_constant(torch.tensor(value, dtype=dtype), "k")


def test_commutative_operands_match_in_either_order():
    g, x, y = graph(4)
    x_times_sigmoid_x = op("mul", Var("x"), op("sigmoid", Var("x")))
    before, after = node(g, "mul", x, node(g, "sigmoid", x)), node(g, "mul", node(g, "sigmoid", x), x)
    assert match(x_times_sigmoid_x, before)["x"] is x
    assert match(x_times_sigmoid_x, after)["x"] is x


def test_commutativity_comes_from_the_registry():
    g, x, y = graph(4)
    assert match(op("maximum", Var("a"), op("relu", Var("b"))), node(g, "maximum", node(g, "relu", y), x))
    x_minus_relu = op("sub", Var("a"), op("relu", Var("b")))
    assert match(x_minus_relu, node(g, "sub", node(g, "relu", y), x)) is None  # sub is not commutative


def test_a_constant_matches_within_tolerance_and_not_outside():
    g, x, _ = graph(4)
    halve = op("mul", Var("x"), Const(1 / math.sqrt(2.0)))
    float32_rounding = node(g, "mul", x, constant(g, 0.70710677))  # 1/sqrt(2) as float32 holds it
    assert match(halve, float32_rounding)["x"] is x
    assert match(halve, node(g, "mul", x, constant(g, 0.7072))) is None
    assert match(op("mul", Var("x"), Const(3.0)), node(g, "mul", x, constant(g, 3, torch.int64))) is not None
    assert match(op("mul", Var("x"), Const(3.0)), node(g, "mul", x, constant(g, 3.00001, torch.float64))) is None


def test_a_learnt_constant_is_no_pattern_constant():
    g, x, _ = graph(4)
    half = g.add_constant(torch.tensor(0.5), "half", parameter=True)
    assert match(op("mul", Var("x"), Const(0.5)), node(g, "mul", x, half)) is None


def test_attributes_read_the_schema_default_and_compare_lists_as_tuples():
    g, x, _ = graph(2, 3)
    transposed = node(g, "permute", x, dims=[1, 0])
    assert match(op("permute", Var("w"), dims=(1, 0)), transposed)
    assert match(op("div", Var("a"), Var("b"), rounding_mode=None), node(g, "div", x, x))
    assert match(op("div", Var("a"), Var("b"), rounding_mode=None), node(g, "div", x, x, rounding_mode="floor")) is None


def test_a_name_bound_twice_must_be_the_same_value():
    g, x, y = graph(4)
    x_times_sigmoid_x = op("mul", Var("x"), op("sigmoid", Var("x")))
    assert match(x_times_sigmoid_x, node(g, "mul", y, node(g, "sigmoid", x))) is None


def test_a_failed_match_binds_nothing():
    g, x, y = graph(4)
    product = node(g, "mul", x, node(g, "relu", y))
    silu_or_product = any_of(op("mul", Var("x"), op("sigmoid", Var("x"), bind="sigmoid")),
                             op("mul", Var("a"), op("relu", Var("b"))))
    (m,) = matches(silu_or_product, product)
    # the first alternative bound x (either way round) before failing at the sigmoid: none of that is kept
    assert m.bound == {"a": x, "b": y}
    assert m.nodes == (product.producer, node_of(g, "relu"))


def node_of(g, op_name):
    (n,) = g.find(op_name)
    return n
