"""Batch-norm folding, per-channel scale/shift folding and matmul→linear fusion.

Folding reassociates float arithmetic, so outputs are compared within a
relative tolerance instead of bit for bit; everything else ``run_exact``
checks (valid, re-typed graph; honest ``modified``) is checked here too.
"""
import io

import pytest
import torch

import graphopt
from graphopt.ir import Graph, TensorType
from graphopt.models import get_case
from graphopt.passes.fusion import FoldBatchNorm, FoldConvBias, MatMulAddToLinear
from graphopt.testing import max_rel_error, run_onnxruntime

from ir_interpreter import random_inputs, run_graph

RTOL = 1e-5


def f32(*shape):
    return TensorType(torch.float32, shape)


def run_folding(p, graph, inputs=None, interpret=True):
    """Run pass ``p``; the graph stays valid with checked types, ``modified`` is honest, outputs agree.

    Real models skip the interpreter (``interpret=False``): their tests compare the emitted graph with eager.
    """
    inputs = list(inputs) if inputs is not None else random_inputs(graph)
    expected = run_graph(graph, *inputs) if interpret else None
    before = graph.structural_hash()
    result = p.call(graph)
    assert result.graph is graph
    graph.verify(check_types=True)
    assert result.modified == (graph.structural_hash() != before), result
    if interpret:
        assert max_rel_error(expected, run_graph(graph, *inputs)) <= RTOL
    return result


def add_batch_norm(g, x, channels, parameter=False):
    stats = [torch.randn(channels) * 0.5 + 1, torch.randn(channels), torch.randn(channels), torch.rand(channels) + 0.5]
    names = ["gamma", "beta", "mean", "var"]
    values = [g.add_constant(t, n, parameter=parameter and n in ("gamma", "beta")) for t, n in zip(stats, names)]
    return g.add_node("batch_norm", [x, *values], {"eps": 1e-3})


def conv_graph(x_shape, w_shape, bias, parameter=False, **attrs):
    g = Graph()
    x = g.add_input("x", f32(*x_shape))
    w = g.add_constant(torch.randn(w_shape), "w", parameter=parameter)
    b = g.add_constant(torch.randn(bias), "b", parameter=parameter) if bias else None
    conv_attrs = {"stride": [1], "padding": [1], "dilation": [1], "groups": 1, "transposed": False,
                  "output_padding": [0]}
    conv_attrs.update(attrs)
    spatial = len(x_shape) - 2
    for key in ("stride", "padding", "dilation", "output_padding"):
        conv_attrs[key] = conv_attrs[key] * spatial
    return g, g.add_node("conv", [x, w, b], conv_attrs)


# ------------------------------------------------------------ batch norm
CONVS = {
    "conv2d+bias": ((2, 4, 5, 5), (6, 4, 3, 3), 6, {}),
    "conv2d": ((2, 4, 5, 5), (6, 4, 3, 3), 0, {}),
    "grouped": ((2, 4, 5, 5), (6, 2, 3, 3), 6, {"groups": 2}),
    "depthwise": ((1, 4, 5, 5), (4, 1, 3, 3), 0, {"groups": 4}),
    "conv1d": ((2, 3, 7), (5, 3, 3), 5, {}),
    "transposed": ((2, 4, 5, 5), (4, 3, 3, 3), 3, {"transposed": True}),
    "transposed_grouped": ((2, 4, 5, 5), (4, 3, 3, 3), 6, {"transposed": True, "groups": 2}),
    "transposed3d": ((1, 2, 3, 3, 3), (2, 4, 2, 2, 2), 0, {"transposed": True, "stride": [2]}),
}


@pytest.mark.parametrize("case", CONVS)
def test_batch_norm_folds_into_every_kind_of_convolution(case):
    x_shape, w_shape, bias, attrs = CONVS[case]
    g, conv = conv_graph(x_shape, w_shape, bias, **attrs)
    channels = conv.output.type.shape[1]
    g.outputs = [g.add_node("relu", [add_batch_norm(g, conv.output, channels).output]).output]
    result = run_folding(FoldBatchNorm(), g)
    assert result.stats["batch_norms_folded"] == 1
    assert g.op_counts() == {"conv": 1, "relu": 1}
    assert len(g.constants) == 2 and conv.inputs[2] is not None  # folded weight and bias, nothing else


