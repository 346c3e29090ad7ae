"""The onnxruntime-cpu target: its pipeline runs real conv nets' regions in NCHWc (the report says so), outputs
stay equal, padding never leaks."""
from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch

from graphopt.emitters.onnxruntime_nchwc import METADATA_KEY, reorder_filter_blocked, reorder_filter_out_blocked
from graphopt.ir import Graph, TensorType
from graphopt.models import MODEL_CASES
from graphopt.passes.fusion import bn_scale_and_shift
from graphopt.passes.onnxruntime_nchwc import nchwc_block_size
from graphopt.passes.targets import optimize_for_target
from graphopt.testing import assert_close_outputs, capture_and_optimize, run_onnxruntime

NCHWC = "com.microsoft.nchwc"
TARGET = "onnxruntime-cpu"
needs_nchwc = pytest.mark.skipif(nchwc_block_size() is None, reason="this onnxruntime has no NCHWc kernels")


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(f"nchwc:{n.op_type}" if n.domain == NCHWC else n.op_type for n in model.graph.node)


def for_cpu(graph: Graph, block: int | None = None) -> onnx.ModelProto:
    """The model written for this CPU's onnxruntime, after the target's pipeline, at ``block`` (default: this
    machine's block size)."""
    options = {"plan_nchwc_regions": {"block": block}} if block else None
    return optimize_for_target(graph, TARGET, options=options).to_onnx(target=TARGET)


