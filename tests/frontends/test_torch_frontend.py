"""The torch front end: ATen ops land on canonical IR ops, everything else stays runnable.

Every capture is checked by running the emitted module against eager on the
example inputs (and, for dynamic shapes, on other sizes).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt import _torch_private, optimize
from graphopt.frontends.torch import capture, from_fx
from graphopt.ir import ScalarType, TensorType
from graphopt.models import KwargsWrapper
from graphopt.testing import max_rel_error


def round_trip(model: nn.Module, inputs: tuple, dynamic=None, other_inputs: tuple | None = None):
    """Capture, verify, emit, and check the emitted module against eager; returns the graph."""
    graph = capture(model, inputs, dynamic=dynamic)
    graph.verify()
    module = graph.to_torch()
    for args in [inputs] + ([other_inputs] if other_inputs else []):
        with torch.no_grad():
            assert max_rel_error(model(*args), module(*args)) <= 1e-5
    return graph


def opaque_targets(graph) -> list[str]:
    return sorted(str(n.attrs["target"]) for n in graph.find("torch.opaque"))


def assert_types_agree_with_registry(graph) -> None:
    """Every canonical node's recorded types equal what the op's torch impl infers."""
    graph.verify(check_types=True)


# ------------------------------------------------------------------ families
class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.deconv = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, x):
        return self.gn(self.deconv(F.hardswish(self.bn(self.conv(x)))))


def test_conv_bn_and_norms_are_canonical():
    model = ConvBN().eval()
    model.bn.running_mean.uniform_(-1, 1)
    graph = round_trip(model, (torch.randn(2, 3, 16, 16),))
    counts = graph.op_counts()
    assert counts["conv"] == 2 and counts["batch_norm"] == 1 and counts["group_norm"] == 1
    assert counts["hardswish"] == 1 and "torch.opaque" not in counts
    bn = graph.find("batch_norm")[0]
    assert [v.name for v in bn.inputs[1:]] == ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    assert graph.find("conv")[1].attrs["transposed"] is True
    assert_types_agree_with_registry(graph)


def test_constants_share_the_model_tensors():
    model = ConvBN().eval()
    graph = capture(model, (torch.randn(1, 3, 8, 8),))
    weight = graph.constants["conv.weight"]
    assert weight.data is model.conv.weight and weight.is_parameter
    assert not graph.constants["bn.running_var"].is_parameter
    assert graph.meta["source"] == "torch" and graph.meta["torch"]["out_spec"] is not None


def test_linear_matmul_and_addmm_forms():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 6)
            self.w = nn.Parameter(torch.randn(6, 5))
            self.b = nn.Parameter(torch.randn(5))

        def forward(self, x, y):
            h = self.fc(x)
            return torch.addmm(self.b, h, self.w, beta=0.5, alpha=2.0), h @ y, torch.bmm(y, y.transpose(1, 2))

    graph = round_trip(M().eval(), (torch.randn(4, 8), torch.randn(3, 6, 2)))
    counts = graph.op_counts()
    assert counts["linear"] == 1 and counts["gemm"] == 1 and counts["matmul"] == 2
    gemm = graph.find("gemm")[0]
    assert (gemm.attrs["alpha"], gemm.attrs["beta"]) == (2.0, 0.5)


class Attention(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, mask):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        return x + self.proj(F.gelu(y.transpose(1, 2).reshape(b, t, c), approximate="tanh"))


def test_attention_block_is_canonical():
    x, mask = torch.randn(2, 5, 16), torch.randn(2, 1, 5, 5)
    graph = round_trip(Attention().eval(), (x, mask))
    counts = graph.op_counts()
    assert "torch.opaque" not in counts
    assert counts["sdpa"] == 1 and counts["layer_norm"] == 1 and counts["split"] == 1
    sdpa = graph.find("sdpa")[0]
    assert sdpa.attrs["scale"] == 0.3 and sdpa.inputs[3] is graph.inputs[1]
    assert graph.find("gelu")[0].attrs["approximate"] == "tanh"
    assert_types_agree_with_registry(graph)


def test_shape_ops_are_canonical():
    class M(nn.Module):
        def forward(self, x, idx):
            y = x.permute(0, 2, 1).flatten(1).unsqueeze(-1).expand(-1, -1, 3)
            z = torch.cat([y[:, 1:7:2], y[:, :3]], dim=1)
            parts = torch.split(x, [1, 3], dim=2)
            w = x.index_select(1, idx) + torch.gather(x, 1, idx.view(1, -1, 1).expand(2, -1, 4))
            padded = F.pad(x, (1, 2), value=0.5)
            return z, parts[1].select(2, 0), w, padded, x[:, 0], x.roll(1, 1).flip(2).repeat(1, 2, 1), x.tril(1)

    graph = round_trip(M(), (torch.randn(2, 3, 4), torch.tensor([2, 0])))
    assert opaque_targets(graph) == []
    counts = graph.op_counts()
    for op in ("permute", "reshape", "expand", "slice", "concat", "split", "index_select", "gather", "pad",
               "select", "roll", "flip", "repeat", "tril"):
        assert op in counts, op
    assert_types_agree_with_registry(graph)


class StridedWrites(nn.Module):
    """``out[..., start::step] = src``: Wan's rotary embedding interleaves two halves so, plus odd starts."""

    def forward(self, x):
        half = x[..., ::2]
        out = torch.zeros_like(x)
        out[..., 0::2] = half * 2
        out[..., 1::2] = half - 1
        other = x.clone()
        other[..., 1:6:3] = x[..., :2]  # step 3 from 1: the spread is cut short of the dim's end
        late = x.clone()
        late[..., 5::2] = x[..., :2]  # start >= step: a gather
        return out, other, late


