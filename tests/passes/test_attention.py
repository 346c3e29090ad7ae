"""Attention fusion: eager ``softmax(q kᵀ · c + mask) v`` chains become one ``sdpa`` node.

sdpa applies the scale in its own order, so outputs are compared within a
relative tolerance; the graph must stay valid with checked types and the
pass's ``modified`` claim must be honest.
"""
import io

import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt.ir import Graph, TensorType
from graphopt.passes.attention import FuseAttention
from graphopt.testing import max_rel_error, run_onnxruntime

from ir_interpreter import random_inputs, run_graph

RTOL = 1e-5
LOWEST = torch.finfo(torch.float32).min


def f32(*shape):
    return TensorType(torch.float32, shape)


def run_fusion(graph, inputs=None):
    inputs = list(inputs) if inputs is not None else random_inputs(graph)
    expected = run_graph(graph, *inputs)
    before = graph.structural_hash()
    result = FuseAttention().call(graph)
    graph.verify(check_types=True)
    assert result.modified == (graph.structural_hash() != before), result
    assert max_rel_error(expected, run_graph(graph, *inputs)) <= RTOL
    return result


def attention_graph(scores_of, q_shape=(2, 3, 5, 8), k_shape=None, softmax_dim=-1):
    """q, k, v inputs; ``scores_of(g, q, kT)`` builds the masked, scaled scores; then softmax and ·v."""
    g = Graph()
    q = g.add_input("q", f32(*q_shape))
    k = g.add_input("k", f32(*(k_shape or q_shape)))
    v = g.add_input("v", f32(*(k_shape or q_shape)))
    kt = g.add_node("permute", [k], {"dims": [0, 1, 3, 2]}).output
    probs = g.add_node("softmax", [scores_of(g, q, kt)], {"dim": softmax_dim}).output
    g.outputs = [g.add_node("matmul", [probs, v]).output]
    return g


def scaled(g, q, kt, c=0.25):
    scores = g.add_node("matmul", [q, kt]).output
    return g.add_node("mul", [scores, g.add_constant(torch.tensor(c))]).output


def only_sdpa(g):
    (node,) = g.find("sdpa")
    assert not g.find("softmax") and not g.find("matmul")
    return node


# ------------------------------------------------------------ what fuses
def test_scaled_scores_fuse_and_the_key_transpose_disappears():
    g = attention_graph(scaled)
    run_fusion(g)
    sdpa = only_sdpa(g)
    assert g.op_counts() == {"sdpa": 1}
    assert sdpa.inputs[1] is g.inputs[1] and sdpa.inputs[3] is None
    assert sdpa.attrs == {"is_causal": False, "scale": 0.25, "enable_gqa": False}


def test_division_and_a_mask_on_either_side_of_the_add():
    def masked(g, q, kt):
        scores = g.add_node("div", [g.add_node("matmul", [q, kt]).output, g.add_constant(torch.tensor(4.0))]).output
        mask = g.add_input("mask", f32(2, 1, 1, 5))
        return g.add_node("add", [mask, scores]).output

    g = attention_graph(masked)
    run_fusion(g)
    sdpa = only_sdpa(g)
    assert sdpa.inputs[3] is g.inputs[3] and sdpa.attrs["scale"] == 0.25


def test_prescaled_query_and_key_multiply_into_one_scale():
    """The legacy ONNX exporter's spelling of sdpa: ``(q·√c) @ (kᵀ·√c)``."""
    def prescaled(g, q, kt):
        root = g.add_constant(torch.tensor([0.5]))
        q = g.add_node("mul", [q, root]).output
        kt = g.add_node("mul", [root, kt]).output
        return g.add_node("matmul", [q, kt]).output

    g = attention_graph(prescaled)
    run_fusion(g)
    sdpa = only_sdpa(g)
    assert sdpa.inputs[0] is g.inputs[0] and sdpa.attrs["scale"] == 0.25 and not g.find("mul")


def test_no_scale_is_scale_one_not_sdpa_default():
    g = attention_graph(lambda g, q, kt: g.add_node("matmul", [q, kt]).output)
    run_fusion(g)
    assert only_sdpa(g).attrs["scale"] == 1.0


