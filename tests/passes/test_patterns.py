"""Pattern recognition: primitive spellings of GELU, SiLU, HardSwish, LayerNorm and RMSNorm.

Small graphs check each spelling and each reason not to rewrite; real models
(a timm ViT exported to ONNX at opset 14, Hugging Face Llama and GPT-2
captured with torch.export, an AOTAutograd-decomposed MLP) check that the
rules fire where exporters and decompositions put these spellings, and that
outputs stay equal to eager and to onnxruntime.
"""
import io
import math
import warnings

import pytest
import torch
from torch import nn

import graphopt
from graphopt.ir import Graph, TensorType
from graphopt.models import get_case
from graphopt.passes.patterns import RecognizePatterns
from graphopt.testing import max_rel_error, run_onnxruntime

from ir_interpreter import random_inputs, run_graph

RTOL = 1e-5


def f32(*shape):
    return TensorType(torch.float32, shape)


def scalar(g, value, name="k"):
    return g.add_constant(torch.tensor(value, dtype=torch.float32), name)


def recognize(g):
    """Run the pass; assert a valid graph, an honest ``modified``, and outputs equal within float rounding."""
    inputs = random_inputs(g)
    expected = run_graph(g, *inputs)
    before = g.structural_hash()
    result = RecognizePatterns().call(g)
    g.verify(check_types=True)
    assert result.modified == (g.structural_hash() != before)
    for got, want in zip(run_graph(g, *inputs), expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert max_rel_error(want, got) <= RTOL
    return result


def fired(result):
    return {name: n for name, n in result.stats.items() if n}


class Builder:
    """Terse graph building: ``b.mul(a, c)`` adds a node and returns its output value."""

    def __init__(self, *shape):
        self.g = Graph()
        self.x = self.g.add_input("x", f32(*shape))

    def __getattr__(self, op):
        return lambda *inputs, **attrs: self.g.add_node(op, list(inputs), attrs).output

    def k(self, value):
        return scalar(self.g, value)

    def out(self, *values):
        self.g.outputs = list(values)
        return self.g


# ---------------------------------------------------------------------- GELU
def gelu_onnx_order(b, x):
    """What torch.onnx writes for nn.GELU: ``x * (erf(x / sqrt2) + 1) * 0.5``."""
    inner = b.add(b.erf(b.div(x, b.k(1.4142135381698608))), b.k(1.0))
    return b.mul(b.mul(x, inner), b.k(0.5))


def gelu_half_first(b, x):
    """``0.5 * x * (1 + erf(x * 0.7071067))``: the 1/sqrt2 as a product, the add turned round."""
    inner = b.add(b.k(1.0), b.erf(b.mul(x, b.k(0.7071067))))
    return b.mul(b.mul(b.k(0.5), x), inner)


def gelu_half_last(b, x):
    """``x * (0.5 * (1 + erf(x / sqrt2)))``: the half folded into the bracket."""
    inner = b.add(b.erf(b.div(x, b.k(math.sqrt(2.0)))), b.k(1.0))
    return b.mul(x, b.mul(b.k(0.5), inner))


@pytest.mark.parametrize("spelling", [gelu_onnx_order, gelu_half_first, gelu_half_last])
def test_gelu_erf_spellings_become_exact_gelu(spelling):
    b = Builder(4, 8)
    g = b.out(b.relu(spelling(b, b.x)))
    result = recognize(g)
    assert fired(result) == {"gelu_erf": 1}
    assert g.op_counts() == {"gelu": 1, "relu": 1}
    assert g.find("gelu")[0].attrs == {"approximate": "none"}


def gelu_tanh(b, x, cube):
    inner = b.mul(b.k(math.sqrt(2 / math.pi)), b.add(x, b.mul(cube, b.k(0.044715))))
    return b.mul(b.mul(x, b.k(0.5)), b.add(b.tanh(inner), b.k(1.0)))


@pytest.mark.parametrize("cube", [lambda b, x: b.pow(x, b.k(3.0)), lambda b, x: b.mul(b.mul(x, x), x)])
def test_gelu_tanh_spellings_become_tanh_gelu(cube):
    b = Builder(4, 8)
    g = b.out(gelu_tanh(b, b.x, cube(b, b.x)))
    result = recognize(g)
    assert fired(result) == {"gelu_tanh": 1}
    assert g.op_counts() == {"gelu": 1}
    assert g.find("gelu")[0].attrs == {"approximate": "tanh"} and not g.constants


def test_gelu_with_a_wrong_constant_is_left_alone():
    b = Builder(4, 8)
    inner = b.add(b.erf(b.div(b.x, b.k(math.sqrt(2.0)))), b.k(1.0))
    g = b.out(b.mul(b.mul(b.x, inner), b.k(0.6)))
    assert recognize(g).modified is False


def test_gelu_whose_intermediate_has_another_reader_is_left_alone():
    b = Builder(4, 8)
    erf = b.erf(b.div(b.x, b.k(math.sqrt(2.0))))
    gelu = b.mul(b.mul(b.x, b.add(erf, b.k(1.0))), b.k(0.5))
    g = b.out(gelu, b.neg(erf))
    assert recognize(g).modified is False
    g = b.out(gelu, erf)  # a graph output is another reader too
    assert recognize(g).modified is False


def test_a_trainable_half_is_not_a_pattern_constant():
    b = Builder(4, 8)
    half = b.g.add_constant(torch.tensor(0.5), "scale", parameter=True)
    inner = b.add(b.erf(b.div(b.x, b.k(math.sqrt(2.0)))), b.k(1.0))
    g = b.out(b.mul(b.mul(b.x, inner), half))
    assert recognize(g).modified is False


def test_a_constant_that_broadcasts_the_result_up_is_left_alone():
    b = Builder(8)
    inner = b.add(b.erf(b.div(b.x, b.k(math.sqrt(2.0)))), b.k(1.0))
    half = b.g.add_constant(torch.full((2, 1), 0.5), "half")
    g = b.out(b.mul(b.mul(b.x, inner), half))  # [2, 8], not gelu(x)'s [8]
    assert recognize(g).modified is False


# ---------------------------------------------------------- SiLU, HardSwish
def test_x_times_sigmoid_x_becomes_silu_but_not_x_times_sigmoid_y():
    b = Builder(4, 8)
    y = b.relu(b.x)
    g = b.out(b.mul(b.sigmoid(b.x), b.x), b.mul(b.x, b.sigmoid(y)))
    result = recognize(g)
    assert fired(result) == {"silu": 1}
    assert g.op_counts() == {"mul": 1, "relu": 1, "sigmoid": 1, "silu": 1}


def relu6_shifted(b, x):
    return b.clamp(b.add(x, b.k(3.0)), min=0.0, max=6.0)


@pytest.mark.parametrize("spelling", [
    lambda b, x: b.mul(x, b.hardsigmoid(x)),
    lambda b, x: b.div(b.mul(x, relu6_shifted(b, x)), b.k(6.0)),
    lambda b, x: b.mul(x, b.mul(relu6_shifted(b, x), b.k(1 / 6))),
    lambda b, x: b.mul(b.mul(x, b.k(1 / 6)), relu6_shifted(b, x)),
    lambda b, x: b.div(b.mul(x, b.clamp(b.clamp(b.add(x, b.k(3.0)), min=0), max=6)), b.k(6.0)),
])
def test_hardswish_spellings(spelling):
    b = Builder(4, 8)
    g = b.out(spelling(b, b.x))
    result = recognize(g)
    assert fired(result) == {"hardswish": 1}
    assert g.op_counts() == {"hardswish": 1}


def test_onnx_hardsigmoid_with_its_own_slope_is_not_hardswish():
    b = Builder(4, 8)
    g = b.out(b.mul(b.x, b.hardsigmoid(b.x, alpha=0.2, beta=0.5)))
    assert recognize(g).modified is False


# ---------------------------------------------------------------- LayerNorm
def layer_norm_decomposed(b, x, dims=(-1,), rsqrt=False, square_by_mul=False, eps=1e-5):
    centered = b.sub(x, b.mean(x, dims=list(dims), keepdim=True))
    square = b.mul(centered, centered) if square_by_mul else b.pow(centered, b.k(2.0))
    var_eps = b.add(b.mean(square, dims=list(dims), keepdim=True), b.k(eps))
    return b.mul(centered, b.rsqrt(var_eps)) if rsqrt else b.div(centered, b.sqrt(var_eps))


@pytest.mark.parametrize("rsqrt, square_by_mul", [(False, False), (True, False), (False, True), (True, True)])
def test_layer_norm_spellings_with_gamma_and_beta(rsqrt, square_by_mul):
    b = Builder(2, 5, 8)
    gamma = b.g.add_constant(torch.randn(8), "gamma")
    beta = b.g.add_constant(torch.randn(8), "beta")
    normed = layer_norm_decomposed(b, b.x, rsqrt=rsqrt, square_by_mul=square_by_mul, eps=1e-6)
    g = b.out(b.add(b.mul(gamma, normed), beta))
    result = recognize(g)
    assert fired(result) == {"layer_norm": 1, "layer_norm_weight": 1, "layer_norm_bias": 1}
    (ln,) = g.nodes
    assert ln.op == "layer_norm" and ln.inputs == (b.x, gamma, beta)
    assert ln.attrs["normalized_shape"] == [8] and ln.attrs["eps"] == pytest.approx(1e-6)
    assert set(g.constants) == {"gamma", "beta"}


@pytest.mark.parametrize("correction, is_layer_norm", [(0, True), (1, False)])
def test_layer_norm_with_a_var_op_only_when_it_is_biased(correction, is_layer_norm):
    b = Builder(2, 5, 8)
    centered = b.sub(b.x, b.mean(b.x, dims=[-1], keepdim=True))
    var_eps = b.add(b.var(b.x, dims=[-1], correction=correction, keepdim=True), b.k(1e-5))
    g = b.out(b.mul(centered, b.rsqrt(var_eps)))
    result = recognize(g)
    assert fired(result) == ({"layer_norm": 1} if is_layer_norm else {})


def test_layer_norm_over_the_last_two_dims_and_a_bias_without_weight():
    b = Builder(2, 5, 8)
    beta = b.g.add_constant(torch.randn(5, 8), "beta")
    g = b.out(b.add(layer_norm_decomposed(b, b.x, dims=(-2, 2)), beta))
    result = recognize(g)
    assert fired(result) == {"layer_norm": 1, "layer_norm_bias": 1}
    (ln,) = g.nodes
    assert ln.inputs == (b.x, None, beta) and ln.attrs["normalized_shape"] == [5, 8]


def test_layer_norm_keeps_a_gamma_of_another_shape_outside():
    b = Builder(2, 5, 8)
    row_scale = b.g.add_constant(torch.randn(5, 1), "row_scale")  # scales rows, not features
    g = b.out(b.mul(layer_norm_decomposed(b, b.x), row_scale))
    result = recognize(g)
    assert fired(result) == {"layer_norm": 1}
    assert g.op_counts() == {"layer_norm": 1, "mul": 1}


def test_scale_after_bias_is_not_a_layer_norm_weight():
    b = Builder(2, 8)
    beta, gamma = (b.g.add_constant(torch.randn(8), n) for n in ("beta", "gamma"))
    g = b.out(b.mul(b.add(layer_norm_decomposed(b, b.x), beta), gamma))  # (ln + beta) * gamma
    result = recognize(g)
    assert fired(result) == {"layer_norm": 1, "layer_norm_bias": 1}
    assert g.op_counts() == {"layer_norm": 1, "mul": 1}


def test_normalising_over_a_leading_dim_is_not_layer_norm():
    b = Builder(2, 5, 8)
    g = b.out(layer_norm_decomposed(b, b.x, dims=(1,)))
    assert recognize(g).modified is False


def test_layer_norm_whose_mean_is_read_elsewhere_stays_apart():
    b = Builder(2, 8)
    mean = b.mean(b.x, dims=[-1], keepdim=True)
    centered = b.sub(b.x, mean)
    var_eps = b.add(b.mean(b.pow(centered, b.k(2.0)), dims=[-1], keepdim=True), b.k(1e-5))
    g = b.out(b.div(centered, b.sqrt(var_eps)), mean)
    result = recognize(g)
    # the mean must survive, so no layer_norm; what follows the centring is still an RMS norm of it
    assert fired(result) == {"rms_norm": 1}
    assert g.op_counts() == {"mean": 1, "rms_norm": 1, "sub": 1}


# ------------------------------------------------------------------ RMSNorm
@pytest.mark.parametrize("square", ["pow", "mul"])
def test_rms_norm_with_weight(square):
    b = Builder(2, 5, 8)
    weight = b.g.add_constant(torch.randn(8), "weight", parameter=True)
    sq = b.pow(b.x, b.k(2.0)) if square == "pow" else b.mul(b.x, b.x)
    normed = b.mul(b.x, b.rsqrt(b.add(b.mean(sq, dims=[-1], keepdim=True), b.k(1e-6))))
    g = b.out(b.mul(weight, normed))
    result = recognize(g)
    assert fired(result) == {"rms_norm": 1, "rms_norm_weight": 1}
    (rms,) = g.nodes
    assert rms.inputs == (b.x, weight) and rms.attrs["normalized_shape"] == [8]
    assert weight.is_parameter  # the weight stays trainable


def test_rms_norm_as_the_dynamo_onnx_exporter_writes_it():
    """``x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2)) + eps)) * g``: the dynamo exporter's rsqrt."""
    b = Builder(2, 5, 8)
    weight = b.g.add_constant(torch.randn(8), "weight")
    root = b.sqrt(b.add(b.mean(b.pow(b.x, b.k(2.0)), dims=[-1], keepdim=True), b.k(1e-6)))
    g = b.out(b.mul(b.mul(b.x, b.g.add_node("reciprocal", [root]).output), weight))
    x = torch.randn(2, 5, 8)
    expected = g.to_torch()(x)
    result = recognize(g)
    assert fired(result) == {"rms_norm": 1, "rms_norm_weight": 1}
    assert g.op_counts() == {"rms_norm": 1}
    assert max_rel_error(expected, g.to_torch()(x)) <= RTOL


def test_rms_norm_without_keepdim_is_left_alone():
    b = Builder(2, 8)
    ms = b.mean(b.mul(b.x, b.x), dims=[-1], keepdim=False)
    g = b.out(b.mul(b.x, b.unsqueeze(b.rsqrt(b.add(ms, b.k(1e-6))), dims=[1])))
    assert recognize(g).modified is False


# ---------------------------------------------------------------- GroupNorm
def group_norm_decomposed(b, x, grouped_shape, dims=(-1,)):
    """View [N, C, H, W] as groups, normalise each, view back."""
    normed = layer_norm_decomposed(b, b.reshape(x, shape=list(grouped_shape)), dims=dims)
    return b.reshape(normed, shape=list(x.type.shape))


@pytest.mark.parametrize("grouped_shape, dims", [((2, 2, 36), (-1,)), ((2, 4, 2, 3, 3), (2, 3, 4))])
def test_group_norm_spelled_as_view_normalise_view_with_affine(grouped_shape, dims):
    b = Builder(2, 8, 3, 3)
    gamma = b.g.add_constant(torch.randn(8, 1, 1), "gamma")
    beta = b.g.add_constant(torch.randn(1, 8, 1, 1), "beta")
    g = b.out(b.add(b.mul(group_norm_decomposed(b, b.x, grouped_shape, dims), gamma), beta))
    result = recognize(g)
    assert fired(result) == {"layer_norm": 1, "group_norm": 1, "group_norm_weight": 1, "group_norm_bias": 1}
    (gn,) = g.nodes
    assert gn.attrs == {"num_groups": grouped_shape[1], "eps": pytest.approx(1e-5)}
    assert [tuple(v.type.shape) for v in gn.inputs[1:]] == [(8,), (8,)]
    assert set(g.constants) == {v.name for v in gn.inputs[1:]}


def test_a_view_that_does_not_group_channels_is_not_group_norm():
    b = Builder(2, 8, 3, 3)
    g = b.out(group_norm_decomposed(b, b.x, (2, 9, 8)))  # 9 does not divide 8 channels
    result = recognize(g)
    assert fired(result) == {"layer_norm": 1}
    assert g.op_counts() == {"layer_norm": 1, "reshape": 2}


def test_a_trainable_group_norm_weight_stays_a_separate_multiply():
    b = Builder(2, 8, 3, 3)
    gamma = b.g.add_constant(torch.randn(8, 1, 1), "gamma", parameter=True)
    g = b.out(b.mul(group_norm_decomposed(b, b.x, (2, 4, 18)), gamma))
    result = recognize(g)
    assert fired(result) == {"layer_norm": 1, "group_norm": 1}
    assert g.op_counts() == {"group_norm": 1, "mul": 1} and gamma.is_parameter


# -------------------------------------------------------------- real models
def onnx_graph(model, inputs, opset):
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, f, dynamo=False, opset_version=opset)
    return graphopt.load_onnx(f.getvalue())


