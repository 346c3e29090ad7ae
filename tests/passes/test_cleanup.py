"""Dead-code elimination, common-subexpression elimination and no-op removal.

Every rewrite is checked by ``run_exact``: valid graph, honest ``modified``,
bit-equal outputs on random inputs through the reference interpreter.
"""
import pytest
import torch

from graphopt.ir import Graph, TensorType
from graphopt.ir.ops.opaque import Arg
from graphopt.ir.analysis import tensor_bytes
from graphopt.passes.cleanup import EliminateCommonSubexpressions, EliminateDeadCode, EliminateNoOps
from graphopt.testing import max_rel_error

from ir_interpreter import random_inputs, run_exact, run_graph


def f32(*shape):
    return TensorType(torch.float32, shape)


def opaque_square(g, x):
    """An impure node: a torch call the registry does not model."""
    return g.add_node("torch.opaque", [x], {"target": torch.ops.aten.mul.Tensor, "args": (Arg(0), Arg(0))})


# ---------------------------------------------------------------------- DCE
def test_dce_removes_dead_chains_and_unused_constants():
    g = Graph()
    x = g.add_input("x", f32(2, 3))
    w = g.add_constant(torch.randn(3), "w")
    dead = g.add_node("neg", [g.add_node("add", [x, w]).output])
    live = g.add_node("relu", [x])
    g.add_node("split", [dead.output], {"dim": 1, "sizes": [1, 2]})
    g.outputs = [live.output]
    result = run_exact(EliminateDeadCode(), g)
    assert result.stats == {"nodes_removed": 3, "constants_removed": 1}
    assert [n.op for n in g.nodes] == ["relu"] and not g.constants


def test_dce_keeps_impure_nodes_and_half_used_multi_output_nodes():
    g = Graph()
    x = g.add_input("x", f32(4, 6))
    opaque_square(g, x)
    g.add_node("dropout", [x], {"p": 0.5, "training": True})
    inference_dropout = g.add_node("dropout", [x], {"p": 0.5, "training": False})
    split = g.add_node("split", [x], {"dim": 1, "sizes": [2, 4]})
    g.outputs = [split.outputs[1]]
    result = EliminateDeadCode().call(g)
    assert result.modified and result.stats["nodes_removed"] == 1
    assert inference_dropout.graph is None
    assert g.op_counts() == {"dropout": 1, "split": 1, "torch.opaque": 1}
    assert not EliminateDeadCode().call(g).modified


def test_dce_reports_nothing_to_do():
    g = Graph()
    x = g.add_input("x", f32(2))
    g.outputs = [g.add_node("relu", [x]).output]
    assert run_exact(EliminateDeadCode(), g).modified is False


# ---------------------------------------------------------------------- CSE
def test_cse_merges_duplicates_including_commuted_operands():
    g = Graph()
    x = g.add_input("x", f32(2, 3))
    a, b = (g.add_node("relu", [x]) for _ in range(2))
    s1 = g.add_node("add", [a.output, b.output])
    s2 = g.add_node("add", [b.output, a.output])
    g.outputs = [g.add_node("mul", [s1.output, s2.output]).output]
    result = run_exact(EliminateCommonSubexpressions(), g)
    assert result.stats == {"constants_merged": 0, "nodes_merged": 2}
    assert g.op_counts() == {"add": 1, "mul": 1, "relu": 1}
    assert g.nodes[1].inputs == (a.output, a.output)


@pytest.mark.parametrize("op, attrs_a, attrs_b", [
    ("softmax", {"dim": 0}, {"dim": 1}),
    ("clamp", {"min": 0.0}, {"min": -0.0}),
    ("cast", {"dtype": torch.float16}, {"dtype": torch.float64}),
    ("sum", {"dims": [1]}, {"dims": [1], "keepdim": True}),
])
def test_cse_tells_different_attributes_apart(op, attrs_a, attrs_b):
    g = Graph()
    x = g.add_input("x", f32(2, 3))
    g.outputs = [g.add_node(op, [x], attrs).output for attrs in (attrs_a, attrs_b)]
    assert run_exact(EliminateCommonSubexpressions(), g).modified is False