@pytest.mark.parametrize("fill", [float("-inf"), LOWEST])
def test_where_with_a_constant_lower_triangle_becomes_causal(fill):
    def causal(g, q, kt):
        keep = g.add_constant(torch.ones(1, 1, 5, 5, dtype=torch.bool).tril())
        return g.add_node("where", [keep, scaled(g, q, kt), g.add_constant(torch.tensor(fill))]).output

    g = attention_graph(causal)
    assert run_fusion(g).stats == {"attention_fused": 1, "causal": 1}
    sdpa = only_sdpa(g)
    assert sdpa.attrs["is_causal"] and sdpa.inputs[3] is None and not g.find("where")


def test_a_constant_causal_bias_becomes_causal_and_any_other_constant_stays_a_mask():
    causal_bias = torch.zeros(5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), LOWEST).expand(2, 1, 5, 5)
    other_bias = causal_bias.clone()
    other_bias[1, 0, 0, 1] = 0.0  # one batch entry sees one step ahead

    for bias, causal in [(causal_bias, True), (other_bias, False)]:
        g = attention_graph(lambda g, q, kt: g.add_node("add", [scaled(g, q, kt), g.add_constant(bias)]).output)
        run_fusion(g)
        sdpa = only_sdpa(g)
        assert sdpa.attrs["is_causal"] is causal and (sdpa.inputs[3] is None) is causal


def test_one_key_value_head_is_grouped_query_attention_in_torch_graphs_only():
    for source, fused in [("torch", True), ("onnx", False)]:
        g = attention_graph(scaled, q_shape=(2, 4, 5, 8), k_shape=(2, 1, 5, 8))
        g.meta["source"] = source
        assert run_fusion(g).modified is fused
        if fused:
            assert only_sdpa(g).attrs["enable_gqa"] is True