def test_strided_writes_join_groups_or_repeat_the_source_instead_of_gathering_it():
    # before: slice_scatter with step > 1; expected: a write of one element per group of `step` is a concat on
    # the dim split into groups; any other is where(mask, src repeated step times, x), a gather only when the
    # write starts at or past one step
    graph = round_trip(StridedWrites(), (torch.randn(2, 3, 8),))
    assert opaque_targets(graph) == []
    assert len(graph.find("where")) == 2
    assert len(graph.find("index_select")) == 1
    assert len(graph.find("concat")) == 2 + 2  # the halves' groups joined; the step-3 write's repeat and filler


def test_interleaved_halves_clean_up_into_one_concat_of_the_halves():
    # before: out = zeros; out[..., 0::2] = a; out[..., 1::2] = b (two writes); expected after O1: one concat of
    # a and b on the split dim, nothing read from the zeros
    class Interleave(nn.Module):
        def forward(self, x):
            out = torch.zeros_like(x)
            out[..., 0::2] = x[..., :4] * 2
            out[..., 1::2] = x[..., 4:] - 1
            return out

    x = torch.randn(2, 3, 8)
    graph = round_trip(Interleave(), (x,), dynamic={"x": {0: "batch"}})
    optimize(graph, "O1")
    (concat,) = graph.find("concat")
    assert [v.producer.op for v in concat.inputs] == ["unsqueeze", "unsqueeze"]
    assert not graph.find("slice") or all(n.attrs["step"] == 1 for n in graph.find("slice"))
    assert max_rel_error(Interleave()(x), graph.to_torch()(x)) == 0


class MultiIndex(nn.Module):
    """HF mask builders' ``mask[batch_idx, kv_idx]`` with broadcast index tensors, plus torch's other layouts."""

    def forward(self, mask, x, rows, cols):
        batch_idx = torch.arange(mask.shape[0]).view(-1, 1, 1, 1)
        kv_idx = torch.arange(mask.shape[1]).view(1, 1, 1, -1)
        leading = mask[batch_idx, kv_idx]
        middle = x[:, rows, cols]  # consecutive: the index shape stays in place
        apart = x[rows, :, cols.int()]  # not consecutive: the index shape leads
        return leading, middle, apart, x[:, rows]