def test_cse_compares_attributes_by_value():
    g = Graph()
    x = g.add_input("x", f32(2, 3))
    fills = [g.add_node("full", [], {"shape": shape, "value": float("nan"), "dtype": torch.float32})
             for shape in ([2, 3], (2, 3))]
    views = [g.add_node("reshape", [x], {"shape": shape}) for shape in ([3, 2], (3, 2))]
    g.outputs = [g.add_node("add", [f.output for f in fills]).output,
                 g.add_node("mul", [v.output for v in views]).output]
    result = run_exact(EliminateCommonSubexpressions(), g)
    assert result.stats["nodes_merged"] == 2  # NaN equals NaN, a tuple equals a list
    assert g.op_counts() == {"add": 1, "full": 1, "mul": 1, "reshape": 1}


def test_tensor_bytes_reads_values_whatever_the_layout():
    values = torch.tensor([[1.5, -2.0], [1.5, -2.0]])
    assert tensor_bytes(torch.tensor([1.5, -2.0]).expand(2, 2)) == tensor_bytes(values)  # zero stride
    assert tensor_bytes(torch.empty_strided((0, 3), (0, 0))) == tensor_bytes(torch.empty(0, 3)) == b""
    z = torch.tensor([1 + 2j, 3 - 1j])
    assert tensor_bytes(z.conj()) == tensor_bytes(z.conj().resolve_conj())
    assert tensor_bytes(values._neg_view()) == tensor_bytes(-values)


def test_cse_merges_duplicated_small_constants_but_not_big_ones_or_trainable_weights():
    g = Graph()
    x = g.add_input("x", f32(64))
    small = [g.add_constant(torch.full((4,), 2.0), "k") for _ in range(2)]
    big = [g.add_constant(torch.ones(64), "big") for _ in range(2)]
    weights = [g.add_constant(torch.ones(64), "w", parameter=True) for _ in range(2)]
    shapes = [g.add_constant(torch.tensor([2, 64]), "shape", parameter=True) for _ in range(2)]

    def both(make, operands):
        first, second = (make(v).output for v in operands)
        return g.add_node("add", [first, second]).output

    g.outputs = [
        both(lambda v: g.add_node("mul", [x, v]), big),
        both(lambda v: g.add_node("mul", [x, v]), weights),
        both(lambda k: g.add_node("mul", [g.add_node("reshape", [x], {"shape": [16, 4]}).output, k]), small),
        both(lambda s: g.add_node("broadcast_to", [g.add_node("relu", [x]).output, s], output_types=[f32(2, 64)]),
             shapes),
    ]
    result = run_exact(EliminateCommonSubexpressions(max_bytes=128), g)
    # two small float constants and two int64 shape "parameters" (not trainable) merge; then their readers
    assert result.stats == {"constants_merged": 2, "nodes_merged": 4}  # reshape, mul, relu, broadcast_to
    assert len(g.constants) == 6 and all(v.graph is g for v in (*big, *weights))


def test_cse_never_merges_impure_nodes():
    g = Graph()
    x = g.add_input("x", f32(8))
    outs = [opaque_square(g, x), opaque_square(g, x)]
    outs += [g.add_node("dropout", [x], {"p": 0.5, "training": True}) for _ in range(2)]
    g.outputs = [o.output for o in outs]
    assert EliminateCommonSubexpressions().call(g).modified is False


def test_cse_keeps_two_graph_outputs_apart_but_merges_into_an_inner_value():
    g = Graph()
    x = g.add_input("x", f32(3))
    both_out = [g.add_node("exp", [x]) for _ in range(2)]
    inner = g.add_node("neg", [x])
    named_out = g.add_node("neg", [x], name="result")
    g.outputs = [both_out[0].output, both_out[1].output, g.add_node("relu", [inner.output]).output,
                 named_out.output]
    result = run_exact(EliminateCommonSubexpressions(), g)
    assert result.stats["nodes_merged"] == 1 and g.op_counts()["exp"] == 2
    # the graph output kept its name, now on the surviving node's value
    assert g.outputs[3] is inner.output and inner.output.name == "result"


# ------------------------------------------------------------------- no-ops
def _noop_case(build):
    """A graph ``relu(x) -> <build> -> neg`` so each rewrite is seen from inside the graph."""
    g = Graph()
    x = g.add_input("x", f32(2, 3, 4))
    h = g.add_node("relu", [x]).output
    g.outputs = [g.add_node("neg", [build(g, h)]).output]
    return g


