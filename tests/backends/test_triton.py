"""The Triton backend: generated kernels match torch, really run, and fall back when they cannot lower.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. Triton
decides when ``triton.language`` is first imported whether a process interprets
or compiles (importing torch._dynamo imports it), so unless ``TRITON_INTERPRET=1``
was set when this process started, ``test_kernels_in_the_interpreter`` runs this
file again in a fresh process that sets it, and the kernel tests here skip.
Shapes are small and deliberately not powers of two, so masks are exercised.
Expected values come from the reference interpreter, never from the backend.
Only the performance check needs a GPU.
"""
import pytest
import torch

import graphopt
from graphopt.backends import _triton
from graphopt.backends.base import BACKENDS, random_inputs
from graphopt.backends.region import extract, partition
from graphopt.backends.triton import TritonBackend
from graphopt.backends.triton_codegen import Unsupported, generate
from graphopt.ir import Graph, TensorType
from graphopt.passes.fusion_groups import MarkFusionGroups

from ir_interpreter import run_graph
from triton_interpreter import passed_in_interpreter

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
UNAVAILABLE = TritonBackend().unavailable(DEVICE)

# The interpreter computes masked-off lanes too (on zeros), which numpy reports.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                        "ignore:invalid value:RuntimeWarning")


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched during the test; skips where kernels cannot run."""
    if UNAVAILABLE:
        pytest.skip(f"{UNAVAILABLE}; test_kernels_in_the_interpreter runs this in a fresh process")
    names = []
    launch = _triton.Launcher.__call__

    def counted(self, *args):
        names.append(self.kernel.__name__)
        launch(self, *args)

    monkeypatch.setattr(_triton.Launcher, "__call__", counted)
    return names


@pytest.mark.skipif(UNAVAILABLE is None or DEVICE.type != "cpu", reason="kernels run in this process")
def test_kernels_in_the_interpreter(tmp_path):
    passed, output = passed_in_interpreter(__file__, tmp_path)
    assert passed >= 90, output


def t(*shape, dtype=torch.float32):
    return TensorType(dtype, shape)


def check(graph, kinds, launches, tol=1e-5):
    """Mark fusion groups, compile each region, and compare with the reference interpreter.

    ``kinds`` are the kernel kinds expected, in group order; each must have been launched once.
    """
    MarkFusionGroups().call(graph)
    backend = TritonBackend()
    kernels = []
    launches.clear()
    for region in partition(graph, backend.supports):
        kernels += backend.kernels(region, DEVICE)
        inputs = random_inputs(region, torch.device("cpu"), seed=1)
        got = backend.compile(region, DEVICE)(*(x.to(DEVICE) for x in inputs))
        for g, want in zip(got, run_graph(region.graph, *inputs), strict=True):
            assert g.dtype == want.dtype and g.shape == want.shape
            torch.testing.assert_close(g.cpu(), want, rtol=tol, atol=tol)
    assert [k.source.kind for k in kernels] == kinds
    assert len(launches) == len(kinds)
    return kernels


# ----------------------------------------------------------------- elementwise
def test_elementwise_chain_with_broadcasting_is_one_kernel(launches):
    g = Graph()
    x, y = g.add_input("x", t(3, 5, 12)), g.add_input("y", t(3, 1, 12))
    col = g.add_input("col", t(5, 1))
    bias, half = g.add_constant(torch.randn(12), "bias"), g.add_constant(torch.tensor(0.5), "half")
    a = g.add_node("add", [x, bias]).output
    b = g.add_node("mul", [a, y]).output
    c = g.add_node("sub", [b, col]).output
    d = g.add_node("gelu", [c], {"approximate": "tanh"}).output
    e = g.add_node("where", [g.add_node("gt", [c, half]).output, d, g.add_node("silu", [c]).output]).output
    g.outputs = [g.add_node("pow", [e, g.add_constant(torch.tensor(2.0), "two")]).output, c]
    (kernel,) = check(g, ["elementwise"], launches)
    assert kernel.source.inputs.count("bias") == 1  # a tensor constant is an argument; the scalars are literals


UNARY = ["relu", "sigmoid", "tanh", "exp", "neg", "abs", "erf", "sin", "cos", "floor", "ceil", "silu", "hardswish",
         "reciprocal", ("gelu", {"approximate": "none"}), ("leaky_relu", {"negative_slope": 0.2}), "elu",
         ("softplus", {"beta": 2.0}), "hardsigmoid", ("clamp", {"min": -0.5, "max": 0.7}), "logical_not",
         "isnan", ("cast", {"dtype": torch.float16}), ("dropout", {"p": 0.1})]
POSITIVE = ["log", "sqrt", "rsqrt"]
BINARY = ["add", "sub", "mul", "div", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge"]


@pytest.mark.parametrize("op", [*UNARY, *POSITIVE, *BINARY, "batch_norm", "pow"],
                         ids=lambda op: op if isinstance(op, str) else op[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pointwise_op_matches_torch(op, dtype, launches):
    op, attrs = (op, {}) if isinstance(op, str) else op
    g = Graph()
    x = g.add_input("x", t(2, 3, 5, dtype=dtype))
    first = g.add_node("exp" if op in POSITIVE else "identity", [x]).output
    if op in BINARY:
        operands = [first, g.add_input("y", t(3, 1, dtype=dtype))]
    elif op == "batch_norm":
        operands = [first, *(g.add_constant(torch.rand(3, dtype=dtype) + 0.5, name) for name in "wbmv")]
        attrs = {"eps": 1e-3}
    elif op == "pow":
        operands = [first, g.add_constant(torch.tensor(3), "three")]
    else:
        operands = [first]
    g.outputs = [g.add_node(op, operands, attrs).output]
    check(g, ["elementwise"], launches, tol=1e-5 if dtype == torch.float32 else 2e-3)


# ------------------------------------------------------------------ reductions
def test_softmax_with_scale_mask_and_consumer_is_one_kernel(launches):
    g = Graph()
    scores, mask = g.add_input("scores", t(2, 3, 7, 20)), g.add_input("mask", t(7, 20))
    scaled = g.add_node("mul", [scores, g.add_constant(torch.tensor(0.125), "scale")]).output
    masked = g.add_node("add", [scaled, mask]).output
    probs = g.add_node("softmax", [masked], {"dim": -1}).output
    logp = g.add_node("log_softmax", [masked], {"dim": 3}).output
    g.outputs = [g.add_node("mul", [probs, logp]).output]
    check(g, ["reduction"], launches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_with_residual_producer_and_activation_consumer(dtype, launches):
    g = Graph()
    x, residual = g.add_input("x", t(2, 9, 48, dtype=dtype)), g.add_input("residual", t(2, 9, 48, dtype=dtype))
    w, b = g.add_constant(torch.randn(48, dtype=dtype), "w"), g.add_constant(torch.randn(48, dtype=dtype), "b")
    summed = g.add_node("add", [x, residual]).output
    normed = g.add_node("layer_norm", [summed, w, b], {"normalized_shape": [48], "eps": 1e-6}).output
    g.outputs = [g.add_node("gelu", [normed]).output, summed]
    check(g, ["reduction"], launches, tol=1e-5 if dtype == torch.float32 else 1e-2)


def test_decomposed_layer_norm_keeps_row_statistics_in_registers(launches):
    g = Graph()
    x = g.add_input("x", t(6, 30))
    mean = g.add_node("mean", [x], {"dims": [-1], "keepdim": True}).output
    centred = g.add_node("sub", [x, mean]).output
    var = g.add_node("mean", [g.add_node("mul", [centred, centred]).output], {"dims": [1], "keepdim": True}).output
    rstd = g.add_node("rsqrt", [g.add_node("add", [var, g.add_constant(torch.tensor(1e-5), "eps")]).output]).output
    g.outputs = [g.add_node("mul", [centred, rstd]).output]
    check(g, ["reduction"], launches)


def test_rms_norm_with_default_eps_and_consumer(launches):
    g = Graph()
    x, gate = g.add_input("x", t(4, 5, 40)), g.add_input("gate", t(4, 5, 40))
    normed = g.add_node("rms_norm", [x, g.add_constant(torch.randn(40), "w")], {"normalized_shape": [40]}).output
    g.outputs = [g.add_node("mul", [normed, g.add_node("silu", [gate]).output]).output]
    check(g, ["reduction"], launches)


@pytest.mark.parametrize("op,attrs", [("sum", {"keepdim": False}), ("mean", {"keepdim": True}),
                                      ("amax", {"keepdim": False}), ("amin", {"keepdim": True}),
                                      ("var", {"correction": 1.0, "keepdim": True})])
def test_row_reduction_results_per_row(op, attrs, launches):
    g = Graph()
    x = g.add_input("x", t(3, 4, 25))
    total = g.add_node(op, [g.add_node("exp", [x]).output], {"dims": [-1], **attrs}).output
    g.outputs = [g.add_node("mul", [total, g.add_constant(torch.tensor(3.0), "k")]).output]
    check(g, ["reduction"], launches)


# ------------------------------------------------------------------- epilogues
def test_linear_with_bias_gelu_and_residual_is_one_kernel(launches):
    g = Graph()
    x = g.add_input("x", t(2, 9, 24))
    w, b = g.add_constant(torch.randn(24, 24) / 5, "w"), g.add_constant(torch.randn(24), "b")
    fc = g.add_node("linear", [x, w, b]).output
    g.outputs = [g.add_node("add", [g.add_node("gelu", [fc]).output, x]).output]
    check(g, ["epilogue"], launches, tol=1e-4)


def test_linear_of_a_single_row(launches):
    g = Graph()
    fc = g.add_node("linear", [g.add_input("x", t(1, 40)), g.add_constant(torch.randn(20, 40) / 6, "w")]).output
    g.outputs = [g.add_node("silu", [fc]).output]
    check(g, ["epilogue"], launches, tol=1e-4)


def test_matmul_of_batched_rows_with_bias_and_per_channel_scale(launches):
    g = Graph()
    x = g.add_input("x", t(3, 10, 40))
    w = g.add_constant(torch.randn(40, 20) / 6, "w")
    mm = g.add_node("matmul", [x, w]).output
    biased = g.add_node("add", [mm, g.add_constant(torch.randn(20), "bias")]).output
    g.outputs = [g.add_node("relu", [g.add_node("mul", [biased, g.add_input("scale", t(10, 1))]).output]).output, mm]
    check(g, ["epilogue"], launches, tol=1e-4)


@pytest.mark.parametrize("trans_a,trans_b", [(False, True), (True, False)])
def test_gemm_with_transposes_alpha_and_beta(trans_a, trans_b, launches):
    g = Graph()
    a = g.add_input("a", t(33, 17) if trans_a else t(17, 33))
    b = g.add_constant(torch.randn(19, 33) if trans_b else torch.randn(33, 19), "b")
    c = g.add_input("c", t(19))
    y = g.add_node("gemm", [a, b, c], {"alpha": 0.5, "beta": 2.0, "trans_a": trans_a, "trans_b": trans_b}).output
    g.outputs = [g.add_node("tanh", [y]).output]
    check(g, ["epilogue"], launches, tol=1e-4)


def test_convolution_stays_in_torch_and_its_epilogue_fuses(launches):
    g = Graph()
    x, residual = g.add_input("x", t(1, 3, 6, 6)), g.add_input("residual", t(1, 4, 6, 6))
    conv = g.add_node("conv", [x, g.add_constant(torch.randn(4, 3, 3, 3), "w"), None], {"padding": [1, 1]}).output
    g.outputs = [g.add_node("relu", [g.add_node("add", [conv, residual]).output]).output]
    (kernel,) = check(g, ["elementwise"], launches)
    assert [n.op for n in kernel.region.nodes] == ["add", "relu"]


# -------------------------------------------------------------------- fallback
def test_groups_codegen_cannot_lower_run_in_torch(launches):
    g = Graph()
    x, y = g.add_input("x", t(5, 6)), g.add_input("y", t(2, 6, 4))
    per_column = g.add_node("sum", [g.add_node("exp", [x]).output], {"dims": [0], "keepdim": True}).output
    batched = g.add_node("matmul", [x, y]).output  # the right operand is a batch of matrices
    g.outputs = [g.add_node("sigmoid", [per_column]).output,
                 g.add_node("add", [batched, g.add_constant(torch.randn(4), "bias")]).output]
    check(g, [], launches)
    assert sorted(group["kind"] for group in g.meta["fusion_groups"].values()) == ["epilogue", "reduction"]


def test_unsupported_group_explains_why():
    g = Graph()
    x = g.add_input("x", t(4, 4, dtype=torch.int64))
    g.outputs = [g.add_node("add", [g.add_node("neg", [x]).output, x]).output]
    with pytest.raises(Unsupported, match="int64"):
        generate(g, _triton.MATMUL_TILES)


def test_a_node_between_group_members_runs_before_the_group(launches):
    g = Graph()
    x, y = g.add_input("x", t(4, 6)), g.add_input("y", t(6, 4))
    first = g.add_node("relu", [x]).output
    turned = g.add_node("permute", [y], {"dims": [1, 0]}).output  # in no group, read by the group's second node
    g.outputs = [g.add_node("add", [first, turned]).output]
    check(g, ["elementwise"], launches)
    assert [n.op for n in g.nodes if "fusion_group" in n.meta] == ["relu", "add"]


def test_group_kernel_and_reference_agree(launches):
    g = Graph()
    x = g.add_input("x", t(3, 11))
    g.outputs = [g.add_node("softmax", [g.add_node("exp", [x]).output], {"dim": -1}).output]
    for node in g.nodes:
        node.meta["fusion_group"] = 0
    (kernel,) = TritonBackend().kernels(extract(g, g.nodes), DEVICE)
    inputs = random_inputs(kernel.region, DEVICE)
    torch.testing.assert_close(kernel.kernel(*inputs), kernel.reference(*inputs))
    assert kernel.group == 0 and "tl.max" in kernel.source.text


# ------------------------------------------------------------ backend surface
def test_registered_and_says_when_it_cannot_run(monkeypatch):
    assert BACKENDS["triton"] is TritonBackend
    backend, cpu = TritonBackend(), torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET is not set" in backend.unavailable(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = backend.unavailable(cpu)
    assert reason is None if _triton.language_interpreted() else "before anything imports triton" in reason
    assert "mps" in backend.unavailable(torch.device("mps"))


def test_supports_static_tensor_nodes_with_a_torch_implementation():
    g = Graph()
    static, symbolic = g.add_input("x", t(2, 3)), g.add_input("y", TensorType(torch.float32, ("n", 3)))
    backend = TritonBackend()
    assert backend.supports(g.add_node("relu", [static]))
    assert not backend.supports(g.add_node("relu", [symbolic]))


@pytest.mark.skipif(_triton.language_interpreted(), reason="this process runs Triton's interpreter")
def test_generated_kernels_compile_for_a_gpu_without_one(monkeypatch, tmp_path):
    """The interpreter runs Python; Triton's real compiler must accept the same text."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    g = Graph()
    x, w = g.add_input("x", t(8, 64, dtype=torch.float16)), g.add_constant(torch.randn(32, 64).half(), "w")
    fc = g.add_node("linear", [x, w]).output
    act = g.add_node("gelu", [g.add_node("add", [fc, g.add_input("r", t(8, 32, dtype=torch.float16))]).output])
    normed = g.add_node("layer_norm", [act.output, None, None], {"normalized_shape": [32]}).output
    g.outputs = [g.add_node("mul", [normed, g.add_node("sigmoid", [normed]).output]).output]
    MarkFusionGroups().call(g)
    (region,) = partition(g, TritonBackend().supports)
    kernels = TritonBackend().kernels(region, torch.device("cpu"))
    assert sorted(k.source.kind for k in kernels) == ["epilogue", "reduction"]
    for k in kernels:
        assert "ptx" in _triton.compile_for(k.source, arch=90)