def test_as_strided_is_canonical_only_as_a_reshape():
    """AOTAutograd replays some output views as ``as_strided`` (ConvNeXt's head): with contiguous
    strides over a contiguous input it is a reshape; any other layout stays opaque."""
    class M(nn.Module):
        def forward(self, x):
            flat = torch.as_strided(x.relu(), (2, 6, 1, 1), (6, 1, 6, 6))
            transposed = torch.as_strided(x.sigmoid(), (3, 4), (1, 3))
            return flat, transposed

    graph = round_trip(M(), (torch.randn(2, 2, 3),))
    assert graph.op_counts()["reshape"] == 1
    assert opaque_targets(graph) == ["aten.as_strided.default"]


def test_several_index_tensors_are_canonical():
    rows, cols = torch.tensor([[0, -1], [2, 1]]), torch.tensor([3, -4])
    inputs = (torch.rand(2, 16) > 0.5, torch.randn(3, 4, 5), rows.clamp(min=-3, max=2), cols)
    graph = round_trip(MultiIndex(), inputs)
    assert opaque_targets(graph) == []
    assert sorted(tuple(n.attrs["dims"]) for n in graph.find("index")) == [(0, 1), (0, 2), (1, 2)]
    assert [n.attrs["axis"] for n in graph.find("take")] == [1]
    assert_types_agree_with_registry(graph)
    for want, got in zip(MultiIndex()(*inputs), graph.to_torch()(*inputs)):
        assert torch.equal(want, got)


def test_bool_mask_indexing_stays_opaque():
    """A mask's result size depends on the data: no canonical op models it."""
    class M(nn.Module):
        def forward(self, x, keep):
            return x[keep] * 2

    graph = round_trip(M(), (torch.randn(4, 3), torch.tensor([True, False, True, True])))
    assert opaque_targets(graph) == ["aten.index.Tensor"]


def test_pooling_and_interpolation_are_canonical():
    class M(nn.Module):
        def forward(self, x):
            a = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)
            b = F.avg_pool2d(x, 2, count_include_pad=False)
            c = F.adaptive_avg_pool2d(x, (3, 2))
            d = F.interpolate(x, scale_factor=2.0, mode="nearest")
            e = F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=True)
            return a, b, c, d, e, x.mean((2, 3), keepdim=True)

    graph = round_trip(M(), (torch.randn(2, 3, 8, 8),))
    counts = graph.op_counts()
    assert "torch.opaque" not in counts
    assert counts["max_pool"] == 1 and counts["avg_pool"] == 1 and counts["adaptive_avg_pool"] == 1
    assert counts["interpolate"] == 2 and counts["mean"] == 1
    modes = sorted(n.attrs["mode"] for n in graph.find("interpolate"))
    assert modes == ["bilinear", "nearest"]
    assert_types_agree_with_registry(graph)


def test_scalar_operands_keep_torch_type_promotion():
    class M(nn.Module):
        def forward(self, h, i, j):
            return h * 0.5, i + 1, j + 1, i / 2.0, torch.where(j > 2, j, 7), (h - 1) ** 2

    h = torch.randn(3, dtype=torch.float16)
    i = torch.tensor([1, 2, 3])
    j = torch.tensor([1, 2, 5], dtype=torch.int32)
    graph = round_trip(M(), (h, i, j))
    scalars = {n.op: [v.data for v in n.inputs if v.is_constant] for n in graph.nodes}
    assert scalars["mul"][0].dtype == torch.float16 and scalars["mul"][0].dim() == 0
    adds = [n for n in graph.find("add")]
    assert [n.inputs[1].data.dtype for n in adds] == [torch.int64, torch.int32]
    div = graph.find("div")[0]
    assert div.inputs[1].data.dtype == torch.float32 and div.output.type.dtype == torch.float32
    assert graph.find("where")[0].output.type.dtype == torch.int32
    assert_types_agree_with_registry(graph)