def _const(g, value, shape=()):
    return g.add_constant(torch.full(shape, value), "c")


REMOVED = {
    "identity": lambda g, h: g.add_node("identity", [h]).output,
    "inference dropout": lambda g, h: g.add_node("dropout", [h], {"p": 0.1, "training": False}).output,
    "training dropout p=0": lambda g, h: g.add_node("dropout", [h], {"p": 0.0, "training": True}).output,
    "cast to same dtype": lambda g, h: g.add_node("cast", [h], {"dtype": torch.float32}).output,
    "reshape to same shape": lambda g, h: g.add_node("reshape", [h], {"shape": [2, -1, 4]}).output,
    "expand to same shape": lambda g, h: g.add_node("expand", [h], {"shape": [-1, 3, 4]}).output,
    "repeat once": lambda g, h: g.add_node("repeat", [h], {"repeats": [1, 1, 1]}).output,
    "identity permute": lambda g, h: g.add_node("permute", [h], {"dims": [0, -2, 2]}).output,
    "transpose pair": lambda g, h: g.add_node("permute", [g.add_node("permute", [h], {"dims": [0, 2, 1]}).output],
                                             {"dims": [0, 2, 1]}).output,
    "whole slice": lambda g, h: g.add_node("slice", [h], {"dim": 1, "start": 0, "end": 3, "step": 1}).output,
    "whole slice, negative start": lambda g, h: g.add_node("slice", [h], {"dim": 1, "start": -3, "end": 9}).output,
    "one-input concat": lambda g, h: g.add_node("concat", [h], {"dim": 1}).output,
    "slice that is a concat's first input": lambda g, h: g.add_node(
        "slice", [g.add_node("concat", [h, _const(g, 0.0, (2, 5, 4))], {"dim": 1}).output],
        {"dim": 1, "start": 0, "end": 3, "step": 1}).output,
    "slice that is a concat's last input": lambda g, h: g.add_node(
        "slice", [g.add_node("concat", [_const(g, 0.0, (2, 2, 4)), h], {"dim": -2}).output],
        {"dim": 1, "start": 2, "end": 2**63 - 1, "step": 1}).output,
    "squeeze of unsqueeze": lambda g, h: g.add_node("squeeze", [g.add_node("unsqueeze", [h], {"dims": [1]}).output],
                                                    {"dims": [1]}).output,
    "flatten then reshape back": lambda g, h: g.add_node(
        "reshape", [g.add_node("flatten", [h], {"start_dim": 1}).output], {"shape": [2, 3, 4]}).output,
    "x+0": lambda g, h: g.add_node("add", [h, _const(g, 0.0)]).output,
    "0+x": lambda g, h: g.add_node("add", [_const(g, 0.0, (3, 1)), h]).output,
    "x-0": lambda g, h: g.add_node("sub", [h, _const(g, 0.0, (4,))]).output,
    "x*1": lambda g, h: g.add_node("mul", [h, _const(g, 1.0)]).output,
    "1*x": lambda g, h: g.add_node("mul", [_const(g, 1.0, (1, 1, 1)), h]).output,
    "x/1": lambda g, h: g.add_node("div", [h, _const(g, 1.0)]).output,
}


@pytest.mark.parametrize("case", REMOVED)
def test_noop_is_removed(case):
    g = _noop_case(REMOVED[case])
    result = run_exact(EliminateNoOps(), g)
    assert result.modified
    assert [n.op for n in g.nodes] == ["relu", "neg"]