def repeat_kv_graph(k_repeats=2, v_repeats=2):
    """q with 4 heads; k and v with 4 // repeats heads, each head copied ``repeats`` times (transformers' repeat_kv)."""
    g = Graph()
    q = g.add_input("q", f32(2, 4, 5, 8))

    def repeated(name, n):
        x = g.add_input(name, f32(2, 4 // n, 5, 8))
        wide = g.add_node("expand", [g.add_node("unsqueeze", [x], {"dims": [2]}).output],
                          {"shape": [2, 4 // n, n, 5, 8]}).output
        return g.add_node("reshape", [wide], {"shape": [2, 4, 5, 8]}).output

    k, v = repeated("k", k_repeats), repeated("v", v_repeats)
    kt = g.add_node("permute", [k], {"dims": [0, 1, 3, 2]}).output
    probs = g.add_node("softmax", [scaled(g, q, kt)], {"dim": -1}).output
    g.outputs = [g.add_node("matmul", [probs, v]).output]
    return g


def test_repeated_key_value_heads_become_grouped_query_attention():
    g = repeat_kv_graph()
    run_fusion(g)
    sdpa = only_sdpa(g)
    assert sdpa.attrs["enable_gqa"] is True and sdpa.inputs[1:3] == tuple(g.inputs[1:3])


def test_unequal_repeats_or_onnx_graphs_read_the_repeated_heads():
    unequal, onnx = repeat_kv_graph(k_repeats=2, v_repeats=4), repeat_kv_graph()
    onnx.meta["source"] = "onnx"  # the ONNX emitter has no grouped-query lowering
    for g in (unequal, onnx):
        run_fusion(g)
        sdpa = only_sdpa(g)
        assert sdpa.attrs["enable_gqa"] is False and sdpa.inputs[2].producer.op == "reshape"


def test_attentions_sharing_their_scores_fuse_together():
    g = Graph()
    q, k, v = (g.add_input(n, f32(1, 2, 4, 8)) for n in "qkv")
    scores = g.add_node("matmul", [q, g.add_node("permute", [k], {"dims": [0, 1, 3, 2]}).output]).output
    bias = g.add_input("bias", f32(1, 1, 4, 4))
    outs = []
    for logits in (scores, g.add_node("add", [scores, bias]).output):
        outs.append(g.add_node("matmul", [g.add_node("softmax", [logits], {"dim": 3}).output, v]).output)
    g.outputs = outs
    assert run_fusion(g).stats["attention_fused"] == 2
    assert g.op_counts() == {"sdpa": 2}


def test_stacked_attentions_fuse_one_after_the_other():
    """The second attention's query is the first one's (scaled) result: both rewrites see the live graph."""
    g = Graph()
    q, k, v = (g.add_input(n, f32(1, 2, 4, 8)) for n in "qkv")
    kt = g.add_node("permute", [k], {"dims": [0, 1, 3, 2]}).output
    for _ in range(2):
        probs = g.add_node("softmax", [g.add_node("matmul", [q, kt]).output], {"dim": -1}).output
        q = g.add_node("mul", [g.add_node("matmul", [probs, v]).output, g.add_constant(torch.tensor(0.5))]).output
    g.outputs = [q]
    assert run_fusion(g).stats["attention_fused"] == 2
    first, second = g.find("sdpa")
    assert second.inputs[0] is first.output and second.attrs["scale"] == 0.5


# ------------------------------------------------------- what must not fuse
def unchanged(g):
    before = g.structural_hash()
    assert run_fusion(g).modified is False and g.structural_hash() == before


def test_softmax_over_another_dim_is_left_alone():
    unchanged(attention_graph(scaled, softmax_dim=-2))


def test_attention_weights_read_elsewhere_are_left_alone():
    g = attention_graph(scaled)
    g.outputs.append(g.find("softmax")[0].output)  # output_attentions=True
    unchanged(g)
    g = attention_graph(scaled)
    g.outputs.append(g.add_node("relu", [g.find("mul")[0].output]).output)  # the scaled scores
    unchanged(g)


def test_scores_shared_with_a_non_attention_reader_are_left_alone():
    g = attention_graph(scaled)
    g.outputs.append(g.add_node("amax", [g.find("matmul")[0].output], {"dims": [-1]}).output)
    unchanged(g)


def test_masks_that_widen_the_scores_or_scale_after_the_mask_are_left_alone():
    def widening(g, q, kt):
        return g.add_node("add", [scaled(g, q, kt), g.add_input("mask", f32(4, 2, 3, 5, 5))]).output

    def mask_then_scale(g, q, kt):
        masked = g.add_node("add", [g.add_node("matmul", [q, kt]).output, g.add_input("mask", f32(5, 5))]).output
        return g.add_node("mul", [masked, g.add_constant(torch.tensor(0.25))]).output

    unchanged(attention_graph(widening))
    unchanged(attention_graph(mask_then_scale))


def test_probabilities_as_the_right_operand_are_left_alone():
    g = Graph()
    q, k, v = (g.add_input(n, f32(1, 2, 4, 4)) for n in "qkv")
    scores = g.add_node("matmul", [q, g.add_node("permute", [k], {"dims": [0, 1, 3, 2]}).output]).output
    probs = g.add_node("softmax", [scores], {"dim": -1}).output
    g.outputs = [g.add_node("matmul", [v, probs]).output]
    unchanged(g)


def test_a_non_triangular_where_is_left_alone():
    def upper(g, q, kt):
        keep = g.add_constant(torch.ones(5, 5, dtype=torch.bool).triu())
        return g.add_node("where", [keep, scaled(g, q, kt), g.add_constant(torch.tensor(float("-inf")))]).output

    unchanged(attention_graph(upper))


# ------------------------------------------------------------- real models
def transformers_model(kind, **extra):
    import transformers

    common = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                  attn_implementation="eager")
    torch.manual_seed(0)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(vocab_size=64, max_position_embeddings=32, **common,
                                                               **extra), add_pooling_layer=False)
        ids = torch.randint(0, 64, (2, 12))
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        return model.eval(), (ids, mask)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                         use_cache=False, bos_token_id=0, eos_token_id=0,
                                         attn_implementation="eager")
        return transformers.GPT2Model(config).eval(), (torch.randint(0, 64, (2, 12)),)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, **common)
    return transformers.ViTModel(config, add_pooling_layer=False).eval(), (torch.randn(2, 3, 32, 32),)


def fuse_and_compare(model, inputs, layers):
    graph = graphopt.optimize(graphopt.capture(model, inputs), "O1")
    assert len(graph.find("softmax")) == layers
    result = FuseAttention().call(graph)
    graph.verify(check_types=True)
    assert result.stats["attention_fused"] == layers
    graph = graphopt.optimize(graph, "O1")
    assert len(graph.find("sdpa")) == layers and not graph.find("softmax")
    with torch.no_grad():
        assert max_rel_error(model(*inputs), graph.to_torch()(*inputs)) <= RTOL
    return graph


@pytest.mark.parametrize("kind", ["bert", "gpt2", "vit"])
def test_transformers_eager_attention_fuses_every_layer(kind):
    model, inputs = transformers_model(kind)
    graph = fuse_and_compare(model, inputs, layers=2)
    assert all(n.attrs["is_causal"] is (kind == "gpt2") for n in graph.find("sdpa"))


def test_timm_vit_without_fused_attention_fuses_every_block():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=2).eval()
    for block in model.blocks:
        block.attn.fused_attn = False
    fuse_and_compare(model, (torch.randn(1, 3, 32, 32),), layers=2)