def test_casts_creation_and_reductions():
    class M(nn.Module):
        def forward(self, x):
            n = x.shape[-1]
            pos = torch.arange(n, dtype=torch.float32) + torch.ones_like(x) + torch.full((n,), 2.0)
            return (pos.half().float(), x.sum(-1), x.amax(0), x.var(1, unbiased=False), x.softmax(-1, dtype=torch.float64),
                    torch.topk(x, 2).values, x.cumsum(1), x.argmax(1), torch.triu(x), torch.zeros_like(x, dtype=torch.int32))

    graph = round_trip(M(), (torch.randn(3, 4),))
    assert opaque_targets(graph) == []
    counts = graph.op_counts()
    for op in ("arange", "full_like", "full", "cast", "sum", "amax", "var", "softmax", "topk", "cumsum", "argmax",
               "triu"):
        assert op in counts, op
    assert graph.find("var")[0].attrs["correction"] == 0
    assert "cpu" not in graph.to_torch().code
    assert_types_agree_with_registry(graph)


def test_unknown_ops_stay_opaque_and_run():
    class M(nn.Module):
        def forward(self, x):
            values, order = torch.sort(x, dim=-1)
            return torch.logcumsumexp(values, 1) + order, torch.special.i0(x)

    graph = round_trip(M(), (torch.randn(3, 5),))
    targets = opaque_targets(graph)
    assert "aten.sort.default" in targets and "aten.logcumsumexp.default" in targets
    sort = next(n for n in graph.find("torch.opaque") if str(n.attrs["target"]) == "aten.sort.default")
    assert sort.attrs["num_outputs"] == 2 and len(sort.outputs) == 2
    assert sort.outputs[1].type == TensorType(torch.int64, (3, 5))


def test_higher_order_ops_keep_their_subgraphs_runnable():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda x: self.fc(x).relu(), lambda x: x - 1, (x,))

    model, x = M().eval(), torch.randn(2, 4)
    graph = round_trip(model, (x,), other_inputs=(-x.abs() - 1,))
    cond = next(n for n in graph.find("torch.opaque") if "cond" in str(n.attrs["target"]))
    assert any(isinstance(a, torch.fx.GraphModule) for a in cond.attrs["args"])


def test_used_auxiliary_outputs_keep_the_op_opaque():
    """Auxiliary results that are used (here: layer norm's mean and rstd) keep the op opaque with its getitems."""
    class M(nn.Module):
        def forward(self, x, w, b):
            out, mean, rstd = torch.ops.aten.native_layer_norm(x, [4], w, b, 1e-5)
            return out, mean * rstd

    graph = round_trip(M(), (torch.randn(3, 4), torch.randn(4), torch.randn(4)))
    assert "aten.native_layer_norm.default" in opaque_targets(graph)
    assert "layer_norm" not in graph.op_counts()


def test_dynamic_shapes_become_named_symbols():
    model = Attention().eval()
    x, mask = torch.randn(2, 5, 16), torch.randn(2, 1, 5, 5)
    graph = round_trip(model, (x, mask), dynamic={"x": {0: "batch"}, "mask": {0: "batch"}},
                       other_inputs=(torch.randn(3, 5, 16), torch.randn(3, 1, 5, 5)))
    assert graph.inputs[0].type.shape == ("batch", 5, 16)
    assert graph.inputs[1].type.shape == ("batch", 1, 5, 5)
    # one symbolic entry in a view target is inferred: the reshapes stay canonical
    assert "aten.view.default" not in opaque_targets(graph)
    assert all(n.attrs["shape"].count(-1) == 1 for n in graph.find("reshape"))
    assert graph.find("sdpa")[0].output.type.shape == ("batch", 2, 5, 8)


def test_an_automatic_dim_is_symbolic_where_the_program_allows_it():
    """``"batch?"`` (``Dim.AUTO``) through a ``forward(*args)`` wrapper: the table's rows stay static, since
    they are added to every sample, while the samples' dim becomes ``batch``."""
    class M(nn.Module):
        def forward(self, x, table):
            return x + table

    model = KwargsWrapper(M(), ("x", "table"))
    x, table = torch.randn(2, 5, 16), torch.randn(5, 16)
    graph = round_trip(model, (x, table), dynamic={0: {0: "batch?"}, 1: {0: "batch?"}},
                       other_inputs=(torch.randn(3, 5, 16), table))
    assert graph.inputs[0].type.shape == ("batch", 5, 16)
    assert graph.inputs[1].type.shape == (5, 16)