KEPT = {
    "training dropout": lambda g, h: g.add_node("dropout", [h], {"p": 0.5, "training": True}).output,
    "cast to another dtype": lambda g, h: g.add_node("cast", [h], {"dtype": torch.float64}).output,
    "reshape to another shape": lambda g, h: g.add_node("reshape", [h], {"shape": [2, 4, 3]}).output,
    "expand to more dims": lambda g, h: g.add_node("expand", [h], {"shape": [1, 2, 3, 4]}).output,
    "permute of equal dims": lambda g, h: g.add_node("permute", [h], {"dims": [1, 0, 2]}).output,
    "partial slice": lambda g, h: g.add_node("slice", [h], {"dim": 2, "start": 1, "end": 4}).output,
    "two-input concat": lambda g, h: g.add_node("concat", [h, h], {"dim": 0}).output,
    "slice across two concat inputs": lambda g, h: g.add_node(
        "slice", [g.add_node("concat", [_const(g, 0.0, (2, 1, 4)), h], {"dim": 1}).output],
        {"dim": 1, "start": 0, "end": 3, "step": 1}).output,
    "strided slice of a concat input": lambda g, h: g.add_node(
        "slice", [g.add_node("concat", [h, h], {"dim": 1}).output], {"dim": 1, "start": 0, "end": 6, "step": 2}).output,
    "0-x": lambda g, h: g.add_node("sub", [_const(g, 0.0), h]).output,
    "1/x": lambda g, h: g.add_node("div", [_const(g, 1.0), h]).output,
    "x*1 that broadcasts": lambda g, h: g.add_node("mul", [h, _const(g, 1.0, (5, 1, 1, 1))]).output,
    "x*1 that promotes": lambda g, h: g.add_node("mul", [h, g.add_constant(torch.ones(4, dtype=torch.float64))]).output,
    "x+c, c not all 0": lambda g, h: g.add_node("add", [h, g.add_constant(torch.tensor([0.0, 0.0, 0.0, 1.0]))]).output,
    "floor(x/1)": lambda g, h: g.add_node("div", [h, _const(g, 1.0)], {"rounding_mode": "floor"}).output,
    "unsqueeze of reshape": lambda g, h: g.add_node(
        "unsqueeze", [g.add_node("reshape", [h], {"shape": [6, 4]}).output], {"dims": [1]}).output,
}


@pytest.mark.parametrize("case", KEPT)
def test_op_that_changes_its_input_is_kept(case):
    g = _noop_case(KEPT[case])
    ops = [n.op for n in g.nodes]
    assert run_exact(EliminateNoOps(), g).modified is False
    assert [n.op for n in g.nodes] == ops


def test_permutes_compose_into_one():
    g = _noop_case(lambda g, h: g.add_node("permute", [g.add_node("permute", [h], {"dims": [1, 0, 2]}).output],
                                           {"dims": [0, 2, 1]}).output)
    result = run_exact(EliminateNoOps(), g)
    assert result.stats == {"nodes_removed": 1, "pairs_composed": 1, "masks_dropped": 0}  # the inner permute
    (permute,) = g.find("permute")
    assert permute.attrs["dims"] == [1, 2, 0] and permute.inputs[0].producer.op == "relu"


def test_reshape_chain_collapses_and_keeps_a_shared_inner_reshape():
    g = Graph()
    x = g.add_input("x", f32(2, 3, 4))
    inner = g.add_node("reshape", [x], {"shape": [6, 4]})
    outer = g.add_node("reshape", [inner.output], {"shape": [4, 6]})
    g.outputs = [outer.output, g.add_node("relu", [inner.output]).output]
    result = run_exact(EliminateNoOps(), g)
    assert result.stats["pairs_composed"] == 1 and outer.inputs == (x,)
    assert inner.graph is g


def test_noops_with_symbolic_dims():
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, ("batch", "seq", 8)))
    h = g.add_node("relu", [x]).output
    h = g.add_node("slice", [h], {"dim": 1, "start": 0, "end": 2**63 - 1, "step": 1}).output
    h = g.add_node("squeeze", [g.add_node("unsqueeze", [h], {"dims": [2]}).output], {"dims": [2]}).output
    kept = g.add_node("slice", [h], {"dim": 1, "start": 1, "end": 2**63 - 1, "step": 1},
                      output_types=[TensorType(torch.float32, ("batch", "seq - 1", 8))])
    g.outputs = [kept.output]
    result = run_exact(EliminateNoOps(), g)
    assert result.stats["nodes_removed"] == 3
    assert [n.op for n in g.nodes] == ["relu", "slice"]


def test_graph_output_is_never_moved_onto_an_input_or_another_output():
    g = Graph()
    x = g.add_input("x", f32(3))
    onto_input = g.add_node("identity", [x])
    relu = g.add_node("relu", [x])
    onto_output = g.add_node("identity", [relu.output])
    g.outputs = [onto_input.output, relu.output, onto_output.output]
    assert run_exact(EliminateNoOps(), g).modified is False