def test_llama_eager_attention_reads_the_shared_key_value_heads():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, use_cache=False,
                         attn_implementation="eager")
    graph = fuse_and_compare(LlamaModel(config).eval(), (torch.randint(0, 64, (2, 8)),), layers=2)
    assert all(n.attrs["enable_gqa"] and n.attrs["is_causal"] for n in graph.find("sdpa"))
    assert all(n.inputs[1].type.shape[1] == 2 for n in graph.find("sdpa")) and not graph.find("expand")


def test_diffusers_classic_attention_processor_fuses():
    """``AttnProcessor`` (not the SDPA one): heads folded into the batch, ``baddbmm`` with the scale."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    model = Attention(query_dim=32, heads=2, dim_head=16, processor=AttnProcessor()).eval()
    graph = fuse_and_compare(model, (torch.randn(2, 10, 32),), layers=1)
    assert graph.find("sdpa")[0].inputs[0].type.rank == 3


def test_bert_returning_its_attention_weights_keeps_them():
    model, (ids, mask) = transformers_model("bert")

    class WithAttentions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, ids, mask):
            out = self.bert(input_ids=ids, attention_mask=mask, output_attentions=True)
            return out.last_hidden_state, *out.attentions

    graph = graphopt.optimize(graphopt.capture(WithAttentions().eval(), (ids, mask)), "O1")
    assert FuseAttention().call(graph).modified is False
    assert len(graph.find("softmax")) == 2 and not graph.find("sdpa")


def load_exported(model, inputs):
    f = io.BytesIO()
    torch.onnx.export(model, inputs, f, dynamo=False, opset_version=17)
    return graphopt.optimize(graphopt.load_onnx(f.getvalue()), "O1")


def test_onnx_export_of_eager_bert_fuses_and_runs_in_onnxruntime():
    bert, inputs = transformers_model("bert")

    class Bert(torch.nn.Module):  # the exporter's positional call clashes with BertModel's keyword arguments
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask):
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    model = Bert().eval()
    graph = load_exported(model, inputs)
    assert FuseAttention().call(graph).stats["attention_fused"] == 2
    graph.verify(check_types=True)
    graph = graphopt.optimize(graph, "O1")
    assert len(graph.find("sdpa")) == 2 and not graph.find("softmax")
    with torch.no_grad():
        assert max_rel_error(model(*inputs), run_onnxruntime(graph, inputs)) <= RTOL


def test_onnx_export_of_sdpa_round_trips_to_sdpa():
    class Attention(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return (F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2))

    torch.manual_seed(0)
    inputs = (*torch.randn(3, 2, 3, 5, 8), torch.randn(2, 1, 5, 5))
    graph = load_exported(Attention(), inputs)
    assert FuseAttention().call(graph).stats == {"attention_fused": 2, "causal": 1}
    graph = graphopt.optimize(graph, "O1")
    assert graph.op_counts() == {"sdpa": 2}
    assert sorted(n.attrs["scale"] for n in graph.find("sdpa")) == pytest.approx([0.2, 8 ** -0.5])
    reference = Attention()(*inputs)
    assert max_rel_error(reference, run_onnxruntime(graph, inputs)) <= RTOL
    assert max_rel_error(reference, graph.to_torch()(*inputs)) <= RTOL


@pytest.mark.parametrize("boolean", [True, False])
def test_onnx_export_of_a_row_masked_everywhere_keeps_its_zeros(boolean):
    """The exporter's ``where(isnan(p), 0, p)`` guard is sdpa's own behaviour: it fuses, and zeros stay zeros."""
    class Attention(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch.manual_seed(0)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[..., 1, :] = False
    if not boolean:
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    inputs = (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), mask)
    graph = load_exported(Attention(), inputs)
    assert bool(graph.find("isnan")) == boolean  # the exporter guards boolean masks only
    assert FuseAttention().call(graph).stats["attention_fused"] == 1
    graph = graphopt.optimize(graph, "O1")
    assert len(graph.find("sdpa")) == 1 and not graph.find("softmax") and not graph.find("isnan")
    reference = Attention()(*inputs)
    assert bool((reference[..., 1, :] == 0).all())
    for target in ("onnx", "onnxruntime"):
        assert max_rel_error(reference, run_onnxruntime(graph, inputs, target=target)) <= RTOL
    assert max_rel_error(reference, graph.to_torch()(*inputs)) <= RTOL