@pytest.mark.parametrize("op", ["linear", "gemm"])
def test_batch_norm_folds_into_a_linear_layer_with_2d_output(op):
    g = Graph()
    x = g.add_input("x", f32(3, 4))
    w = g.add_constant(torch.randn(5, 4), "w")
    attrs = {"trans_b": True, "beta": 1.0} if op == "gemm" else {}
    dense = g.add_node(op, [x, w, g.add_constant(torch.randn(5), "b")], attrs)
    g.outputs = [add_batch_norm(g, dense.output, 5).output]
    assert run_folding(FoldBatchNorm(), g).stats["batch_norms_folded"] == 1
    assert g.op_counts() == {op: 1} and g.outputs == [dense.output]


def test_batch_norm_is_left_alone_where_folding_would_change_the_graph_s_meaning():
    g = Graph()
    x = g.add_input("x", f32(2, 4, 5, 5))
    seq = g.add_input("seq", f32(2, 3, 4))
    mean = g.add_input("mean", f32(6))  # statistics computed at run time
    w = g.add_constant(torch.randn(6, 4, 3, 3), "w")
    attrs = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "transposed": False,
             "output_padding": [0, 0]}
    shared = g.add_node("conv", [x, w, None], attrs)  # also read by a relu
    exported = g.add_node("conv", [x, w, None], attrs)  # also a graph output
    dynamic = g.add_node("conv", [x, w, None], attrs)
    bn_dynamic = add_batch_norm(g, dynamic.output, 6)
    bn_dynamic.replace_input(3, mean)
    over_tokens = g.add_node("linear", [seq, g.add_constant(torch.randn(4, 4), "wl"), None])  # BN over dim 1 = 3 tokens
    g.outputs = [add_batch_norm(g, shared.output, 6).output, g.add_node("relu", [shared.output]).output,
                 add_batch_norm(g, exported.output, 6).output, exported.output, bn_dynamic.output,
                 add_batch_norm(g, over_tokens.output, 3).output]
    result = run_folding(FoldBatchNorm(), g, random_inputs(g))
    assert not result.modified and g.op_counts()["batch_norm"] == 4


def test_trainable_weights_fold_into_plain_constants_unless_told_not_to():
    g, conv = conv_graph((2, 4, 5, 5), (6, 4, 3, 3), 6, parameter=True)
    bn = add_batch_norm(g, conv.output, 6, parameter=True)
    g.outputs = [bn.output]
    result = run_folding(FoldBatchNorm(fold_trainable=False), g)
    assert not result.modified and result.stats["skipped_trainable"] == 1
    run_folding(FoldBatchNorm(), g)
    assert g.op_counts() == {"conv": 1}
    assert not any(v.is_parameter for v in g.constants.values())
    assert sorted(g.constants) == ["b_bn", "w_bn"]


# ------------------------------------------------- multiply and add by constants
def test_a_spelled_out_frozen_batch_norm_folds_into_the_conv():
    g, conv = conv_graph((2, 4, 5, 5), (6, 4, 3, 3), 0)
    scaled = g.add_node("mul", [g.add_constant(torch.randn(6, 1, 1), "scale"), conv.output])
    shifted = g.add_node("add", [scaled.output, g.add_constant(torch.randn(1, 6, 1, 1), "shift")])
    g.outputs = [g.add_node("sub", [shifted.output, g.add_constant(torch.tensor(0.5), "half")]).output]
    result = run_folding(FoldConvBias(), g)
    assert result.stats == {"adds_folded": 2, "muls_folded": 1, "skipped_trainable": 0}
    assert g.op_counts() == {"conv": 1} and g.outputs == [conv.output]
    assert len(g.constants) == 2


@pytest.mark.parametrize("case", ["transposed_grouped", "depthwise"])
def test_per_channel_scale_respects_the_weight_layout(case):
    x_shape, w_shape, bias, attrs = CONVS[case]
    g, conv = conv_graph(x_shape, w_shape, bias, **attrs)
    channels = conv.output.type.shape[1]
    g.outputs = [g.add_node("mul", [conv.output, g.add_constant(torch.randn(channels, 1, 1), "s")]).output]
    assert run_folding(FoldConvBias(), g).stats["muls_folded"] == 1
    assert g.op_counts() == {"conv": 1}