def test_removed_graph_output_keeps_its_name():
    g = Graph()
    x = g.add_input("x", f32(3))
    relu = g.add_node("relu", [x])
    g.outputs = [g.add_node("identity", [relu.output], name="logits").output]
    run_exact(EliminateNoOps(), g)
    assert g.outputs == [relu.output] and relu.output.name == "logits"


def _attention(mask=None, parameter=False, batch=2):
    """``sdpa(q, k, v, mask)`` over 2 heads of 5 tokens; ``mask`` becomes a constant (a parameter if asked)."""
    g = Graph()
    q, k, v = (g.add_input(n, f32(batch, 2, 5, 4)) for n in "qkv")
    inputs = [q, k, v] if mask is None else [q, k, v, g.add_constant(mask, "mask", parameter=parameter)]
    g.outputs = [g.add_node("sdpa", inputs).output]
    return g


EMPTY_MASKS = {
    "all True": torch.ones(5, 5, dtype=torch.bool),
    "all True, per head": torch.ones(1, 2, 5, 5, dtype=torch.bool),
    "zeros added": torch.zeros(2, 1, 5, 5),
}


@pytest.mark.parametrize("case", EMPTY_MASKS)
def test_mask_that_masks_nothing_is_dropped(case):
    g = _attention(EMPTY_MASKS[case])
    inputs = random_inputs(g)
    expected = run_graph(g, *inputs)
    result = EliminateNoOps().call(g)
    assert result.modified and result.stats["masks_dropped"] == 1
    (sdpa,) = g.find("sdpa")
    assert len(sdpa.inputs) == 3
    torch.testing.assert_close(run_graph(g, *inputs), expected)  # another SDPA kernel: equal up to rounding


KEPT_MASKS = {
    "one score masked": torch.ones(5, 5, dtype=torch.bool).index_put_((torch.tensor(0), torch.tensor(4)),
                                                                      torch.tensor(False)),
    "a bias that is not zero": torch.full((5, 5), 0.5),
}


@pytest.mark.parametrize("case", KEPT_MASKS)
def test_mask_that_masks_something_is_kept(case):
    g = _attention(KEPT_MASKS[case])
    assert run_exact(EliminateNoOps(), g).modified is False
    assert len(g.find("sdpa")[0].inputs) == 4


def test_trainable_or_widening_masks_are_kept():
    trainable = _attention(torch.zeros(5, 5), parameter=True)  # a learned bias that starts at zero
    widening = _attention(torch.ones(3, 1, 5, 5, dtype=torch.bool), batch=1)  # would broadcast q's batch to 3
    for g in (trainable, widening):
        assert EliminateNoOps().call(g).modified is False
        assert len(g.find("sdpa")[0].inputs) == 4


def test_hf_vit_attention_runs_without_its_all_true_mask():
    """transformers' ViT hands SDPA an all-True mask; O2 drops it, and the onnxruntime lowering then
    has no NaN guard (IsNaN and two Where per layer) left to run."""
    import graphopt
    from graphopt.emitters.onnx import DEFAULT_OPSET
    from graphopt.models import get_case
    from graphopt.passes.targets import optimize_for_target

    model, inputs = get_case("transformers.vit").build()
    g = graphopt.capture(model, inputs)
    assert all(len(n.inputs) == 4 for n in g.find("sdpa"))
    g = graphopt.optimize(g, "O2")
    sdpas = g.find("sdpa")
    assert sdpas and all(len(n.inputs) == 3 for n in sdpas)
    for_cpu = optimize_for_target(g, "onnxruntime-cpu", DEFAULT_OPSET)
    ops = [n.op_type for n in for_cpu.to_onnx(opset=DEFAULT_OPSET, target="onnxruntime-cpu").graph.node]
    assert "IsNaN" not in ops and "Where" not in ops
    with torch.no_grad():
        assert max_rel_error(model(*inputs), g.to_torch()(*inputs)) <= 1e-5


def test_noops_report_nothing_to_do():
    g = Graph()
    x = g.add_input("x", f32(2, 3))
    g.outputs = [g.add_node("permute", [g.add_node("relu", [x]).output], {"dims": [1, 0]}).output]
    assert run_exact(EliminateNoOps(), g).modified is False


