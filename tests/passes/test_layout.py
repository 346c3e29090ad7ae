"""Layout passes: transpose sinking, channels-last conv regions, token permutations.

Rewrites of hand-built graphs are checked by ``run_exact`` (bit-equal through
the reference interpreter); captured and exported models are checked against
eager torch and onnxruntime.
"""
import io

import pytest
import torch
from torch import nn

import graphopt
from graphopt.ir import Graph, TensorType
from graphopt.ir.ops.linalg import conv as conv_impl
from graphopt.models import get_case
from graphopt.passes.layout import (
    ChannelsLast,
    FoldTokenPermutations,
    SinkTransposes,
    insert_inverse_token_permutation,
    insert_token_permutation,
)
from graphopt.testing import max_rel_error, run_onnxruntime

from ir_interpreter import random_inputs, run_exact, run_graph

RTOL = 1e-5


def f32(*shape):
    return TensorType(torch.float32, shape)


def run_close(p, graph):
    """``run_exact`` up to rounding: reductions over a permuted view may sum in another order."""
    inputs = random_inputs(graph)
    expected = run_graph(graph, *inputs)
    before = graph.structural_hash()
    result = p.call(graph)
    graph.verify(check_types=True)
    assert result.modified == (graph.structural_hash() != before)
    for got, want in zip(run_graph(graph, *inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-6)
    return result


def capture_o1(model, inputs):
    return graphopt.optimize(graphopt.capture(model, inputs), "O1")


# ----------------------------------------------------------- sink_transposes
class NhwcDetour(nn.Module):
    """What ONNX exports of NHWC code look like: a transpose pair around elementwise ops."""

    def __init__(self, channels=8):
        super().__init__()
        self.register_buffer("shift", torch.randn(channels))

    def forward(self, x):
        y = x.permute(0, 2, 3, 1).relu()
        y = (y + self.shift) * 0.5
        y = torch.maximum(y, x.permute(0, 2, 3, 1))
        return y.permute(0, 3, 1, 2).sigmoid()


def test_sink_transposes_cancels_an_nhwc_detour_in_a_torch_capture():
    model, x = NhwcDetour().eval(), torch.randn(2, 8, 5, 6)
    g = capture_o1(model, (x,))
    assert g.op_counts()["permute"] == 2  # cse merged the two permutes of x
    result = SinkTransposes().call(g)
    g.verify(check_types=True)
    assert result.stats == {"classes_tried": 2, "transforms_before": 2, "transforms_after": 0,
                            "regions_hoisted": 0}
    assert "permute" not in g.op_counts()
    assert max_rel_error(model(x), g.to_torch()(x)) <= RTOL


def test_sink_transposes_cancels_transpose_pairs_in_an_onnx_export():
    model, x = NhwcDetour().eval(), torch.randn(2, 8, 5, 6)
    f = io.BytesIO()
    torch.onnx.export(model, (x,), f, dynamo=False)
    g = graphopt.optimize(graphopt.load_onnx(f.getvalue()), "O1")
    assert g.op_counts()["permute"] >= 2
    graphopt.optimize(g, passes=["sink_transposes", "eliminate_noops", "dce"])
    g.verify(check_types=True)
    assert "permute" not in g.op_counts()
    assert max_rel_error(model(x), run_onnxruntime(g, (x,))) <= RTOL


def test_sink_transposes_through_concat_softmax_reductions_and_trailing_norms():
    g = Graph()
    a, b = g.add_input("a", f32(2, 3, 4, 5)), g.add_input("b", f32(2, 3, 4, 5))
    p = {"dims": [0, 2, 1, 3]}
    cat = g.add_node("concat", [g.add_node("permute", [a], p).output, g.add_node("permute", [b], p).output],
                     {"dim": 1})
    soft = g.add_node("softmax", [cat.output], {"dim": 2})
    norm = g.add_node("layer_norm", [soft.output, None, None], {"normalized_shape": [5], "eps": 1e-5})
    total = g.add_node("sum", [norm.output], {"dims": [2], "keepdim": False})  # sums a's dim 1 away: no permute left
    g.outputs = [total.output]
    result = run_close(SinkTransposes(), g)
    assert (result.stats["transforms_before"], result.stats["transforms_after"]) == (2, 0)
    assert [n.op for n in g.nodes] == ["concat", "softmax", "layer_norm", "sum"]
    assert g.nodes[0].attrs["dim"] == 2 and g.nodes[1].attrs["dim"] == 1 and g.nodes[3].attrs["dims"] == [1]


def test_a_transpose_with_another_reader_keeps_it_and_still_cancels_the_pair():
    g = Graph()
    x = g.add_input("x", f32(2, 3, 4))
    t = g.add_node("permute", [x], {"dims": [0, 2, 1]})
    back = g.add_node("permute", [g.add_node("exp", [t.output]).output], {"dims": [0, 2, 1]})
    g.outputs = [back.output, t.output]
    run_exact(SinkTransposes(), g)
    assert g.op_counts() == {"exp": 1, "permute": 1}
    assert g.outputs[0].producer.inputs == (x,)


def test_transposes_meet_through_reshapes_of_the_dims_they_leave_in_place():
    """The dynamo exporter's kᵀ: heads merged into the batch, transposed, split back; attention then undoes it."""
    g = Graph()
    x = g.add_input("x", f32(2, 16, 2, 8))
    heads = g.add_node("permute", [x], {"dims": [0, 2, 1, 3]}).output  # (2, 2, 16, 8)
    merged = g.add_node("reshape", [heads], {"shape": [-1, 16, 8]}).output
    kt = g.add_node("permute", [merged], {"dims": [0, 2, 1]}).output
    split = g.add_node("reshape", [kt], {"shape": [2, 2, 8, 16]}).output
    g.outputs = [g.add_node("permute", [split], {"dims": [0, 1, 3, 2]}).output]
    run_exact(SinkTransposes(), g)
    graphopt.optimize(g, "O1")
    assert g.op_counts() == {"permute": 1}
    assert g.outputs[0].producer.attrs["dims"] == [0, 2, 1, 3]


def test_a_reshape_across_permuted_dims_stops_the_transpose():
    g = Graph()
    x = g.add_input("x", f32(2, 3, 4, 5))
    t = g.add_node("permute", [x], {"dims": [0, 2, 1, 3]}).output  # (2, 4, 3, 5): dims 1, 2 swapped
    merged = g.add_node("reshape", [t], {"shape": [8, 3, 5]}).output  # merges a moved dim
    g.outputs = [g.add_node("permute", [merged], {"dims": [0, 2, 1]}).output]
    assert not run_exact(SinkTransposes(), g).modified


def test_sink_transposes_leaves_transposes_that_cannot_meet_their_inverse():
    g = Graph()
    x = g.add_input("x", f32(2, 3, 4))
    y = g.add_node("relu", [g.add_node("permute", [x], {"dims": [0, 2, 1]}).output])
    g.outputs = [g.add_node("reshape", [y.output], {"shape": [2, 12]}).output]
    assert not run_exact(SinkTransposes(), g).modified
    # A broadcast that would make the sunk permute costlier stops it too.
    h = Graph()
    x = h.add_input("x", f32(1, 3, 4))
    big = h.add_constant(torch.randn(5, 4, 3), "big")
    grown = h.add_node("add", [h.add_node("permute", [x], {"dims": [0, 2, 1]}).output, big])
    h.outputs = [h.add_node("permute", [grown.output], {"dims": [0, 2, 1]}).output]
    assert not run_exact(SinkTransposes(), h).modified


def test_trainable_parameters_are_not_replaced_by_permuted_copies_unless_inference():
    class ParamDetour(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(8))

        def forward(self, x):
            return (x.permute(0, 2, 3, 1) * self.scale).permute(0, 3, 1, 2)

    model, x = ParamDetour().eval(), torch.randn(1, 8, 3, 3)
    g = capture_o1(model, (x,))
    assert not SinkTransposes().call(g).modified
    assert g.op_counts()["permute"] == 2
    assert SinkTransposes(inference=True).call(g).modified
    assert "permute" not in g.op_counts() and not any(v.is_parameter for v in g.constants.values())
    assert max_rel_error(model(x), g.to_torch()(x)) <= RTOL


@pytest.fixture(scope="module")
def convnext_atto():
    model, inputs = get_case("timm.convnext_atto").build()
    return model, inputs, capture_o1(model, inputs)


@pytest.mark.slow
def test_convnext_transposes_bracket_channel_last_norms_and_stay(convnext_atto):
    """timm's ConvNeXt permutes to NHWC around each LayerNorm over channels: nothing there commutes."""
    model, inputs, g = convnext_atto
    g = g.clone()
    assert g.op_counts()["permute"] == 34
    result = SinkTransposes(inference=True).call(g)
    g.verify(check_types=True)
    assert not result.modified and g.op_counts()["permute"] == 34
    assert max_rel_error(model(*inputs), g.to_torch()(*inputs)) <= RTOL


@pytest.mark.slow
def test_channels_last_runs_convnext_convs_between_its_nhwc_norms(convnext_atto):
    """The permutes to NHWC read the channels-last convs' results as views: no conversion back before them."""
    model, inputs, g = convnext_atto
    g = g.clone()
    assert ChannelsLast().call(g).stats == {"regions": 4, "conversions": 28}
    g.verify(check_types=True)
    layouts, out = conv_input_layouts(g.to_torch(), *inputs)
    assert layouts.count(True) == 39 and len(layouts) == 40  # the stem conv is a region of one conv
    assert max_rel_error(model(*inputs), out) <= RTOL


def test_shufflenet_channel_shuffle_stays_correct():
    """torchvision's ShuffleNetV2 units: each channel shuffle permutes between two reshapes, which stay."""
    from torchvision.models.shufflenetv2 import InvertedResidual

    torch.manual_seed(0)
    model = nn.Sequential(InvertedResidual(24, 48, 2), InvertedResidual(48, 48, 1)).eval()
    x = torch.randn(1, 24, 16, 16)
    g = capture_o1(model, (x,))
    assert g.op_counts()["permute"] == 2
    result = SinkTransposes(inference=True).call(g)
    g.verify(check_types=True)
    assert not result.modified and g.op_counts()["permute"] == 2
    assert max_rel_error(model(x), g.to_torch()(x)) <= RTOL


# ------------------------------------------------------------- channels_last
def conv_input_layouts(gm, *inputs):
    """Whether each conv of the emitted module received a channels-last input, in execution order."""
    seen = []

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is conv_impl:
                seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        out = Recorder(gm).run(*inputs)
    return seen, out


@pytest.fixture(scope="module")
def resnet18():
    model, inputs = get_case("torchvision.resnet18").build()
    return model, inputs, capture_o1(model, inputs)


def test_channels_last_runs_resnet18_convs_in_nhwc(resnet18):
    model, inputs, g = resnet18
    g = g.clone()
    assert conv_input_layouts(g.to_torch(), *inputs)[0] == [False] * 20
    result = ChannelsLast().call(g)
    g.verify(check_types=True)
    assert result.stats == {"regions": 1, "conversions": 2}
    assert [n.attrs["memory_format"] for n in g.find("contiguous")] == ["channels_last", "contiguous_format"]
    assert all(n.meta["layout"] == "NHWC" for n in g.find("conv") + g.find("batch_norm"))
    layouts, out = conv_input_layouts(g.to_torch(), *inputs)
    assert layouts == [True] * 20
    assert out.is_contiguous()
    reference = model(*inputs)
    assert max_rel_error(reference, out) <= RTOL
    assert max_rel_error(reference, run_onnxruntime(g, inputs)) <= RTOL
    assert not ChannelsLast().call(g).modified


def test_channels_last_skips_regions_that_do_not_pay(resnet18):
    _, _, g = resnet18
    for unprofitable in (ChannelsLast(min_convs=100), ChannelsLast(min_flops_per_byte=1e9)):
        clone = g.clone()
        assert not unprofitable.call(clone).modified
        assert "contiguous" not in clone.op_counts()
    single = Graph()
    x = single.add_input("x", f32(1, 3, 16, 16))
    w = single.add_constant(torch.randn(8, 3, 3, 3), "w")
    y = single.add_node("conv", [x, w, None], {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
                                                "groups": 1, "transposed": False, "output_padding": [0, 0]})
    single.outputs = [single.add_node("relu", [y.output]).output]
    assert not run_exact(ChannelsLast(), single).modified


# --------------------------------------------------- fold_token_permutations
class CogVideoXBlockModule(nn.Module):
    """diffusers' CogVideoX transformer block (text and video tokens attend jointly), positional arguments."""

    def __init__(self):
        super().__init__()
        from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

        self.block = CogVideoXBlock(dim=32, num_attention_heads=2, attention_head_dim=16, time_embed_dim=32)

    def forward(self, video, text, temb):
        return self.block(video, text, temb)


def test_token_permutations_cancel_across_a_cogvideox_block():
    torch.manual_seed(0)
    frames, per_frame = 2, 16
    model = CogVideoXBlockModule().eval()
    inputs = (torch.randn(1, frames * per_frame, 32), torch.randn(1, 8, 32), torch.randn(1, 32))
    g = capture_o1(model, inputs)
    reference = model(*inputs)
    frame_major_to_token_major = torch.arange(frames * per_frame).reshape(frames, per_frame).T.reshape(-1).tolist()
    insert_token_permutation(g, g.inputs[0], frame_major_to_token_major, dim=1)
    insert_inverse_token_permutation(g, g.outputs[0], frame_major_to_token_major, dim=1)
    g.verify(check_types=True)
    assert g.op_counts()["take"] == 2
    assert max_rel_error(reference, g.to_torch()(*inputs)) <= RTOL
    result = FoldTokenPermutations().call(g)
    g.verify(check_types=True)
    assert (result.stats["transforms_before"], result.stats["transforms_after"]) == (2, 0)
    # The permutation went through the text/video concat, attention, and the split back.
    assert "take" not in g.op_counts() and g.op_counts()["sdpa"] == 1 and g.op_counts()["concat"] == 2
    assert max_rel_error(reference, g.to_torch()(*inputs)) <= RTOL


def residual_stack(layers: int):
    """``layers`` residual layers, each running a token-order-sensitive op (``cumsum`` over tokens, standing
    for attention in another token order) between a permutation and its inverse."""
    g = Graph()
    x = g.add_node("linear", [g.add_input("x", f32(2, 6, 4)), g.add_constant(torch.randn(4, 4), "w")]).output
    perm = [3, 0, 5, 1, 4, 2]
    for _ in range(layers):
        h = g.add_node("layer_norm", [x, None, None], {"normalized_shape": [4], "eps": 1e-5}).output
        permuted = g.add_node("take", [h, g.add_constant(torch.tensor(perm), "perm")], {"axis": 1}).output
        mixed = g.add_node("cumsum", [permuted], {"dim": 1}).output
        back = g.add_node("take", [mixed, g.add_constant(torch.tensor(inverse(perm)), "inv")], {"axis": 1}).output
        x = g.add_node("add", [x, back]).output
    g.outputs = [g.add_node("tanh", [x]).output]
    return g


def inverse(perm):
    return torch.argsort(torch.tensor(perm)).tolist()


def test_permutations_behind_residual_adds_cancel_from_where_the_tokens_first_appear():
    g = residual_stack(layers=4)
    result = run_close(FoldTokenPermutations(), g)
    assert (result.stats["transforms_before"], result.stats["transforms_after"]) == (8, 2)
    assert result.stats["regions_hoisted"] == 1
    takes = [n for n in g.nodes if n.op == "take"]
    assert takes[0].inputs[0] is g.inputs[0] and takes[1].output is g.outputs[0]  # begins and ends once
    assert g.op_counts()["cumsum"] == 4


def test_a_single_layer_is_left_alone_when_hoisting_saves_nothing():
    g = residual_stack(layers=1)
    assert not run_close(FoldTokenPermutations(), g).modified
    assert g.op_counts()["take"] == 2


def token_graph(mixing_op=None):
    g = Graph()
    x = g.add_input("x", f32(2, 6, 4))
    pos = g.add_constant(torch.randn(6, 4), "pos")
    perm = [3, 0, 5, 1, 4, 2]
    y = g.add_node("add", [insert_token_permutation(g, x, perm, 1), pos]).output
    if mixing_op is not None:
        y = g.add_node(mixing_op, [y], {"dim": 1}).output
    g.outputs = [g.add_node("tanh", [y]).output]
    insert_inverse_token_permutation(g, g.outputs[0], perm, 1)
    return g


def test_token_permutation_passes_constants_as_permuted_copies():
    g = token_graph()
    result = run_exact(FoldTokenPermutations(), g)
    assert (result.stats["transforms_before"], result.stats["transforms_after"]) == (2, 0)
    assert g.op_counts() == {"add": 1, "tanh": 1}


def test_token_permutation_passes_a_cast_of_a_constant_as_a_permuted_copy():
    # before: x permuted, plus a float64 table cast to float32 (folding leaves large ones computed); expected:
    # the add reads a permuted float32 copy of the table, and both permutations cancel
    g = Graph()
    x = g.add_input("x", f32(2, 6, 4))
    table = g.add_node("cast", [g.add_constant(torch.randn(6, 4, dtype=torch.float64), "table")],
                       {"dtype": torch.float32}).output
    perm = [3, 0, 5, 1, 4, 2]
    y = g.add_node("add", [insert_token_permutation(g, x, perm, 1), table]).output
    g.outputs = [g.add_node("tanh", [y]).output]
    insert_inverse_token_permutation(g, g.outputs[0], perm, 1)
    result = run_exact(FoldTokenPermutations(), g)
    assert (result.stats["transforms_before"], result.stats["transforms_after"]) == (2, 0)
    assert "take" not in g.op_counts()


def test_token_mixing_ops_block_the_permutation():
    g = token_graph("cumsum")
    assert not run_exact(FoldTokenPermutations(), g).modified
    assert g.op_counts()["take"] == 2


def test_token_permutations_compose_into_one():
    g = Graph()
    x = g.add_input("x", f32(3, 5))
    first = insert_token_permutation(g, x, [1, 2, 0], 0)
    g.outputs = [g.add_node("exp", [first]).output]
    insert_token_permutation(g, g.outputs[0], [0, 2, 1], 0)
    run_exact(FoldTokenPermutations(), g)
    assert [n.op for n in g.nodes] == ["exp", "take"]
    assert g.nodes[0].inputs == (x,) and g.nodes[1].inputs[1].data.tolist() == [1, 0, 2]


def attention_graph(permuted_inputs: str):
    """sdpa over (1, 2, 6, 4) inputs, the named ones token-permuted, the output permuted back."""
    g = Graph()
    inputs = {name: g.add_input(name, f32(1, 2, 6, 4)) for name in "qkv"}
    perm = [5, 3, 1, 0, 2, 4]
    operands = [insert_token_permutation(g, x, perm, 2) if name in permuted_inputs else x
                for name, x in inputs.items()]
    g.outputs = [g.add_node("sdpa", [*operands, None], {"is_causal": False, "scale": None}).output]
    insert_inverse_token_permutation(g, g.outputs[0], perm, 2)
    return g


@pytest.mark.parametrize("permuted", ["qkv", "q"])
def test_attention_passes_query_permutations_and_absorbs_joint_key_value_ones(permuted):
    result = run_close(FoldTokenPermutations(), g := attention_graph(permuted))
    assert (result.stats["transforms_before"], result.stats["transforms_after"]) == (len(permuted) + 1, 0)
    assert g.op_counts() == {"sdpa": 1}


def test_attention_keeps_keys_permuted_without_their_values():
    g = attention_graph("qk")
    assert not run_close(FoldTokenPermutations(), g).modified