def test_linear_and_gemm_take_scales_and_shifts_over_their_last_dim():
    g = Graph()
    x = g.add_input("x", f32(2, 3, 4))
    a = g.add_input("a", f32(3, 4))
    linear = g.add_node("linear", [x, g.add_constant(torch.randn(5, 4), "w"), None])
    shifted = g.add_node("add", [linear.output, g.add_constant(torch.randn(1, 1, 5), "t")])
    gemm = g.add_node("gemm", [a, g.add_constant(torch.randn(4, 5), "B"), g.add_constant(torch.randn(3, 1), "C")],
                      {"alpha": 0.5, "beta": 2.0})
    scaled = g.add_node("mul", [gemm.output, g.add_constant(torch.randn(5), "s")])
    g.outputs = [shifted.output, scaled.output]
    result = run_folding(FoldConvBias(), g)
    assert result.stats["adds_folded"] == 1 and result.stats["muls_folded"] == 1
    assert g.op_counts() == {"gemm": 1, "linear": 1}
    assert linear.inputs[2].type.shape == (5,) and gemm.inputs[2].type.shape == (3, 5)


def test_epilogues_that_are_not_per_channel_constants_stay():
    g, conv = conv_graph((2, 4, 5, 5), (6, 4, 3, 3), 6)
    y = g.add_input("y", f32(6, 1, 1))
    other = g.add_node("conv", list(conv.inputs), dict(conv.attrs))
    spatial = g.add_node("add", [conv.output, g.add_constant(torch.randn(5, 5), "spatial")])
    dynamic = g.add_node("mul", [other.output, y])
    g.outputs = [spatial.output, dynamic.output]
    for c, op, first in [(torch.randn(2, 6, 1, 1), "add", False),  # broadcasting adds a batch
                         (torch.randn(6, 1, 1), "sub", True),  # c - conv(x) negates the conv
                         (torch.randn(6, 1, 1, dtype=torch.float64), "mul", False)]:  # promotes to float64
        node = g.add_node("conv", list(conv.inputs), dict(conv.attrs))
        constant = g.add_constant(c, "c")
        g.outputs.append(g.add_node(op, [constant, node.output] if first else [node.output, constant]).output)
    shared = g.add_node("conv", list(conv.inputs), dict(conv.attrs))
    g.outputs += [g.add_node("mul", [shared.output, g.add_constant(torch.randn(6, 1, 1), "s")]).output, shared.output]
    gemm = g.add_node("gemm", [g.add_input("a", f32(3, 4)), g.add_constant(torch.randn(4, 5), "B"),
                               g.add_constant(torch.randn(5), "C")], {"beta": 2.0})
    g.outputs.append(g.add_node("add", [gemm.output, g.add_constant(torch.randn(5), "t")]).output)
    result = run_folding(FoldConvBias(), g)
    assert not result.modified


def test_constant_epilogues_of_trainable_weights_fold_only_in_inference_graphs():
    g, conv = conv_graph((2, 4, 5, 5), (6, 4, 3, 3), 6, parameter=True)
    g.outputs = [g.add_node("mul", [conv.output, g.add_constant(torch.randn(6, 1, 1), "s")]).output]
    assert run_folding(FoldConvBias(fold_trainable=False), g).stats["skipped_trainable"] == 1
    assert run_folding(FoldConvBias(), g).stats["muls_folded"] == 1


# ------------------------------------------------------- matmul to linear
def test_matmul_and_bias_add_become_linear_with_a_transposed_weight():
    g = Graph()
    x = g.add_input("x", f32(2, 3, 4))
    w = g.add_constant(torch.randn(4, 5), "w")
    b = g.add_constant(torch.randn(5), "b")
    g.outputs = [g.add_node("add", [b, g.add_node("matmul", [x, w]).output]).output]
    output_name = g.outputs[0].name
    result = run_folding(MatMulAddToLinear(), g)
    assert result.stats == {"matmuls_fused": 1, "biases_fused": 1, "gemms_fused": 0, "skipped_trainable": 0}
    (linear,) = g.nodes
    assert linear.op == "linear" and linear.inputs[2] is b and g.outputs[0].name == output_name
    assert torch.equal(linear.inputs[1].data, w.data.t()) and sorted(g.constants) == ["b", "w_t"]