# ------------------------------------------------------ captured torch models
class Noisy(torch.nn.Module):
    """Inference dropout, x*1, x+0, a duplicated tanh, a transpose pair, a reshape chain."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, x):
        y = self.dropout(self.linear(x)) * 1
        a = torch.tanh(y) + 0
        z = (a + torch.tanh(y)).reshape(2, 2, 4).transpose(1, 2).transpose(1, 2)
        return z.reshape(4, 4).reshape(2, 8)


@pytest.fixture(scope="module")
def noisy():
    import graphopt

    model, x = Noisy().eval(), torch.randn(2, 8)
    graph = graphopt.capture(model, (x,))
    with torch.no_grad():
        expected = model(x)
    return graph, x, expected


def _run_on_capture(p, noisy):
    captured, x, expected = noisy
    g = captured.clone()
    result = run_exact(p, g, [x])
    torch.testing.assert_close(run_graph(g, x)[0], expected)
    return g, result


def test_noops_on_a_captured_model(noisy):
    g, result = _run_on_capture(EliminateNoOps(), noisy)
    assert result.modified and not (g.find("permute") or g.find("dropout"))
    assert not g.find("reshape") and not g.find("mul")  # the reshapes end in the shape they started from


def test_cse_on_a_captured_model(noisy):
    g, result = _run_on_capture(EliminateCommonSubexpressions(), noisy)
    assert result.stats["nodes_merged"] == 1 and len(g.find("tanh")) == 1


def test_dce_on_a_captured_model(noisy):
    g, _ = _run_on_capture(EliminateNoOps(), noisy)
    _, result = _run_on_capture(EliminateDeadCode(), (g, *noisy[1:]))
    assert result.stats == {"nodes_removed": 0, "constants_removed": 2}  # the scalars of x*1 and x+0


def test_o1_on_a_captured_model_keeps_weights_and_training_dropout():
    import graphopt

    class TrainingDropout(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.dropout(torch.relu(x), 0.3, training=True) * 1.0

    g = graphopt.capture(TrainingDropout(), (torch.randn(4),))
    g = graphopt.optimize(g, verify=True)
    assert g.op_counts() == {"relu": 1, "torch.opaque": 1}
    assert "eliminate_noops" in g.meta["report"].fired


def test_noops_keep_a_trainable_weight_that_starts_at_one():
    import graphopt

    class ScaledTanh(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return torch.tanh(x) * self.scale

    model = ScaledTanh()
    g = graphopt.optimize(graphopt.capture(model, (torch.randn(2, 8),)), verify=True)
    assert len(g.find("mul")) == 1 and any(v.data is model.scale for v in g.constants.values())


# ------------------------------------------------------- a loaded ONNX model
def test_o1_shrinks_an_onnx_model_with_noops_and_duplicated_initializers():
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    import graphopt

    bias = torch.randn(4).tolist()
    nodes = [
        helper.make_node("Identity", ["x"], ["x1"]),
        helper.make_node("Transpose", ["x1"], ["t1"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1]),
        helper.make_node("Mul", ["t2", "one"], ["m"]),
        helper.make_node("Add", ["m", "bias_a"], ["a"]),
        helper.make_node("Add", ["m", "bias_b"], ["b"]),
        helper.make_node("Dropout", ["a"], ["da"]),
        helper.make_node("Mul", ["da", "b"], ["y"]),
    ]
    initializers = [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
                    helper.make_tensor("bias_a", TensorProto.FLOAT, [4], bias),
                    helper.make_tensor("bias_b", TensorProto.FLOAT, [4], bias)]
    graph = helper.make_graph(nodes, "noisy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    g = graphopt.optimize(graphopt.load_onnx(model), level="O1", verify=True)
    assert g.op_counts() == {"add": 1, "mul": 1}, str(g)
    optimized = g.to_onnx()
    assert len(optimized.graph.initializer) == 1 and [o.name for o in optimized.graph.output] == ["y"]
    x = torch.randn(2, 3, 4).numpy()
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    torch.testing.assert_close(run(optimized)[0], run(model)[0], rtol=0, atol=0)