def test_host_integer_arithmetic_is_opaque_scalars():
    class M(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0] * x.shape[1], -1), x.shape[0] * 2

    graph = round_trip(M(), (torch.randn(2, 3, 4),), dynamic={0: {0: "b", 1: "t"}},
                       other_inputs=(torch.randn(5, 6, 4),))
    assert graph.outputs[1].type == ScalarType(torch.int64)
    assert graph.outputs[0].type.shape == ("b*t", 4)


def test_source_meta_names_the_aten_op_and_module():
    graph = capture(ConvBN().eval(), (torch.randn(1, 3, 8, 8),))
    conv = graph.find("conv")[0]
    assert conv.meta["source"] == "aten.convolution.default"
    assert conv.meta["module"].endswith("conv")


@pytest.mark.parametrize("name", [
    "transformers.bert",
    pytest.param("transformers.gpt2", marks=pytest.mark.slow),
    pytest.param("transformers.llama", marks=pytest.mark.slow),
])
def test_hf_mask_builders_capture_without_opaque_ops(name):
    """HF attention-mask builders index masks with broadcast tensors; that lands on ``index`` and exports."""
    from graphopt.models import get_case
    from graphopt.testing import run_path

    model, inputs = get_case(name).build()
    with torch.no_grad():
        reference = model(*inputs)
    graph = capture(model, inputs)
    assert opaque_targets(graph) == []
    assert "index" in graph.op_counts()
    result = run_path("to_onnx", model, inputs, reference, graph=graph)
    assert result.reason == "", result.reason


# ------------------------------------------------------------------- from_fx
def _aot_graphs(model, inputs, train: bool):
    """Run ``model`` through AOTAutograd; each ATen graph is imported with ``from_fx`` and emitted back."""
    graphs = []

    def compiler(gm, example_inputs):
        with _torch_private.outside_fake_mode():
            graph = from_fx(gm, example_inputs)
            graph.verify()
            graphs.append(graph)
            return _torch_private.boxed(graph.to_torch())

    def backend(gm, example_inputs):
        return _torch_private.aot_compile(gm, example_inputs, fw_compiler=compiler, bw_compiler=compiler,
                                          inference_compiler=compiler)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    if train:
        compiled(*inputs).sum().backward()
    else:
        with torch.no_grad():
            out = compiled(*inputs)
        return graphs, out
    return graphs, None


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)

    def forward(self, x):
        y = F.silu(self.conv(x)).mean((2, 3))
        return self.norm(torch.tanh(self.fc(y))) * 2


def test_from_fx_inference_graph_is_canonical():
    model, x = MLP().eval(), torch.randn(2, 3, 6, 6)
    graphs, out = _aot_graphs(model, (x,), train=False)
    assert len(graphs) == 1
    assert opaque_targets(graphs[0]) == []
    assert {"conv", "linear", "layer_norm", "sigmoid"} <= set(graphs[0].op_counts())
    with torch.no_grad():
        assert max_rel_error(model(x), out) <= 1e-5


def test_from_fx_training_graphs_give_eager_gradients():
    torch.manual_seed(0)
    model, x = MLP().train(), torch.randn(2, 3, 6, 6)
    graphs, _ = _aot_graphs(model, (x,), train=True)
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).sum().backward()
    assert len(graphs) == 2
    for name, p in model.named_parameters():
        assert torch.allclose(compiled_grads[name], p.grad, atol=1e-5), name


def test_from_fx_without_fake_values_uses_example_inputs():
    def f(x, y):
        return torch.ops.aten.add.Tensor(torch.ops.aten.relu.default(x), y), None

    gm = torch.fx.symbolic_trace(f)
    x, y = torch.randn(2, 3), torch.randn(3)
    graph = from_fx(gm, (x, y))
    assert graph.op_counts() == {"add": 1, "relu": 1}
    assert graph.outputs[0].type == TensorType(torch.float32, (2, 3))
    out = graph.to_torch()(x, y)
    assert out[1] is None and torch.equal(out[0], f(x, y)[0])
