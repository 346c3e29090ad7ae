"""The IR core: construction, use-def upkeep, verification, printing and analyses."""
import pytest
import torch

from graphopt.ir import Graph, OpaqueType, TensorType, VerificationError, node_bytes, node_flops


def small_graph():
    g = Graph("small")
    x = g.add_input("x", TensorType(torch.float32, ("batch", 8)))
    w = g.add_constant(torch.randn(4, 8), "w", parameter=True)
    lin = g.add_node("linear", [x, w, None])
    act = g.add_node("relu", [lin.output])
    g.outputs = [act.output]
    return g, x, w, lin, act


def test_types_are_inferred_through_symbolic_dims():
    g, _, _, lin, act = small_graph()
    assert lin.output.type == TensorType(torch.float32, ("batch", 4))
    parts = g.add_node("split", [act.output], {"dim": 1, "sizes": [1, 3]})
    assert [o.type.shape for o in parts.outputs] == [("batch", 1), ("batch", 3)]
    g.verify()


def test_a_size_derived_from_a_symbol_is_a_new_symbol_not_a_number():
    g, _, _, _, act = small_graph()  # act: (batch, 4)
    flat = g.add_node("reshape", [act.output], {"shape": [-1]})
    (size,) = flat.output.type.shape
    assert isinstance(size, str) and size != "batch"  # batch * 4: symbolic, and not batch itself
    both = g.add_node("concat", [act.output, act.output], {"dim": 1})
    assert both.output.type.shape == ("batch", 8)


def test_use_lists_follow_mutations():
    g, x, w, lin, act = small_graph()
    assert lin.output.users() == [act]
    neg = g.add_node("neg", [x], before=lin)
    lin.output.replace_all_uses_with(neg.output)
    assert act.inputs == (neg.output,) and lin.output.uses() == []
    g.remove_node(lin)
    assert g.remove_unused_constants() == 1
    g.verify()
    assert [n.op for n in g.nodes] == ["neg", "relu"]


def test_replace_all_uses_rewires_graph_outputs():
    g, x, _, _, act = small_graph()
    ident = g.add_node("identity", [act.output])
    g.outputs = [ident.output]
    ident.output.replace_all_uses_with(act.output)
    assert g.outputs == [act.output]


def test_remove_node_refuses_used_outputs():
    g, _, _, lin, _ = small_graph()
    with pytest.raises(ValueError, match="still used"):
        g.remove_node(lin)


def test_verifier_rejects_use_before_definition():
    g, x, _, lin, act = small_graph()
    g.reorder(g.nodes[::-1])
    with pytest.raises(VerificationError, match="used before it is defined"):
        g.verify()
    g.sort()
    g.verify()


def test_verifier_rejects_wrong_output_count_and_add_node_unknown_ops():
    g, x, *_ = small_graph()
    g.add_node("split", [x], {"dim": 1, "sizes": [4, 4]}, output_types=[TensorType(torch.float32, ("batch", 4))])
    with pytest.raises(VerificationError, match="outputs"):
        g.verify()
    g2, x2, *_ = small_graph()
    with pytest.raises(KeyError, match="unknown IR op 'no_such_op'"):
        g2.add_node("no_such_op", [x2], output_types=[OpaqueType()])
    assert not x2.uses() or all(n.graph is g2 for n, _ in x2.uses())


def test_printing_networkx_hash_and_clone():
    g, *_ = small_graph()
    text = str(g)
    assert "linear(%x, %w, None)" in text and "return %relu" in text
    nxg = g.to_networkx()
    assert nxg.number_of_edges() == 4  # x, w -> linear -> relu -> output
    copy = g.clone()
    copy.verify()
    assert copy.structural_hash() == g.structural_hash()
    assert copy.constants["w"].data is g.constants["w"].data  # shared, not copied
    copy.add_node("neg", [copy.outputs[0]])
    assert copy.structural_hash() != g.structural_hash()


def test_structural_hash_ignores_names_and_weights():
    a, *_ = small_graph()
    b, *_ = small_graph()
    b.inputs[0].name = "renamed"
    assert a.structural_hash() == b.structural_hash()


def test_flops_and_bytes():
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, (2, 8)))
    w = g.add_constant(torch.randn(4, 8), "w")
    lin = g.add_node("linear", [x, w, None])
    assert node_flops(lin) == 2 * 2 * 4 * 8
    assert node_bytes(lin) == 4 * (16 + 32 + 8)
    conv_in = g.add_input("img", TensorType(torch.float32, (1, 3, 8, 8)))
    k = g.add_constant(torch.randn(6, 3, 3, 3), "k")
    conv = g.add_node("conv", [conv_in, k, None], {"padding": [1, 1], "stride": [1, 1], "dilation": [1, 1]})
    assert conv.output.type.shape == (1, 6, 8, 8)
    assert node_flops(conv) == 2 * 6 * 8 * 8 * 27
    sym = g.add_input("s", TensorType(torch.float32, ("n", 8)))
    assert node_flops(g.add_node("linear", [sym, w, None])) == 0  # unknown until shapes are static
