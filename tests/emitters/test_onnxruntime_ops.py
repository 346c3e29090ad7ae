"""The onnxruntime target: its pipeline rewrites into contrib ops on real models (the report says so), the
emitter writes them, outputs stay equal, and unsafe groups stay apart."""
from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch

from graphopt.emitters.onnx import EmitError
from graphopt.ir import Graph, TensorType
from graphopt.models import MODEL_CASES
from graphopt.passes.targets import optimize_for_target
from graphopt.testing import assert_close_outputs, capture_and_optimize, run_onnxruntime

MS = "com.microsoft"


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def for_target(graph: Graph, target: str = "onnxruntime") -> onnx.ModelProto:
    """The model written for ``target``, after the target's pipeline (on a copy of ``graph``)."""
    return optimize_for_target(graph, target).to_onnx(target=target)


def optimized(name: str):
    model, inputs = MODEL_CASES[name].build()
    with torch.no_grad():
        reference = model(*inputs)
    return capture_and_optimize(model, inputs), inputs, reference


@pytest.mark.parametrize("name, fired, gone", [
    ("torchvision.resnet18", {f"{MS}:FusedConv": 17}, ["Relu", "Add"]),
    ("torchvision.mobilenet_v2", {f"{MS}:FusedConv": 35}, ["Clip"]),
    ("torchvision.efficientnet_b0", {f"{MS}:QuickGelu": 49, f"{MS}:FusedConv": 16}, ["Sigmoid"]),
    ("timm.vit_tiny_patch16_224", {f"{MS}:SkipLayerNormalization": 24, f"{MS}:FusedMatMul": 12}, []),
    ("transformers.bert", {f"{MS}:SkipLayerNormalization": 4, f"{MS}:FusedMatMul": 2}, []),
    ("transformers.llama", {f"{MS}:SkipSimplifiedLayerNormalization": 4, "SimplifiedLayerNormalization": 1,
                            f"{MS}:QuickGelu": 2}, ["Pow", "Sqrt"]),
])
def test_contrib_ops_fire_on_real_models_and_keep_outputs(name, fired, gone):
    graph, inputs, reference = optimized(name)
    rewritten = optimize_for_target(graph, "onnxruntime")
    assert rewritten.meta["report"].fired[-1] == "fuse_onnxruntime_contrib"
    counts = op_counts(rewritten.to_onnx(target="onnxruntime"))
    for op, at_least in fired.items():
        assert counts[op] >= at_least, (op, counts)
    for op in gone:
        assert counts[op] == 0, (op, counts)
    assert not any(k.startswith(MS) for k in op_counts(graph.to_onnx())), "the pipeline must work on a copy"
    assert_close_outputs(reference, run_onnxruntime(graph, inputs, target="onnxruntime"), what=name)


def test_residual_add_goes_into_the_convolution():
    graph, inputs, reference = optimized("torchvision.resnet18")
    model = for_target(graph)
    with_sum = [n for n in model.graph.node if n.op_type == "FusedConv" and len(n.input) == 4]
    assert len(with_sum) == 8  # one per basic block
    assert all(onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "activation")) == b"Relu"
               for n in with_sum)


# ------------------------------------------------------------ what must stay apart
def _conv_graph(extra) -> tuple[Graph, tuple]:
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, (1, 4, 8, 8)))
    w = g.add_constant(torch.randn(6, 4, 3, 3), "w")
    b = g.add_constant(torch.randn(6), "b")
    y = g.add_node("conv", [x, w, b], {"padding": [1]}).output
    extra(g, y)
    return g, (torch.randn(1, 4, 8, 8),)


def _emit_and_check(g: Graph, inputs: tuple) -> Counter:
    reference = g.to_torch()(*inputs)
    assert_close_outputs(reference, run_onnxruntime(g, inputs, target="onnxruntime"))
    return op_counts(for_target(g))


def test_conv_read_twice_keeps_its_activation_apart():
    def extra(g, y):
        r = g.add_node("relu", [y]).output
        g.outputs = [r, y]

    counts = _emit_and_check(*_conv_graph(extra))
    assert counts["Conv"] == 1 and counts["Relu"] == 1 and counts[f"{MS}:FusedConv"] == 0


def test_broadcast_operand_is_not_a_residual():
    def extra(g, y):
        s = g.add_input("s", TensorType(torch.float32, (1, 6, 1, 1)))
        g.outputs = [g.add_node("relu", [g.add_node("add", [y, s]).output]).output]

    g, (x,) = _conv_graph(extra)
    counts = _emit_and_check(g, (x, torch.randn(1, 6, 1, 1)))
    assert counts["Add"] == 1 and counts["Relu"] == 1 and counts[f"{MS}:FusedConv"] == 0


def test_clamp_with_one_bound_stays_a_clip():
    def extra(g, y):
        g.outputs = [g.add_node("clamp", [y], {"min": 0.0}).output]

    counts = _emit_and_check(*_conv_graph(extra))
    assert counts["Clip"] == 1 and counts[f"{MS}:FusedConv"] == 0