def randomize_norms(model, kinds):
    """Give every norm a non-trivial weight (and bias): initialised to 1 and 0, cleanup would drop them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, kinds):
                m.weight.normal_()
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_()


def count_modules(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def test_timm_vit_exported_to_onnx_opset_14_gets_its_layer_norms_and_gelus_back():
    """Before opset 17 LayerNorm is exported as ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add, and GELU as Erf arithmetic."""
    model, inputs = get_case("timm.vit_tiny_patch16_224").build()
    randomize_norms(model, nn.LayerNorm)
    graph = graphopt.optimize(onnx_graph(model, inputs, opset=14), "O1")
    assert "layer_norm" not in graph.op_counts() and graph.op_counts()["erf"] == count_modules(model, nn.GELU)
    result = RecognizePatterns().call(graph)
    graph.verify(check_types=True)
    counts = graph.op_counts()
    assert counts["layer_norm"] == count_modules(model, nn.LayerNorm) == 25
    assert counts["gelu"] == count_modules(model, nn.GELU) == 12
    assert not {"erf", "sqrt", "pow", "mean", "sub"} & set(counts)
    assert all(ln.inputs[1] is not None and ln.inputs[2] is not None for ln in graph.find("layer_norm"))
    assert fired(result) == {"layer_norm": 25, "layer_norm_weight": 25, "layer_norm_bias": 25, "gelu_erf": 12}
    with torch.no_grad():
        expected = model(*inputs)
        assert max_rel_error(expected, graph.to_torch()(*inputs)) <= RTOL
    assert max_rel_error(expected, run_onnxruntime(graph, inputs)) <= RTOL


def test_hf_llama_rms_norm_written_in_primitives_becomes_rms_norm():
    """LlamaRMSNorm is ``weight * (x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))``; torch.export keeps it so."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model, inputs = get_case("transformers.llama").build()
    randomize_norms(model, LlamaRMSNorm)
    graph = graphopt.capture(model, inputs)
    assert "rms_norm" not in graph.op_counts()
    result = RecognizePatterns().call(graph)
    graph.verify(check_types=True)
    norms = count_modules(model, LlamaRMSNorm)
    assert graph.op_counts()["rms_norm"] == norms == 5 and "rsqrt" not in graph.op_counts()
    assert result.stats["rms_norm"] == result.stats["rms_norm_weight"] == norms
    assert all(n.inputs[1].is_parameter for n in graph.find("rms_norm"))
    with torch.no_grad():
        expected = model(*inputs)
        assert max_rel_error(expected, graph.to_torch()(*inputs)) <= RTOL
    assert max_rel_error(expected, run_onnxruntime(graph, inputs)) <= RTOL


