"""Regions (a node holding a subgraph) and state kept across calls of an emitted module."""
import pytest
import torch

from graphopt.ir import Graph, TensorType, VerificationError
from graphopt.ir.region import inline, interpret, outline

F32 = torch.float32


def residual_graph():
    """y = neg(relu(x * w)) + x * w: the relu-neg pair is the region to outline."""
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2, 3)))
    w = g.add_constant(torch.randn(3), "w", parameter=True)
    scaled = g.add_node("mul", [x, w])
    relu = g.add_node("relu", [scaled.output])
    neg = g.add_node("neg", [relu.output])
    out = g.add_node("add", [neg.output, scaled.output])
    g.outputs = [out.output]
    return g, (relu, neg)


def test_outline_makes_one_node_that_computes_the_same():
    g, members = residual_graph()
    x = torch.randn(2, 3)
    expected = interpret(g, [x])[0]
    region = outline(g, list(members), "block")
    g.verify()
    assert g.op_counts() == {"add": 1, "mul": 1, "region": 1}
    assert region.attrs["body"].op_counts() == {"neg": 1, "relu": 1}
    torch.testing.assert_close(interpret(g, [x])[0], expected)
    torch.testing.assert_close(g.to_torch()(x)[0], expected)


def test_outline_takes_constants_and_returns_every_escaping_value():
    g, (relu, neg) = residual_graph()
    scaled = g.find("mul")[0]
    region = outline(g, [scaled, relu], "front")  # mul reads w; both its result and relu's escape
    body = region.attrs["body"]
    assert list(body.constants) == ["w"] and len(body.inputs) == 1
    assert len(region.outputs) == 2 and not g.constants  # the weight moved into the body
    g.verify()


def test_region_prints_hashes_clones_and_inlines_back():
    g, members = residual_graph()
    before_hash = g.structural_hash()
    region = outline(g, list(members), "block")
    text = str(g)
    assert "region(%mul; body=<body block: 2 nodes>" in text and "      %relu" in text
    copy = g.clone()
    copy.verify()
    assert copy.structural_hash() == g.structural_hash() != before_hash
    assert copy.find("region")[0].attrs["body"] is not region.attrs["body"]  # a clone owns its bodies
    other_body = copy.find("region")[0].attrs["body"]
    other_body.find("neg")[0].op = "abs"
    assert copy.structural_hash() != g.structural_hash()  # the body is part of the hash
    inline(region)
    g.verify()
    assert g.structural_hash() == before_hash


def test_verifier_checks_the_body_and_its_interface():
    g, members = residual_graph()
    region = outline(g, list(members), "block")
    body = region.attrs["body"]
    body.outputs = [body.inputs[0]] * 2
    with pytest.raises(VerificationError, match="node block .*has 1 outputs|2 outputs"):
        g.verify()
    body.outputs = [body.find("relu")[0].output]
    body.find("relu")[0].outputs[0].type = TensorType(F32, (9,))
    with pytest.raises(VerificationError, match="output 0 is float32\\[2,3\\], its body gives float32\\[9\\]"):
        g.verify()


def accumulator_graph():
    """total = stored total (x while empty) + x; stored again: a running sum across calls."""
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2,)))
    previous = g.add_node("state_load", [x], {"key": "total"})
    total = g.add_node("add", [previous.output, x])
    stored = g.add_node("state_store", [total.output], {"key": "total"})
    g.outputs = [stored.output]
    return g


def test_state_persists_across_calls_and_resets():
    module = accumulator_graph().to_torch()
    x = torch.ones(2)
    assert module(x)[0].tolist() == [2.0, 2.0]  # empty slot: x + x
    assert module(x)[0].tolist() == [3.0, 3.0]
    module.graphopt_state.reset()
    assert module(x)[0].tolist() == [2.0, 2.0]


def test_two_emitted_modules_never_share_state():
    g = accumulator_graph()
    first, second = g.to_torch(), g.to_torch()
    first(torch.ones(2))
    assert second(torch.ones(2))[0].tolist() == [2.0, 2.0]


def test_each_guidance_branch_keeps_its_own_slots():
    module = accumulator_graph().to_torch()
    x = torch.ones(2)
    module(x)
    with module.graphopt_state.branch("uncond"):
        assert module(x * 10)[0].tolist() == [20.0, 20.0]  # its own empty slot
    assert module(x)[0].tolist() == [3.0, 3.0]  # the default branch's total, untouched


def test_state_inside_a_region_is_the_modules_state():
    g = accumulator_graph()
    outline(g, g.nodes, "accumulate")
    g.verify()
    module = g.to_torch()
    module(torch.ones(2))
    assert module(torch.ones(2))[0].tolist() == [3.0, 3.0]
    assert module.accumulate.graphopt_state is module.graphopt_state


def test_state_ops_are_never_merged_or_folded():
    from graphopt.pass_manager import PassManager

    g = accumulator_graph()
    PassManager(["O1"]).run(g)
    assert g.op_counts() == {"add": 1, "state_load": 1, "state_store": 1}


def test_torch_compile_runs_a_stateful_region_without_graph_breaks():
    g = accumulator_graph()
    outline(g, g.nodes, "accumulate")
    module = g.to_torch()
    explanation = torch._dynamo.explain(module)(torch.ones(2))
    assert explanation.graph_break_count == 0
    module.graphopt_state.reset()
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    compiled(torch.ones(2))
    assert compiled(torch.ones(2))[0].tolist() == [3.0, 3.0]


def test_onnx_emission_inlines_a_region_and_refuses_state():
    import onnxruntime as ort

    g, members = residual_graph()
    x = torch.randn(2, 3)
    expected = interpret(g, [x])[0]
    outline(g, list(members), "block")
    model = g.to_onnx()
    assert [n.op_type for n in model.graph.node] == ["Mul", "Relu", "Neg", "Identity", "Add"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), expected)
    from graphopt.emitters.onnx import EmitError

    with pytest.raises(EmitError, match="state_load keeps state across calls, which an ONNX model cannot"):
        accumulator_graph().to_onnx()


def test_o2_runs_around_and_inside_a_region_of_a_real_model():
    """GPT-2 (transformers, small config) with a slice of its graph outlined: O2 treats the region as one
    node (it is opaque to fusion), the verifier checks the body, and eager, torch and ONNX agree."""
    import onnxruntime as ort

    import graphopt
    from graphopt.models import get_case
    from graphopt.testing import max_rel_error

    model, inputs = get_case("transformers.gpt2").build()
    expected = model(*inputs)
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    g = graphopt.capture(model, inputs)
    nodes = g.nodes
    region = outline(g, nodes[len(nodes) // 3: len(nodes) // 2], "middle")  # a contiguous slice is convex
    g = graphopt.optimize(g, "O2", verify=True)
    assert region.graph is g and g.op_counts()["region"] == 1
    got = g.to_torch()(*inputs)
    assert max_rel_error(expected, got[0] if isinstance(got, (tuple, list)) else got) < 1e-4
    session = ort.InferenceSession(g.to_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {v.name: x.numpy() for v, x in zip(g.inputs, inputs)}
    assert max_rel_error(expected, torch.from_numpy(session.run(None, feeds)[0])) < 1e-4
