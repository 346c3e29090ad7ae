"""remove_channels on real models: the zero-planting oracle (see pruning_oracle) is the proof.

Each case captures a zoo model, cleans it up with O1, builds the DepGraph groups,
plants zeros in a few exactly removable groups and prunes them: the outputs stay
equal and the parameter count falls by what the groups predict.
"""
from __future__ import annotations

import pytest
import torch
from pruning_oracle import check_oracle, exactly_removable, plant_zeros, predicted_drop, run

import graphopt
from graphopt.models import get_case
from graphopt.passes.pruning.apply import remove_channels
from graphopt.passes.pruning.dependency import build_groups


def captured(model, inputs):
    return graphopt.optimize(graphopt.capture(model, inputs), "O1")


def zoo(name):
    model, inputs = get_case(name).build()
    return captured(model, inputs), inputs


def llama_gqa():
    """Llama with 4 query heads sharing 2 kv heads (the zoo's has a single kv head)."""
    from transformers import LlamaConfig, LlamaModel

    from graphopt.models import KwargsWrapper, _finish, _token_ids

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         use_cache=False, attn_implementation="sdpa")
    model, inputs = _finish(KwargsWrapper(LlamaModel(config), ("input_ids",), {"use_cache": False},
                                          output_attr="last_hidden_state"), _token_ids())
    return captured(model, inputs), inputs


def groups_using(groups, suffix: str, dim: int = 0):
    return [g for g in groups if any(m.value.name.endswith(suffix) and m.dim == dim for m in g.members)]


CNNS = ["torchvision.resnet18", "torchvision.mobilenet_v2", "torchvision.densenet121",
        "torchvision.efficientnet_b0", "torchvision.regnet_y_400mf", "torchvision.shufflenet_v2_x0_5",
        "timm.convnext_atto"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CNNS)
def test_cnn_oracle(name):
    graph, inputs = zoo(name)
    groups = build_groups(graph)
    assert sum(g.prunable for g in groups) >= 4
    classifier = [g for g in groups if "graph output" in g.reason]
    assert classifier and not any(g.prunable for g in classifier)
    check_oracle(graph, inputs, groups=groups)
    graph.to_onnx()


@pytest.mark.slow
def test_regnet_grouped_convs_prune_whole_conv_groups():
    graph, inputs = zoo("torchvision.regnet_y_400mf")
    groups = build_groups(graph)
    grouped = [n for n in graph.find("conv") if 1 < n.attrs["groups"] < n.inputs[0].type.shape[1]]
    g = next(g for g in groups if g.prunable and any(m.value is grouped[0].inputs[1] for m in g.members))
    k = next(m for m in g.members if m.value is grouped[0].inputs[0]).positions.shape[1]
    assert k == grouped[0].inputs[1].type.shape[1]  # a group channel is one whole conv group
    before = grouped[0].attrs["groups"]
    check_oracle(graph, inputs, groups=groups, removals={g.id: [0]})
    assert grouped[0].attrs["groups"] == before - 1


@pytest.mark.slow
def test_shufflenet_shuffle_is_exact():
    graph, inputs = zoo("torchvision.shufflenet_v2_x0_5")
    groups = build_groups(graph)
    shuffled = [g for g in groups if g.prunable and any(m.value.producer is not None and m.value.producer.op ==
                                                           "permute" for m in g.members)]
    assert shuffled
    check_oracle(graph, inputs, groups=groups, removals={g.id: [0] for g in shuffled[:3]})


@pytest.mark.slow
def test_vit_heads_and_mlp():
    graph, inputs = zoo("timm.vit_tiny_patch16_224")
    groups = build_groups(graph)
    heads = groups_using(groups, "blocks.0.attn.qkv.weight")
    assert len(heads) == 1 and heads[0].prunable and heads[0].size == 3  # 3 heads of 64 dims, q, k and v
    qkv = next(m for m in heads[0].members if m.value.name.endswith("qkv.weight"))
    assert qkv.positions.shape == (3, 3 * 64)
    mlp = groups_using(groups, "blocks.0.mlp.fc1.weight")
    assert mlp[0].prunable and mlp[0].size == 768
    hidden = groups_using(groups, "blocks.0.norm1.weight")
    assert not any(exactly_removable(g) for g in hidden)
    check_oracle(graph, inputs, groups=groups, removals={heads[0].id: [1], mlp[0].id: list(range(0, 768, 2))})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["heads", "head_dim"])