def test_hf_gpt2_gelu_new_becomes_tanh_gelu():
    """GPT-2's ``gelu_new`` is written as ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3))))``."""
    model, inputs = get_case("transformers.gpt2").build()
    graph = graphopt.capture(model, inputs)
    result = RecognizePatterns().call(graph)
    graph.verify(check_types=True)
    layers = model.model.config.n_layer
    assert result.stats["gelu_tanh"] == layers == 2
    assert [n.attrs["approximate"] for n in graph.find("gelu")] == ["tanh"] * layers
    assert "tanh" not in graph.op_counts()
    with torch.no_grad():
        expected = model(*inputs)
        assert max_rel_error(expected, graph.to_torch()(*inputs)) <= RTOL
    assert max_rel_error(expected, run_onnxruntime(graph, inputs)) <= RTOL


def test_aot_autograd_decomposed_silu_and_hardswish_come_back():
    """AOTAutograd's core-ATen decompositions turn silu into ``x * sigmoid(x)`` and hardswish into clamps."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphopt._torch_private import aot_decompositions
    from graphopt.frontends.torch import from_fx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 16), nn.Hardswish(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    graph = from_fx(make_fx(model, decomposition_table=aot_decompositions())(x), [x])
    assert "silu" not in graph.op_counts() and "hardswish" not in graph.op_counts()
    result = RecognizePatterns().call(graph)
    graph.verify(check_types=True)
    assert fired(result) == {"silu": 1, "hardswish": 1}
    assert not {"sigmoid", "clamp", "div"} & set(graph.op_counts())
    with torch.no_grad():
        assert max_rel_error(model(x), graph.to_torch()(x)) <= RTOL


def test_onnx_group_norm_before_opset_18_and_silu_come_back():
    """torch.onnx writes GroupNorm as Reshape → InstanceNormalization(ones, zeros) → Reshape → Mul → Add
    before opset 18, and SiLU as Sigmoid → Mul."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 8, 3),
                          nn.GroupNorm(2, 8)).eval()
    randomize_norms(model, nn.GroupNorm)
    x = torch.randn(2, 3, 10, 10)
    graph = graphopt.optimize(onnx_graph(model, (x,), opset=14), "O1")
    result = RecognizePatterns().call(graph)
    graph.verify(check_types=True)
    assert fired(result) == {"group_norm": 2, "group_norm_weight": 2, "group_norm_bias": 2, "silu": 1}
    assert [n.attrs["num_groups"] for n in graph.find("group_norm")] == [4, 2]
    assert graph.op_counts() == {"conv": 2, "group_norm": 2, "silu": 1}
    with torch.no_grad():
        expected = model(x)
        assert max_rel_error(expected, graph.to_torch()(x)) <= RTOL
    assert max_rel_error(expected, run_onnxruntime(graph, (x,))) <= RTOL
