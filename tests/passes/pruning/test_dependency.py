"""build_groups rule by rule, on tiny captured modules; each prunable case also passes the oracle."""
from __future__ import annotations

import pytest
import torch
from pruning_oracle import check_oracle
from torch import nn

import graphopt
from graphopt.passes.pruning.dependency import build_groups


def capture(module: nn.Module, *shape: int):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    return graphopt.optimize(graphopt.capture(module.eval(), (x,)), "O1"), (x,)


def group_of(groups, name: str, dim: int = 0):
    return next(g for g in groups if any(m.value.name == name and m.dim == dim for m in g.members))


def member(group, name: str, dim: int):
    return next(m for m in group.members if m.value.name == name and m.dim == dim)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), torch.relu(self.b(x))], 1))


def test_concat_offsets():
    graph, inputs = capture(Concat(), 1, 3, 4, 4)
    groups = build_groups(graph)
    a, b = group_of(groups, "a.weight"), group_of(groups, "b.weight")
    assert a is not b and (a.size, b.size) == (8, 4)
    assert member(a, "c.weight", 1).positions[:, 0].tolist() == list(range(8))
    assert member(b, "c.weight", 1).positions[:, 0].tolist() == list(range(8, 12))
    check_oracle(graph, inputs, groups=groups, removals={a.id: [1, 6], b.id: [0]})
    assert graph.constants["c.weight"].data.shape[1] == 9


class Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 3 * 3, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_flatten_into_linear_takes_channel_blocks():
    graph, inputs = capture(Flatten(), 1, 3, 5, 5)
    groups = build_groups(graph)
    g = group_of(groups, "conv.weight")
    assert g.prunable and g.size == 4
    assert member(g, "fc.weight", 1).positions[2].tolist() == list(range(18, 27))
    check_oracle(graph, inputs, groups=groups, removals={g.id: [2]})
    assert graph.constants["fc.weight"].data.shape == (6, 27)


class Depthwise(nn.Module):
    def __init__(self, multiplier: int = 1):
        super().__init__()
        self.pw = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6 * multiplier, 3, padding=1, groups=6)
        self.out = nn.Conv2d(6 * multiplier, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.dw(torch.relu(self.bn(self.pw(x))))))


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_couples_in_and_out_and_shrinks_groups(multiplier):
    graph, inputs = capture(Depthwise(multiplier), 1, 3, 6, 6)
    groups = build_groups(graph)
    g = group_of(groups, "pw.weight")
    assert g.prunable and g.size == 6 and member(g, "dw.weight", 0).positions.shape == (6, multiplier)
    assert member(g, "bn.running_var", 0).positions.shape == (6, 1)
    check_oracle(graph, inputs, groups=groups, removals={g.id: [0, 4]})
    assert graph.find("conv")[1].attrs["groups"] == 4


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Conv2d(8, 2, 1)
        self.norm = nn.GroupNorm(2, 8)

    def forward(self, x):
        return self.b(self.norm(self.g(torch.relu(self.a(x)))))


def test_grouped_conv_and_group_norm_prune_whole_groups():
    graph, inputs = capture(GroupedConv(), 1, 3, 6, 6)
    groups = build_groups(graph)
    g = group_of(groups, "a.weight")
    # a conv group holds 2 channels, a norm group 4: one group channel is two conv groups, one norm group
    assert g is group_of(groups, "norm.weight") and g.size == 2
    assert member(g, "a.weight", 0).positions[1].tolist() == [4, 5, 6, 7]
    check_oracle(graph, inputs, groups=groups, removals={g.id: [1]})
    assert graph.find("conv")[1].attrs["groups"] == 2 and graph.find("group_norm")[0].attrs["num_groups"] == 1


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(torch.relu(y + self.b(y)))