def test_bert_heads_and_mlp(mode):
    graph, inputs = zoo("transformers.bert")
    groups = build_groups(graph, heads=mode)
    q = groups_using(groups, "layer.0.attention.self.query.weight")[0]
    v = groups_using(groups, "layer.0.attention.self.value.weight")[0]
    mlp = groups_using(groups, "layer.0.intermediate.dense.weight")[0]
    assert q.prunable and v.prunable and mlp.prunable and q.size == (2 if mode == "heads" else 16)
    names = {m.value.name.rsplit(".", 2)[-2] for m in (*q.parameters(), *v.parameters())}
    assert {"query", "key", "value", "dense"} <= names
    assert (q is v) == (mode == "heads")  # head dims of q/k and of v/out are independent
    removals = {q.id: [0]} if mode == "heads" else {q.id: [0, 5, 9], v.id: [1, 2]}
    check_oracle(graph, inputs, groups=groups, removals={**removals, mlp.id: [3, 4, 60]}, heads=mode)
    reshape = graph.find("reshape")[0].attrs["shape"]
    assert reshape[-1] == (16 if mode == "heads" else 13)


@pytest.mark.slow
def test_llama_gqa_kv_heads_and_mlp():
    graph, inputs = llama_gqa()
    groups = build_groups(graph)
    kv = groups_using(groups, "layers.0.self_attn.k_proj.weight")[0]
    assert kv.prunable and kv.size == 2  # two kv heads, each with its two query heads
    q = next(m for m in kv.members if m.value.name.endswith("q_proj.weight"))
    assert q.positions.shape == (2, 2 * 8)
    mlp = groups_using(groups, "layers.0.mlp.gate_proj.weight")[0]
    assert mlp.prunable and any(m.value.name.endswith("up_proj.weight") for m in mlp.members)
    hidden = groups_using(groups, "layers.0.self_attn.o_proj.weight")[0]
    assert not hidden.prunable  # the decomposed RMSNorm reduces the hidden dim
    check_oracle(graph, inputs, groups=groups, removals={kv.id: [1], mlp.id: list(range(0, 64, 3))})
    assert graph.find("expand")[0].attrs["shape"][1] == 1


@pytest.mark.slow
def test_llama_single_kv_head_prunes_query_heads():
    graph, inputs = zoo("transformers.llama")
    groups = build_groups(graph)
    q = groups_using(groups, "layers.0.self_attn.q_proj.weight")[0]
    kv = groups_using(groups, "layers.0.self_attn.k_proj.weight")[0]
    assert q.prunable and not kv.prunable
    check_oracle(graph, inputs, groups=groups, removals={q.id: [0]})


@pytest.mark.slow
def test_onnx_resnet18_prunes_and_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, inputs = get_case("torchvision.resnet18").build()
    for m in model.modules():  # trained-like BN, so the exporter's folded conv biases are not all equal
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.data.uniform_(-1, 1)
            m.running_var.data.uniform_(0.5, 2)
    path = tmp_path / "resnet18.onnx"
    torch.onnx.export(model, inputs, str(path), dynamo=False, input_names=["x"])
    graph = graphopt.optimize(graphopt.load_onnx(str(path)), "O1")
    groups = build_groups(graph)
    removals = {g.id: list(range(0, g.size, 2)) for g in groups if exactly_removable(g)}
    assert len(removals) >= 10 and "gemm" in graph.op_counts()
    for gid, channels in removals.items():
        plant_zeros(groups[gid], channels)

    def onnx_run():
        session = ort.InferenceSession(graph.to_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs[0].numpy()})[0])

    reference, size = onnx_run(), sum(v.data.numel() for v in graph.constants.values())
    expected = predicted_drop(groups, removals)
    remove_channels(graph, groups, removals)
    graph.verify(check_types=True)
    torch.testing.assert_close(onnx_run(), reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(graph, inputs), reference, rtol=1e-4, atol=1e-5)
    assert size - sum(v.data.numel() for v in graph.constants.values()) >= expected > 0


def test_resnet18_fast_core():
    """The fast smoke of the oracle: one residual group and one inner group of resnet18."""
    graph, inputs = zoo("torchvision.resnet18")
    groups = build_groups(graph)
    residual = groups_using(groups, "layer1.0.conv2.weight")[0]
    assert {"conv1.weight", "layer1.1.conv2.weight", "layer2.0.conv1.weight"} <= {
        m.value.name for m in residual.parameters()}
    inner = groups_using(groups, "layer3.1.conv1.weight")[0]
    check_oracle(graph, inputs, groups=groups, removals={residual.id: [0, 7, 8], inner.id: list(range(0, 256, 4))})
    assert graph.constants["layer1.0.conv2.weight"].data.shape[0] == 61
    assert graph.constants["layer1.0.conv2.weight"].is_parameter