def test_float16_is_left_to_the_standard_ops():
    g = Graph()
    x = g.add_input("x", TensorType(torch.float16, (2, 5, 8)))
    g.outputs = [g.add_node("silu", [x]).output]
    counts = op_counts(for_target(g))
    assert counts[f"{MS}:QuickGelu"] == 0


def _residual_norm_graph(rank: int, read_sum: bool) -> tuple[Graph, tuple]:
    shape = (2, 5, 16)[-rank:]
    g = Graph()
    a = g.add_input("a", TensorType(torch.float32, shape))
    b = g.add_input("b", TensorType(torch.float32, shape))
    s = g.add_node("add", [a, b]).output
    w, bias = g.add_constant(torch.randn(16), "w"), g.add_constant(torch.randn(16), "bias")
    y = g.add_node("layer_norm", [s, w, bias], {"normalized_shape": [16], "eps": 1e-5}).output
    g.outputs = [g.add_node("add", [y, s]).output] if read_sum else [y]
    return g, (torch.randn(shape), torch.randn(shape))


@pytest.mark.parametrize("read_sum", [False, True])
def test_skip_layer_norm_keeps_the_residual_sum(read_sum):
    g, inputs = _residual_norm_graph(3, read_sum)
    counts = _emit_and_check(g, inputs)
    assert counts[f"{MS}:SkipLayerNormalization"] == 1 and counts["LayerNormalization"] == 0
    node = next(n for n in for_target(g).graph.node if n.op_type == "SkipLayerNormalization")
    assert (len(node.output) == 4) == read_sum


def test_cpu_target_keeps_pre_norm_residual_sums_out_of_skip_layer_norm():
    """On CPU the kernel that also returns the sum is slower than Add + LayerNormalization (pre-LN ViT):
    only the sums nothing else reads fuse there."""
    graph, inputs, reference = optimized("timm.vit_tiny_patch16_224")
    model = for_target(graph, "onnxruntime-cpu")
    skips = [n for n in model.graph.node if n.op_type == "SkipLayerNormalization"]
    assert skips and all(len(n.output) < 4 for n in skips)
    assert op_counts(model)["LayerNormalization"] >= 24
    assert_close_outputs(reference, run_onnxruntime(graph, inputs, target="onnxruntime-cpu"))
    bert, _, _ = optimized("transformers.bert")  # post-LN: nothing else reads the sum, so it still fuses
    assert op_counts(for_target(bert, "onnxruntime-cpu"))[f"{MS}:SkipLayerNormalization"] >= 4


def test_skip_layer_norm_needs_a_3d_input():
    g, inputs = _residual_norm_graph(2, False)
    counts = _emit_and_check(g, inputs)
    assert counts[f"{MS}:SkipLayerNormalization"] == 0 and counts["LayerNormalization"] == 1


@pytest.mark.parametrize("opset, op", [(18, f"{MS}:Gelu"), (20, "Gelu")])
def test_gelu_uses_the_standard_op_where_the_opset_has_one(opset, op):
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, (2, 8)))
    g.outputs = [g.add_node("gelu", [x]).output]
    g.meta["onnx"] = {"opset_imports": {"": opset}}
    assert op_counts(for_target(g))[op] == 1
    assert_close_outputs(g.to_torch()(torch.ones(2, 8)), run_onnxruntime(g, (torch.ones(2, 8),), target="onnxruntime"))


def test_unknown_target_is_refused():
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, (2,)))
    g.outputs = [g.add_node("relu", [x]).output]
    with pytest.raises(ValueError, match="unknown target 'tvm'"):
        g.to_onnx(target="tvm")


def test_the_pass_rewrites_the_ir_and_the_report_counts_it():
    """before: conv → add(x) → relu → silu; expected: ort.fused_conv(x, w, b, z=x; relu) → ort.quick_gelu, the
    pass's stats counting both, and torch still running the rewritten graph to the same values."""
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, (1, 4, 8, 8)))
    y = g.add_node("conv", [x, g.add_constant(torch.randn(4, 4, 3, 3), "w"), g.add_constant(torch.randn(4), "b")],
                   {"padding": [1]}).output
    g.outputs = [g.add_node("silu", [g.add_node("relu", [g.add_node("add", [y, x]).output]).output]).output]
    rewritten = optimize_for_target(g, "onnxruntime", verify=True)
    assert rewritten.op_counts() == {"ort.fused_conv": 1, "ort.quick_gelu": 1}
    record = rewritten.meta["report"].records[0]
    assert record.name == "fuse_onnxruntime_contrib" and record.modified
    assert record.stats["fused_conv"] == 1 and record.stats["quick_gelu"] == 1
    assert rewritten.find("ort.fused_conv")[0].attrs["activation"] == "relu"
    inputs = (torch.randn(1, 4, 8, 8),)
    assert_close_outputs(g.to_torch()(*inputs), rewritten.to_torch()(*inputs))
    assert g.op_counts() == {"add": 1, "conv": 1, "relu": 1, "silu": 1}, "the caller's graph is left alone"


def test_standard_onnx_refuses_onnxruntime_ops():
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, (2, 8)))
    g.outputs = [g.add_node("silu", [x]).output]
    with pytest.raises(EmitError, match="ort.quick_gelu runs in onnxruntime only"):
        optimize_for_target(g, "onnxruntime").to_onnx(target="onnx")