def test_residual_add_couples_both_branches():
    graph, inputs = capture(Residual(), 1, 3, 5, 5)
    groups = build_groups(graph)
    g = group_of(groups, "a.weight")
    assert {m.value.name for m in g.parameters()} >= {"a.weight", "a.bias", "b.weight", "b.bias", "c.weight"}
    assert member(g, "b.weight", 1).positions.tolist() == member(g, "b.weight", 0).positions.tolist()
    check_oracle(graph, inputs, groups=groups, removals={g.id: [2, 3]})


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc1, self.fc2, self.c = (nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1),
                                              nn.Conv2d(8, 2, 1))

    def forward(self, x):
        y = torch.relu(self.a(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.c(y * s)


def test_squeeze_excite_broadcast_scale_couples_channels():
    graph, inputs = capture(SqueezeExcite(), 1, 3, 5, 5)
    groups = build_groups(graph)
    g = group_of(groups, "a.weight")
    assert {"fc1.weight", "fc2.weight", "fc2.bias", "c.weight"} <= {m.value.name for m in g.parameters()}
    squeeze = group_of(groups, "fc1.weight")
    check_oracle(graph, inputs, groups=groups, removals={g.id: [0, 5], squeeze.id: [1]})


class ChannelsLast(nn.Module):
    """convnext style: a linear over the channel dim between two permutes, with a layer scale."""

    def __init__(self):
        super().__init__()
        self.a, self.fc, self.c = nn.Conv2d(3, 6, 1), nn.Linear(6, 6), nn.Conv2d(6, 2, 1)
        self.gamma = nn.Parameter(torch.randn(6))

    def forward(self, x):
        y = self.a(x)
        z = self.fc(y.permute(0, 2, 3, 1)) * self.gamma
        return self.c(y + z.permute(0, 3, 1, 2))


def test_permute_maps_dims():
    graph, inputs = capture(ChannelsLast(), 1, 3, 4, 4)
    groups = build_groups(graph)
    g = group_of(groups, "a.weight")
    assert {"fc.weight", "gamma", "c.weight"} <= {m.value.name for m in g.parameters()}
    assert member(g, "fc.weight", 0).positions.shape == (6, 1) and member(g, "fc.weight", 1).positions.shape == (6, 1)
    check_oracle(graph, inputs, groups=groups, removals={g.id: [1, 2, 3]})


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        y = y.reshape(1, 2, 4, 3, 3).transpose(1, 2).reshape(1, 8, 3, 3)
        y1, y2 = y.chunk(2, 1)
        return self.d(torch.cat([y1, self.c(y2)], 1))


def test_channel_shuffle_index_map_is_exact():
    graph, inputs = capture(Shuffle(), 1, 3, 3, 3)
    groups = build_groups(graph)
    g = group_of(groups, "a.weight")
    # channel c of a and of b land next to each other after the shuffle: d sees them at 2c and 2c+1
    assert g.size == 2 and member(g, "b.weight", 0).positions[:, 0].tolist() == [0, 1]
    assert member(g, "d.weight", 1).positions.tolist() == [[0, 1], [2, 3]]
    check_oracle(graph, inputs, groups=groups, removals={g.id: [1]})
    assert graph.find("reshape")[0].attrs["shape"][2] == 3


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.cum = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.cum(torch.cumsum(y, 1)), y


def test_output_and_unknown_ops_make_groups_unprunable():
    graph, _ = capture(Head(), 1, 3, 4, 4)
    groups = build_groups(graph)
    g = group_of(groups, "conv.weight")
    assert not g.prunable and "graph output" in g.reason
    g = group_of(groups, "cum.weight")
    assert not g.prunable and "graph output" in g.reason


class Between(nn.Module):
    """Two convs with ``between`` applied to the channels that couple them."""

    def __init__(self, between):
        super().__init__()
        self.a, self.b, self.between = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1), between

    def forward(self, x):
        return self.b(self.between(self.a(x)))


def test_unmodelled_use_of_a_dim_blocks_the_group():
    graph, _ = capture(Between(lambda y: torch.cumsum(y, 1)), 1, 3, 4, 4)
    g = group_of(build_groups(graph), "a.weight")
    assert not g.prunable and "cumsum" in g.reason


def test_ignored_layers_and_bad_options():
    graph, _ = capture(Residual(), 1, 3, 5, 5)
    g = group_of(build_groups(graph, ignored=["b.weight"]), "a.weight")
    assert not g.prunable and "ignored" in g.reason
    conv = graph.find("conv")[0].name
    assert not group_of(build_groups(graph, ignored=[conv]), "a.weight").prunable
    assert group_of(build_groups(graph), "a.weight").prunable
    with pytest.raises(ValueError, match="ignored name"):
        build_groups(graph, ignored=["nope.weight"])
    with pytest.raises(ValueError, match="heads"):
        build_groups(graph, heads="all")


class Attention(nn.Module):
    def __init__(self, heads: int = 4, dim: int = 16):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, s, e = x.shape

        def split(t):
            return t.reshape(b, s, self.heads, -1).transpose(1, 2)

        y = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, s, e))