# ------------------------------------------------------------ filter layouts
@pytest.mark.parametrize("block", [4, 8])
def test_blocked_filter_puts_both_channel_blocks_innermost(block):
    w = torch.randn(10, 6, 3, 2)
    got = reorder_filter_blocked(w, block)
    po, pi = -(-10 // block) * block, -(-6 // block) * block
    assert got.shape == (po, pi, 3, 2)
    blocks = got.reshape(po // block, pi // block, 3, 2, block, block)
    for o, i, h, x in [(0, 0, 0, 0), (9, 5, 2, 1), (block + 1, 3, 1, 0)]:
        assert blocks[o // block, i // block, h, x, i % block, o % block] == w[o, i, h, x]
    assert got.abs().sum() == pytest.approx(w.abs().sum().item(), rel=1e-6)  # padding is zero


def test_output_blocked_filter_keeps_input_channels_whole():
    w = torch.randn(12, 1, 3, 3)
    got = reorder_filter_out_blocked(w, 8).reshape(2, 1, 3, 3, 8)
    assert got[1, 0, 2, 1, 3] == w[11, 0, 2, 1] and got[1, 0, 0, 0, 4:].abs().sum() == 0


# ------------------------------------------------------------ real models
BLOCK_SIZES = (8, 16)
"""The block sizes of MLAS's NCHWc kernels (AVX2, AVX-512): every real-model case is planned at each of them,
whatever this machine's is, and run in onnxruntime at this machine's."""


@needs_nchwc
@pytest.mark.parametrize("name, reorders", [
    ("torchvision.resnet18", 2),          # in once, out once
    ("torchvision.mobilenet_v2", 2),
    ("torchvision.densenet121", 2),       # batch norms before the convs become depthwise 1x1 convs
    ("torchvision.shufflenet_v2_x0_5", 40),  # channel shuffles leave the layout
    ("torchvision.mobilenet_v3_small", 2),   # squeeze-excitation scales run blocked
])
def test_conv_nets_run_blocked_with_reorders_only_at_the_edges(name, reorders):
    """Every conv (and batch norm) whose channels fill whole blocks runs blocked, at any block size; a conv left
    in NCHW has channels that do not, and costs at most one reorder in and one out."""
    model, inputs = MODEL_CASES[name].build()
    with torch.no_grad():
        reference = model(*inputs)
    graph = capture_and_optimize(model, inputs)
    standard = op_counts(graph.to_onnx())
    machine_block = nchwc_block_size()
    for block in sorted({*BLOCK_SIZES, machine_block}):
        written = for_cpu(graph, block)
        counts = op_counts(written)
        left = _nchw_convs(written)
        assert counts["nchwc:Conv"] + len(left) == standard["Conv"] + standard["BatchNormalization"], (block, counts)
        assert counts["BatchNormalization"] == 0, (block, counts)
        assert all(any(c % block for c in channels) for channels in left.values()), (block, left)
        assert counts["nchwc:ReorderInput"] + counts["nchwc:ReorderOutput"] <= reorders + 2 * len(left), (block, counts)
        assert {p.key: p.value for p in written.metadata_props}[METADATA_KEY] == str(block)
        if block == 8:  # the block of the AVX2 machines the suite was written on: all of these convs fill it
            assert not left, left
    assert_close_outputs(reference, run_onnxruntime(graph, inputs, target=TARGET), what=name)


def _nchw_convs(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """The convs left in the standard layout (Conv, or onnxruntime's FusedConv), by name: (out, in per group)."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {n.name: shapes[n.input[1]][:2] for n in model.graph.node
            if n.op_type in ("Conv", "FusedConv") and n.domain != NCHWC}


# ------------------------------------------------------------ hand-made edges
def _chain(channels: tuple[int, ...], between: str, size: int = 16, groups: int = 1,
           kernel: int = 3) -> tuple[Graph, tuple]:
    """conv → ``between`` → conv → ..., through the channel counts given."""
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, (1, channels[0], size, size)))
    y = x
    for k, (cin, cout) in enumerate(zip(channels, channels[1:])):
        w = g.add_constant(torch.randn(cout, cin // groups, kernel, kernel) / (kernel * cin) ** 0.5, f"w{k}")
        y = g.add_node("conv", [y, w, g.add_constant(torch.randn(cout), f"b{k}")],
                       {"padding": [kernel // 2], "groups": groups}).output
        if k < len(channels) - 2:
            y = g.add_node(between, [y]).output
    g.outputs = [y]
    return g, (torch.randn(1, channels[0], size, size),)


def _emit_and_check(g: Graph, inputs: tuple) -> Counter:
    reference = g.to_torch()(*inputs)
    assert_close_outputs(reference, run_onnxruntime(g, inputs, target=TARGET))
    return op_counts(for_cpu(g))


@needs_nchwc
def test_padded_channels_never_reach_a_real_one():
    # 20 channels pad to 24 (block 8) or 32 (block 16); sigmoid turns the zero padding into 0.5
    counts = _emit_and_check(*_chain((16, 20, 20, 16), "sigmoid"))
    assert counts["nchwc:Conv"] == 3 and counts["Conv"] == 0


@needs_nchwc
def test_an_op_that_mixes_channels_reads_the_nchw_form():
    g, inputs = _chain((16, 16, 16), "relu")
    conv = g.outputs[0]
    g.outputs = [g.add_node("softmax", [conv], {"dim": 1}).output, conv]
    counts = _emit_and_check(g, inputs)
    assert counts["nchwc:ReorderOutput"] == 1 and counts["Softmax"] == 1


@needs_nchwc
def test_division_is_not_layout_blind():
    g, inputs = _chain((16, 16, 16), "relu")
    y = g.outputs[0]
    g.outputs = [g.add_node("div", [y, g.add_node("sigmoid", [y]).output]).output]
    counts = _emit_and_check(g, inputs)
    assert counts["Div"] == 1 and counts["nchwc:ReorderOutput"] >= 1


@needs_nchwc
def test_grouped_conv_with_unaligned_groups_stays_standard():
    counts = _emit_and_check(*_chain((6, 6, 6), "relu", groups=3))
    assert counts["nchwc:Conv"] == 0 and counts["Conv"] + counts["FusedConv"] == 2


@needs_nchwc
def test_a_region_too_small_to_pay_for_its_reorders_stays_nchw():
    counts = _emit_and_check(*_chain((16, 16), "relu", size=1, kernel=1))  # 2 FLOPs per byte reordered
    assert counts["nchwc:Conv"] == 0 and counts["nchwc:ReorderInput"] == 0


def test_float16_and_the_portable_targets_stay_standard():
    g, _ = _chain((16, 16, 16), "relu")
    portable = optimize_for_target(g, "onnxruntime").to_onnx(target="onnxruntime")
    assert not any(n.domain == NCHWC for n in portable.graph.node)
    half = g.clone()
    for c in half.constants.values():
        c.data = c.data.half()
        c.type = TensorType(torch.float16, c.type.shape)
    half.inputs[0].type = TensorType(torch.float16, half.inputs[0].type.shape)
    for node in half.nodes:
        node.output.type = TensorType(torch.float16, node.output.type.shape)
    assert not any(n.domain == NCHWC for n in for_cpu(half).graph.node)


# ------------------------------------------------------------ the pass
def test_the_pass_rewrites_a_region_into_blocked_ir_ops_and_reports_it():
    """before: x → conv(16→20) → relu → conv(20→16); expected, at block 8: ReorderInput(x) → blocked conv with
    the relu fused and 24 (padded) output channels → blocked conv → ReorderOutput to 16 channels; the report
    counts one reorder each way, and torch runs the rewritten graph to the same values."""
    g, inputs = _chain((16, 20, 16), "relu")
    rewritten = optimize_for_target(g, TARGET, options={"plan_nchwc_regions": {"block": 8}}, verify=True)
    assert rewritten.op_counts() == {"ort.nchwc.conv": 2, "ort.nchwc.reorder_input": 1, "ort.nchwc.reorder_output": 1}
    first, second = rewritten.find("ort.nchwc.conv")
    assert first.attrs["activation"] == "relu" and first.output.type.shape == (1, 24, 16, 16)
    assert second.inputs[1].type.shape == (16, 24, 3, 3)  # input channels padded, zero where padded
    record = rewritten.meta["report"].records[0]
    assert record.name == "plan_nchwc_regions" and record.modified
    assert record.stats["reorder_inputs"] == 1 and record.stats["reorder_outputs"] == 1
    assert_close_outputs(g.to_torch()(*inputs), rewritten.to_torch()(*inputs))


def test_a_batch_norm_runs_as_a_depthwise_conv_folded_in_float64():
    """before: conv → relu → batch_norm → conv (the norm cannot fold into a conv); expected: the norm is a
    depthwise 1x1 blocked conv whose weights and bias are ``fold_batch_norm``'s float64 scale and shift,
    rounded once to float32."""
    g, inputs = _chain((16, 16, 16), "relu")
    relu = g.find("relu")[0]
    stats = [g.add_constant(t, name) for t, name in
             [(torch.rand(16) + 0.5, "gamma"), (torch.randn(16), "beta"), (torch.randn(16), "mean"),
              (torch.rand(16) * 1e-3 + 1e-6, "var")]]
    bn = g.add_node("batch_norm", [relu.output, *stats], {"eps": 1e-5}, after=relu)
    g.find("conv")[1].replace_input(0, bn.output)
    scale, shift = bn_scale_and_shift(bn)
    rewritten = optimize_for_target(g, TARGET, options={"plan_nchwc_regions": {"block": 8}}, verify=True)
    depthwise = [n for n in rewritten.find("ort.nchwc.conv") if n.attrs["groups"] == 16]
    assert len(depthwise) == 1 and rewritten.meta["report"].records[0].stats["batch_norms_as_convs"] == 1
    w, b = depthwise[0].inputs[1:3]
    assert torch.equal(w.data.reshape(-1), scale.float()) and torch.equal(b.data, shift.float())
    assert_close_outputs(g.to_torch()(*inputs), rewritten.to_torch()(*inputs))


# ------------------------------------------------------------ channel scales
def _scale_rows(model: onnx.ModelProto) -> list[list[int]]:
    """The shapes the inputs of each Mul/Add are reshaped to, where a Reshape with a constant shape makes them."""
    shapes = {i.name: list(onnx.numpy_helper.to_array(i)) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    rows = []
    for n in model.graph.node:
        if n.op_type in ("Mul", "Add"):
            made = [producers.get(i) for i in n.input]
            rows += [shapes[p.input[1]] for p in made if p is not None and p.op_type == "Reshape"
                     and p.input[1] in shapes]
    return rows


@needs_nchwc
def test_squeeze_excitation_scales_broadcast_over_whole_rows():
    """EfficientNet-B0's 16 squeeze-excitation scales run blocked, each as rows of ``W·B`` elements times one
    tiled row of the scale, not as ``[N, C/B, H, W, B]`` (broadcast in spans of ``B``)."""
    model, inputs = MODEL_CASES["torchvision.efficientnet_b0"].build()
    with torch.no_grad():
        reference = model(*inputs)
    graph = capture_and_optimize(model, inputs)
    written = for_cpu(graph)
    counts, block = op_counts(written), nchwc_block_size()
    assert counts["Expand"] == 16 and counts["Mul"] == 16, counts
    rows = _scale_rows(written)
    assert len(rows) == 32 and all(len(r) == 4 and r[3] % block == 0 and r[3] > block for r in rows), rows
    assert_close_outputs(reference, run_onnxruntime(graph, inputs, target=TARGET), what="efficientnet_b0")


@needs_nchwc
@pytest.mark.parametrize("op", ["mul", "add"])
@pytest.mark.parametrize("scale", ["pooled", "constant", "unblocked"])
def test_channel_scale_keeps_padding_and_batch(op, scale):
    """20 channels (padded to a whole block), batch 2: a blocked activation times (or plus) a per-sample
    scale from a pooled branch, a constant layer scale as in ConvNeXt, or a scale computed in NCHW; then a
    conv that reads the padding."""
    g = Graph()
    x = g.add_input("x", TensorType(torch.float32, (2, 16, 6, 6)))

    def conv(v, cin, cout, name):
        w = g.add_constant(torch.randn(cout, cin, 3, 3) / (9 * cin) ** 0.5, f"w{name}")
        return g.add_node("conv", [v, w, g.add_constant(torch.randn(cout), f"b{name}")], {"padding": [1]}).output

    y = g.add_node("relu", [conv(x, 16, 20, 0)]).output
    if scale == "constant":
        s = g.add_constant(torch.randn(1, 20, 1, 1), "layer_scale")
    else:
        s = g.add_node("adaptive_avg_pool", [y], {"output_size": [1, 1]}).output
        s = g.add_node("sigmoid" if scale == "pooled" else "softmax", [s], {} if scale == "pooled" else {"dim": 1}).output
    g.outputs = [conv(g.add_node(op, [y, s] if op == "mul" else [s, y]).output, 20, 20, 1)]
    counts = _emit_and_check(g, (torch.randn(2, 16, 6, 6),))
    assert counts["nchwc:Conv"] == 2 and counts["Conv"] == 0 and counts["Expand"] == (scale != "constant"), counts
    block = nchwc_block_size()
    blocks = -(-20 // block)
    assert sorted(r[1:] for r in _scale_rows(for_cpu(g))) == sorted(
        [[blocks, 6, 6 * block]] + [[blocks, 1, 6 * block]] * (scale != "constant"))
    assert counts["nchwc:ReorderInput"] == 1 + (scale == "unblocked"), counts  # x, and the softmax's scale