def test_matmul_by_a_transposed_parameter_reads_the_parameter_itself():
    g = Graph()
    x = g.add_input("x", f32(2, 3, 4))
    w = g.add_constant(torch.randn(5, 4), "w", parameter=True)
    product = g.add_node("matmul", [x, g.add_node("permute", [w], {"dims": [1, 0]}).output])
    other = g.add_node("neg", [product.output])  # a second reader: the add cannot become the bias
    g.outputs = [g.add_node("add", [product.output, g.add_constant(torch.randn(5), "b")]).output, other.output]
    result = run_folding(MatMulAddToLinear(fold_trainable=False), g)
    assert result.stats["matmuls_fused"] == 1 and result.stats["biases_fused"] == 0
    assert g.op_counts() == {"add": 1, "linear": 1, "neg": 1}
    assert g.find("linear")[0].inputs[1] is w and w.is_parameter


def test_gemm_becomes_linear_reusing_or_reshaping_its_constants():
    g = Graph()
    a = g.add_input("a", f32(3, 4))
    w = g.add_constant(torch.randn(5, 4), "w")
    c = g.add_constant(torch.randn(5), "c")
    transposed = g.add_node("gemm", [a, w, c], {"trans_b": True})
    plain = g.add_node("gemm", [a, g.add_constant(torch.randn(4, 5), "B"), g.add_constant(torch.randn(1, 5), "C")])
    no_bias = g.add_node("gemm", [a, g.add_constant(torch.randn(4, 5), "B2"), None], {"beta": 3.0})
    g.outputs = [transposed.output, plain.output, no_bias.output]
    result = run_folding(MatMulAddToLinear(), g)
    assert result.stats["gemms_fused"] == 3 and g.op_counts() == {"linear": 3}
    first = g.nodes[0]
    assert first.inputs[1:] == (w, c)
    assert g.nodes[1].inputs[2].type.shape == (5,) and g.nodes[2].inputs[2] is None


def test_matmuls_and_gemms_that_are_not_linear_layers_stay():
    g = Graph()
    x = g.add_input("x", f32(2, 3, 4))
    y = g.add_input("y", f32(2, 4, 5))
    a = g.add_input("a", f32(3, 4))
    g.outputs = [
        g.add_node("matmul", [x, y]).output,  # no constant weight
        g.add_node("matmul", [x, g.add_constant(torch.randn(2, 4, 5), "w3")]).output,  # batched weight
        g.add_node("gemm", [a, g.add_constant(torch.randn(4, 5), "B"), None], {"alpha": 0.5}).output,
        g.add_node("gemm", [a, g.add_constant(torch.randn(4, 5), "B"), g.add_constant(torch.randn(3, 5), "C")]).output,
        g.add_node("gemm", [g.add_input("at", f32(4, 3)), g.add_constant(torch.randn(4, 5), "B"), None],
                   {"trans_a": True}).output,
    ]
    assert not run_folding(MatMulAddToLinear(), g).modified


def test_an_add_of_another_dtype_stays_outside_the_linear():
    g = Graph()
    x = g.add_input("x", f32(3, 4))
    product = g.add_node("matmul", [x, g.add_constant(torch.randn(4, 5), "w")])
    half = g.add_constant(torch.tensor(0.5, dtype=torch.float64), "half")  # float32 + 0-d float64 is float32
    g.outputs = [g.add_node("add", [product.output, half]).output]
    result = run_folding(MatMulAddToLinear(), g)
    assert result.stats["matmuls_fused"] == 1 and result.stats["biases_fused"] == 0
    assert g.op_counts() == {"add": 1, "linear": 1}


def test_a_trainable_weight_needing_a_transpose_stays_unless_folding_is_allowed():
    g = Graph()
    x = g.add_input("x", f32(3, 4))
    g.outputs = [g.add_node("matmul", [x, g.add_constant(torch.randn(4, 5), "w", parameter=True)]).output]
    assert run_folding(MatMulAddToLinear(fold_trainable=False), g).stats["skipped_trainable"] == 1
    assert run_folding(MatMulAddToLinear(), g).stats["matmuls_fused"] == 1