@pytest.mark.parametrize("mode", ["heads", "head_dim"])
def test_attention_heads_and_head_dims(mode):
    graph, inputs = capture(Attention(), 2, 5, 16)
    groups = build_groups(graph, heads=mode)
    g = group_of(groups, "q.weight")
    if mode == "heads":
        assert g.size == 4 and member(g, "v.weight", 0).positions[1].tolist() == [4, 5, 6, 7]
        assert member(g, "o.weight", 1).positions[1].tolist() == [4, 5, 6, 7]
        removals = {g.id: [1, 2]}
    else:
        assert g.size == 4 and member(g, "k.weight", 0).positions[1].tolist() == [1, 5, 9, 13]
        removals = {g.id: [1], group_of(groups, "v.weight").id: [0, 3]}
    check_oracle(graph, inputs, groups=groups, removals=removals, heads=mode)
    assert graph.find("reshape")[0].output.type.shape == ((2, 5, 2, 4) if mode == "heads" else (2, 5, 4, 3))


class WrittenOutRMSNorm(nn.Module):
    """Llama's RMSNorm as captured: pow, mean, rsqrt and mul, between two linears."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.up, self.weight, self.down = nn.Linear(4, dim), nn.Parameter(torch.rand(dim) + 0.5), nn.Linear(dim, 3)

    def forward(self, x):
        h = self.up(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.down(self.weight * h)


def test_written_out_rms_norm_couples_its_weight_to_the_channel():
    graph, inputs = capture(WrittenOutRMSNorm(), 2, 4)
    assert not graph.find("rms_norm")
    g = group_of(build_groups(graph), "up.weight")
    assert [n.op for n in graph.find("rms_norm")] == ["rms_norm"]  # raised to one op, the weight absorbed
    assert g.prunable and g.size == 8
    assert member(g, "weight", 0).positions[:, 0].tolist() == list(range(8))
    assert member(g, "down.weight", 1).positions[:, 0].tolist() == list(range(8))
    graphopt.prune(graph, ratio=0.5)
    assert graph.constants["weight"].data.shape == (4,)
    assert graph.to_torch()(*inputs).shape == (2, 3)


def test_llama_for_causal_lm_hidden_size_is_prunable():
    """The hidden size reaches no output once the logits are the output: it is one group, prunable."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from graphopt.models import KwargsWrapper

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = KwargsWrapper(LlamaForCausalLM(config), ("input_ids",), {"use_cache": False}, output_attr="logits")
    inputs = (torch.randint(0, 64, (1, 8)),)
    graph = graphopt.optimize(graphopt.capture(model.eval(), inputs), "O1")
    embedding = "model.model.embed_tokens.weight"
    hidden = group_of(build_groups(graph), embedding, dim=1)
    assert hidden.prunable and hidden.size == 32
    norms = {m.value.name for m in hidden.parameters() if m.value.name.endswith("norm.weight")}
    assert len(norms) == 5  # two per layer and the final norm
    graphopt.prune(graph, inputs, ratio={hidden.label: 0.5})
    assert graph.constants[embedding].data.shape == (64, 16)
    assert graph.to_torch()(*inputs).shape == (1, 8, 64)


def test_weight_standardised_convs_prune_with_their_statistics():
    """timm's NFNet conv standardises its weight with a batch norm on the weight itself: statistics over the
    input channels do not block them, while a statistic over an activation's channels still does."""
    from timm.layers import ScaledStdConv2d

    class Standardised(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = ScaledStdConv2d(3, 8, 3, padding=1), ScaledStdConv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))).mean((2, 3))

    model = Standardised()
    graph, inputs = capture(model, 2, 3, 6, 6)
    assert not graph.find("torch.opaque") and graph.find("var")
    torch.testing.assert_close(graph.to_torch()(*inputs), model(*inputs))
    g = group_of(build_groups(graph), "a.weight")
    assert g.prunable and g.size == 8 and member(g, "b.weight", 1) is not None
    graphopt.prune(graph, inputs, ratio=0.5)
    assert graph.constants["a.weight"].data.shape[0] == 4 and graph.constants["b.weight"].data.shape[1] == 4
    assert graph.to_torch()(*inputs).shape == (2, 4)

    graph, _ = capture(Between(lambda y: y - y.mean(1, keepdim=True)), 1, 3, 4, 4)
    g = group_of(build_groups(graph), "a.weight")
    assert not g.prunable and "mean" in g.reason