# ------------------------------------------------------------------ real model
def test_vit_regions_compile_and_match_torch(launches):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10).eval()
    graph = graphopt.optimize(graphopt.capture(model, (torch.randn(2, 3, 32, 32),)), "O2")
    backend = TritonBackend()
    regions = partition(graph, backend.supports)
    fused = 0
    for region in regions:
        run = backend.compile(region, DEVICE)
        inputs = random_inputs(region, torch.device("cpu"))
        got = run(*(x.to(DEVICE) for x in inputs))
        for g, want in zip(got, run_graph(region.graph, *inputs), strict=True):
            torch.testing.assert_close(g.cpu(), want, rtol=1e-4, atol=1e-4)
        fused += len(backend.kernels(region, DEVICE))
    assert fused == len(graph.meta["fusion_groups"]) >= 4
    assert len(launches) == fused


def test_identical_layers_generate_identical_kernel_text():
    """Kernel text labels values per kernel, not by graph name, so the groups of a model's repeated
    blocks are one text: loaded, compiled and autotuned once (``_triton`` keys both by the text)."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=10).eval()
    graph = graphopt.optimize(graphopt.capture(model, (torch.randn(2, 3, 32, 32),)), "O2")
    members: dict[int, list] = {}
    for node in graph.nodes:
        if "fusion_group" in node.meta:
            members.setdefault(node.meta["fusion_group"], []).append(node)
    texts = []
    for group, nodes in members.items():
        try:
            texts.append(generate(extract(graph, nodes, group).graph, _triton.MATMUL_TILES).text)
        except Unsupported:
            continue
    per_block = (len(texts) - len(set(texts))) / 2  # blocks 2 and 3 repeat block 1
    assert per_block >= 3 and per_block == int(per_block)  # attention projection, MLP in, MLP out


# ------------------------------------------------------------------ performance
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_layer_norm_beats_the_torch_ops_it_replaces():
    g = Graph()
    x, residual = g.add_input("x", t(8192, 1024)), g.add_input("residual", t(8192, 1024))
    summed = g.add_node("add", [x, residual]).output
    normed = g.add_node("layer_norm", [summed, None, None], {"normalized_shape": [1024]}).output
    g.outputs = [g.add_node("gelu", [normed]).output]
    MarkFusionGroups().call(g)
    (region,) = partition(g, TritonBackend().supports)
    (kernel,) = TritonBackend().kernels(region, DEVICE)
    inputs = random_inputs(kernel.region, DEVICE)

    def seconds(fn):
        fn(*inputs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn(*inputs)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    assert seconds(kernel.kernel) < seconds(kernel.reference)