# ------------------------------------------------------------- real models
def randomize_affine_layers(model):
    """Give batch norms and biases non-trivial values: fresh models have mean 0, var 1, bias 0 (folds to nothing)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", "bias")) or (t.dim() == 1 and name.endswith("weight")):
                t.add_(torch.randn_like(t) * 0.1)
    return model


def export_onnx(model, inputs, **kwargs):
    f = io.BytesIO()
    torch.onnx.export(model, inputs, f, dynamo=False, **kwargs)
    return graphopt.optimize(graphopt.load_onnx(f.getvalue()), "O1")


@pytest.fixture(scope="module")
def resnet18():
    model, inputs = get_case("torchvision.resnet18").build()
    randomize_affine_layers(model)
    return model, inputs, graphopt.capture(model, inputs)


def test_captured_resnet18_keeps_its_parameters_when_it_may_be_fine_tuned(resnet18):
    _, _, g = resnet18
    result = run_folding(FoldBatchNorm(fold_trainable=False), g, interpret=False)
    assert not result.modified and result.stats["skipped_trainable"] == 20


def test_captured_resnet18_loses_every_batch_norm(resnet18):
    model, inputs, g = resnet18
    result = run_folding(FoldBatchNorm(), g, inputs, interpret=False)
    assert result.stats["batch_norms_folded"] == 20
    assert "batch_norm" not in g.op_counts() and g.op_counts()["conv"] == 20
    with torch.no_grad():
        assert max_rel_error(model(*inputs), g.to_torch()(*inputs)) <= RTOL


def test_onnx_resnet18_batch_norms_fold_and_its_classifier_becomes_linear():
    import torchvision

    model = randomize_affine_layers(torchvision.models.resnet18(num_classes=10).eval())
    x = torch.randn(1, 3, 32, 32)
    g = export_onnx(model, (x,), do_constant_folding=False)  # keeps the BatchNormalization nodes
    assert g.op_counts()["batch_norm"] == 20
    assert run_folding(FoldBatchNorm(), g, [x], interpret=False).stats["batch_norms_folded"] == 20
    assert run_folding(MatMulAddToLinear(), g, [x], interpret=False).stats["gemms_fused"] == 1
    counts = g.op_counts()
    assert "batch_norm" not in counts and "gemm" not in counts and counts["conv"] == 20
    with torch.no_grad():
        assert max_rel_error(model(x), run_onnxruntime(g, (x,))) <= RTOL


def test_onnx_resnet18_with_frozen_batch_norms_loses_its_mul_and_add_epilogues():
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d).eval()
    randomize_affine_layers(model)
    x = torch.randn(1, 3, 32, 32)
    g = export_onnx(model, (x,))  # the exporter folds each frozen BN into a Mul and an Add by constants
    assert g.op_counts()["mul"] == 20 and g.op_counts()["add"] == 28
    result = run_folding(FoldConvBias(), g, [x], interpret=False)
    assert result.stats == {"adds_folded": 20, "muls_folded": 20, "skipped_trainable": 0}
    assert "mul" not in g.op_counts() and g.op_counts()["add"] == 8  # the residual adds
    with torch.no_grad():
        assert max_rel_error(model(x), run_onnxruntime(g, (x,))) <= RTOL


def test_onnx_bert_matmuls_and_bias_adds_become_linear():
    model, inputs = get_case("transformers.bert").build()
    randomize_affine_layers(model)  # zero biases would be removed as x + 0 before this pass sees them
    g = export_onnx(model, inputs)
    matmuls = len(g.find("matmul"))
    result = run_folding(MatMulAddToLinear(), g, inputs, interpret=False)
    assert result.stats["matmuls_fused"] == result.stats["biases_fused"] == 12  # 2 layers x (q, k, v, o, up, down)
    assert len(g.find("linear")) == 12 and len(g.find("matmul")) == matmuls - 12  # attention's matmuls stay
    with torch.no_grad():
        assert max_rel_error(model(*inputs), run_onnxruntime(g, inputs)) <= RTOL
