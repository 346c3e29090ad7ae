"""ONNX emitter: canonical ops lowered per opset match the IR's torch semantics in onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import graphopt
from graphopt.emitters.onnx import EmitError, emit_onnx, save_onnx
from graphopt.ir import Graph, TensorType
from graphopt.ir.ops.opaque import Arg
from ir_interpreter import run_graph


def _ort(model: onnx.ModelProto, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.numpy() for i, x in zip(model.graph.input, inputs)})


def _one_op_graph(op: str, shapes: list[tuple], attrs: dict, dtype=torch.float32, extra=None) -> Graph:
    g = Graph("one_op")
    xs = [g.add_input(f"x{i}", TensorType(dtype, s)) for i, s in enumerate(shapes)]
    for data in extra or []:
        xs.append(g.add_constant(data, "c"))
    g.outputs = list(g.add_node(op, xs, attrs).outputs)
    return g


def _inputs(g: Graph, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in g.inputs:
        t = v.type
        if t.dtype.is_floating_point:
            out.append(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype))
        else:
            out.append(torch.randint(1, 9, t.shape, generator=gen).to(t.dtype))
    return out


def _check(g: Graph, opset: int, rtol: float = 1e-5, atol: float = 1e-5) -> onnx.ModelProto:
    model = emit_onnx(g, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    inputs = _inputs(g)
    expected = run_graph(g, *inputs)
    for want, got in zip(expected, _ort(model, inputs)):
        np.testing.assert_allclose(got, want.numpy(), rtol=rtol, atol=atol)
    return model


def _op_types(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


W8 = torch.randn(8)


@pytest.mark.parametrize("op,attrs,shapes,extra,opset,present,absent", [
    ("layer_norm", {"normalized_shape": [8], "eps": 1e-5}, [(2, 3, 8)], [W8, W8], 13, "ReduceMean", "LayerNormalization"),
    ("layer_norm", {"normalized_shape": [8], "eps": 1e-5}, [(2, 3, 8)], [W8, W8], 17, "LayerNormalization", "ReduceMean"),
    ("gelu", {"approximate": "none"}, [(4, 8)], [], 18, "Erf", "Gelu"),
    ("gelu", {"approximate": "tanh"}, [(4, 8)], [], 18, "Tanh", "Gelu"),
    ("gelu", {"approximate": "tanh"}, [(4, 8)], [], 20, "Gelu", "Tanh"),
    ("group_norm", {"num_groups": 2, "eps": 1e-5}, [(2, 8, 5)], [W8, W8], 18, "InstanceNormalization", "ReduceMean"),
    ("group_norm", {"num_groups": 2, "eps": 1e-5}, [(2, 8, 5)], [W8, W8], 21, "GroupNormalization", "ReduceMean"),
    ("mean", {"dims": [1], "keepdim": False}, [(3, 4, 5)], [], 13, "ReduceMean", None),
    ("mean", {"dims": [1], "keepdim": True}, [(3, 4, 5)], [], 18, "ReduceMean", None),
    ("sum", {"dims": [0, 2], "keepdim": False}, [(3, 4, 5)], [], 13, "ReduceSum", None),
    ("rms_norm", {"normalized_shape": [8], "eps": 1e-6}, [(2, 8)], [W8], 18, "Sqrt", None),
    ("mish", {}, [(4, 8)], [], 13, "Softplus", "Mish"),
    ("mish", {}, [(4, 8)], [], 18, "Mish", None),
])
def test_per_opset_forms(op, attrs, shapes, extra, opset, present, absent) -> None:
    model = _check(_one_op_graph(op, shapes, attrs, extra=extra), opset, rtol=1e-4, atol=1e-5)
    assert present in _op_types(model)
    assert absent is None or absent not in _op_types(model)
    if absent == "ReduceMean" or op in ("mean", "sum"):
        reduce_node = next((n for n in model.graph.node if n.op_type.startswith("Reduce")), None)
        if reduce_node is not None:
            axes_in_attr = any(a.name == "axes" for a in reduce_node.attribute)
            assert axes_in_attr == (opset < 18 and reduce_node.op_type != "ReduceSum")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.float64, 1e-10)])
def test_group_norm_before_opset_21_is_the_exporters_five_nodes(dtype, tol) -> None:
    """Constant weight and bias become (C, 1, 1) initializers, so no Reshape of them runs.

    Double keeps the mean/variance decomposition: onnxruntime has no double InstanceNormalization.
    """
    weight, bias = torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype)
    g = _one_op_graph("group_norm", [(2, 6, 3, 4)], {"num_groups": 3, "eps": 1e-5}, dtype=dtype, extra=[weight, bias])
    model = _check(g, opset=18, rtol=tol, atol=tol)
    ops = [n.op_type for n in model.graph.node]
    assert ops[0] == "Reshape" and ops[-3:] == ["Reshape", "Mul", "Add"]
    assert ops[1:-3] == (["InstanceNormalization"] if dtype != torch.float64 else
                         ["ReduceMean", "Sub", "Mul", "ReduceMean", "Add", "Sqrt", "Div"])
    assert {(6, 1, 1)} <= {tuple(t.dims) for t in model.graph.initializer}


def test_group_norm_before_opset_21_reshapes_runtime_weight_and_symbolic_shapes() -> None:
    g = Graph("group_norm")
    x = g.add_input("x", TensorType(torch.float32, ("n", 6, "l")))
    weight = g.add_input("w", TensorType(torch.float32, (6,)))
    g.outputs = [g.add_node("group_norm", [x, weight, None], {"num_groups": 2, "eps": 1e-5},
                            output_types=[TensorType(torch.float32, ("n", 6, "l"))]).output]
    model = emit_onnx(g, opset=18)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node].count("Reshape") == 3 and "Shape" in _op_types(model)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, generator=gen)
    for n, length in [(1, 5), (3, 2)]:
        data = torch.randn(n, 6, length, generator=gen)
        (got,) = _ort(model, [data, w])
        np.testing.assert_allclose(got, torch.nn.functional.group_norm(data, 2, w).numpy(), rtol=1e-5, atol=1e-5)


def _sdpa_graph(q, kv, attrs: dict, mask=None, mask_input=None) -> Graph:
    """q, k, v (k and v both shaped ``kv``), and a mask that is a constant tensor or an input of this shape."""
    g = Graph("sdpa")
    xs = [g.add_input(name, TensorType(torch.float32, s)) for name, s in (("q", q), ("k", kv), ("v", kv))]
    if mask is not None:
        xs.append(g.add_constant(mask, "mask"))
    if mask_input is not None:
        xs.append(g.add_input("mask", TensorType(torch.float32, mask_input)))
    g.outputs = [g.add_node("sdpa", xs, attrs).output]
    return g


_BOOL_MASK = torch.rand(2, 1, 3, 7, generator=torch.Generator().manual_seed(1)) > 0.4
_BOOL_MASK[..., 0] = True  # no row masked in full


@pytest.mark.parametrize("q,kv,attrs,mask,mask_input", [
    ((2, 4, 5, 8), (2, 4, 5, 8), {}, None, None),
    ((2, 4, 3, 8), (2, 4, 7, 8), {"is_causal": True}, None, None),  # torch aligns the causal mask top-left
    ((2, 4, 7, 8), (2, 4, 3, 8), {"is_causal": True, "scale": 0.3}, None, None),
    ((2, 4, 3, 8), (2, 4, 7, 8), {}, _BOOL_MASK, None),
    ((2, 4, 3, 8), (2, 4, 7, 8), {}, _BOOL_MASK[0, 0], None),
    ((2, 4, 3, 8), (2, 4, 7, 8), {}, None, (2, 1, 3, 7)),
    ((2, 4, 3, 8), (2, 4, 7, 8), {}, None, (3, 7)),
    ((2, 4, 3, 8), (2, 2, 7, 8), {"enable_gqa": True}, None, (2, 1, 3, 7)),
], ids=["plain", "causal_short_q", "causal_long_q", "bool_mask", "bool_mask_2d", "float_mask", "float_mask_2d",
        "gqa"])
@pytest.mark.parametrize("opset", [18, 23])
def test_sdpa_is_one_attention_node_from_opset_23(q, kv, attrs, mask, mask_input, opset) -> None:
    g = _sdpa_graph(q, kv, attrs, mask, mask_input)
    ops = _op_types(_check(g, opset, rtol=1e-5, atol=1e-6))
    assert ("Attention" in ops, "Softmax" in ops) == ((True, False) if opset >= 23 else (False, True))
    assert ("Expand" in ops) == (opset < 23 and bool(attrs.get("enable_gqa")))  # grouped heads repeated


def test_sdpa_decomposition_repeats_each_grouped_head_for_its_queries() -> None:
    """Query head j reads key/value head j // 3 (sdpa's enable_gqa), not j % 2; symbolic batch and sequence."""
    g = Graph("gqa")
    q = g.add_input("q", TensorType(torch.float32, ("b", 6, "s", 8)))
    k, v = (g.add_input(name, TensorType(torch.float32, ("b", 2, "s", 8))) for name in "kv")
    g.outputs = [g.add_node("sdpa", [q, k, v, None], {"enable_gqa": True},
                            output_types=[TensorType(torch.float32, ("b", 6, "s", 8))]).output]
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=gen) for shape in ((2, 6, 5, 8), (2, 2, 5, 8), (2, 2, 5, 8))]
    (got,) = _ort(emit_onnx(g, opset=18), inputs)
    want = torch.nn.functional.scaled_dot_product_attention(*inputs, enable_gqa=True)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int16, torch.bfloat16, torch.float32])
def test_where_runs_in_onnxruntime_for_types_its_where_kernel_lacks(dtype) -> None:
    g = Graph("where")
    cond = g.add_input("cond", TensorType(torch.bool, (3, 4)))
    a, b = (g.add_input(name, TensorType(dtype, (3, 4))) for name in "ab")
    g.outputs = [g.add_node("where", [cond, a, b]).output]
    inputs = [torch.rand(3, 4) > 0.5, torch.rand(3, 4) > 0.3, torch.rand(3, 4) > 0.6]
    inputs[1:] = [x if dtype == torch.bool else (x * 7).to(dtype) for x in inputs[1:]]
    model = emit_onnx(g, opset=18)
    if dtype == torch.bfloat16:
        inputs = inputs[:1] + [x.float() for x in inputs[1:]]  # numpy has no bfloat16: fed through a Cast
        model = emit_onnx(_bfloat16_behind_casts(g), opset=18)
    (got,) = _ort(model, inputs)
    want = torch.where(*inputs)
    np.testing.assert_array_equal(got, want.numpy())
    assert sum(n.op_type == "Where" for n in model.graph.node) == 1


def _bfloat16_behind_casts(g: Graph) -> Graph:
    """``g`` with float32 inputs cast to bfloat16 and its output cast back."""
    outer = Graph("where_bf16")
    cond = outer.add_input("cond", TensorType(torch.bool, (3, 4)))
    a, b = (outer.add_node("cast", [outer.add_input(n, TensorType(torch.float32, (3, 4)))], {"dtype": torch.bfloat16}
                           ).output for n in "ab")
    where = outer.add_node("where", [cond, a, b]).output
    outer.outputs = [outer.add_node("cast", [where], {"dtype": torch.float32}).output]
    return outer


def test_concat_skips_a_one_dimensional_empty_input_as_torch_cat_does() -> None:
    """An empty KV cache is a 1-D empty tensor concatenated with 4-D keys."""
    g = Graph("cache")
    empty = g.add_constant(torch.empty(0), "cache")
    keys = g.add_input("keys", TensorType(torch.float32, (1, 2, 5, 8)))
    g.outputs = [g.add_node("concat", [empty, keys], {"dim": -2}).output]
    model = _check(g, 18)
    assert "Concat" not in _op_types(model)


@pytest.mark.parametrize("q,kv,mask_input", [
    ((2, 5, 8), (2, 7, 8), None),
    ((1, 2, 3, 8), (1, 2, 7, 8), (1, 7)),
    ((1, 2, 3, 8), (1, 2, 7, 8), (1, 1, 3, 1)),
], ids=["rank3", "mask_over_q", "mask_over_k"])
def test_sdpa_at_opset_23_keeps_the_decomposition_where_attention_differs(q, kv, mask_input) -> None:
    """Attention reads rank 3 as packed heads; onnxruntime refuses masks broadcast over the last two dims."""
    ops = _op_types(_check(_sdpa_graph(q, kv, {}, mask_input=mask_input), 23, rtol=1e-5, atol=1e-6))
    assert "Softmax" in ops and "Attention" not in ops


@pytest.mark.parametrize("op,attrs,shapes,dtype", [
    ("silu", {}, [(3, 5)], torch.float32),
    ("rsqrt", {}, [(3, 5)], torch.float32),
    ("atan2", {}, [(3, 5), (3, 5)], torch.float32),
    ("remainder", {}, [(3, 5), (3, 5)], torch.float32),
    ("div", {"rounding_mode": "floor"}, [(3, 5), (3, 5)], torch.int64),
    ("div", {"rounding_mode": "trunc"}, [(3, 5), (3, 5)], torch.float32),
    ("softplus", {"beta": 2.0, "threshold": 1.0}, [(3, 5)], torch.float32),
    ("hardsigmoid", {"alpha": 1 / 6, "beta": 0.5}, [(3, 5)], torch.float32),
    ("clamp", {"min": -0.5, "max": 0.5}, [(3, 5)], torch.float32),
    ("flatten", {"start_dim": 1, "end_dim": 2}, [(2, 3, 4, 5)], torch.float32),
    ("stack", {"dim": 1}, [(2, 3), (2, 3)], torch.float32),
    ("roll", {"shifts": [1, -2], "dims": [0, 1]}, [(3, 5)], torch.float32),
    ("roll", {"shifts": [2], "dims": []}, [(3, 5)], torch.float32),
    ("sum", {"dims": None, "keepdim": False}, [(3, 5)], torch.float32),
    ("flip", {"dims": [1]}, [(3, 5)], torch.float32),
    ("pad", {"pads": [1, 2, 0, 1], "mode": "reflect"}, [(1, 2, 4, 5)], torch.float32),
    ("pad", {"pads": [1, 2], "mode": "constant", "value": 3.0}, [(2, 4)], torch.float32),
    ("repeat", {"repeats": [2, 1, 3]}, [(3, 2)], torch.float32),
    ("interpolate", {"scale_factor": [2.0, 2.0], "mode": "nearest"}, [(1, 2, 3, 4)], torch.float32),
    ("interpolate", {"size": [5, 7], "mode": "bilinear", "align_corners": False}, [(1, 2, 3, 4)], torch.float32),
    ("var", {"dims": [1], "correction": 1.0, "keepdim": False}, [(3, 5)], torch.float32),
    ("any", {"dims": [1], "keepdim": False}, [(3, 5)], torch.bool),
    ("topk", {"k": 2, "dim": 1, "largest": True, "sorted": True}, [(3, 5)], torch.float32),
    ("cumsum", {"dim": 1}, [(3, 5)], torch.float32),
    ("select", {"dim": 1, "index": 2}, [(3, 5)], torch.float32),
    ("expand", {"shape": [4, -1, 5]}, [(1, 3, 1)], torch.float32),
    ("squeeze", {"dims": [0, 1]}, [(1, 3, 5)], torch.float32),
    ("adaptive_avg_pool", {"output_size": [2, 2]}, [(1, 3, 4, 6)], torch.float32),
    ("adaptive_avg_pool", {"output_size": [7, 7]}, [(1, 3, 2, 2)], torch.float32),  # VGG's head on a small input
    ("adaptive_avg_pool", {"output_size": [3, 4]}, [(2, 3, 5, 7)], torch.float32),  # overlapping uneven windows
    ("adaptive_avg_pool", {"output_size": [4]}, [(2, 3, 10)], torch.float32),
    ("max_pool", {"kernel_size": [3, 3], "stride": [2, 2], "padding": [1, 1]}, [(1, 2, 7, 7)], torch.float32),
    ("avg_pool", {"kernel_size": [2, 2], "stride": [], "padding": [0, 0]}, [(1, 2, 6, 6)], torch.float32),
    ("sdpa", {"is_causal": True}, [(1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)], torch.float32),
    ("linear", {}, [(2, 3, 4), (5, 4), (5,)], torch.float32),
    ("triu", {"diagonal": 1}, [(4, 4)], torch.float32),
    ("full_like", {"value": 2.5}, [(2, 3)], torch.float32),
    ("ne", {}, [(3, 5), (3, 5)], torch.int32),
    ("logical_xor", {}, [(3, 5), (3, 5)], torch.bool),
])
def test_canonical_ops_match_torch(op, attrs, shapes, dtype) -> None:
    if op == "any":
        g = Graph("any")
        x = g.add_input("x0", TensorType(torch.float32, shapes[0]))
        positive = g.add_node("gt", [x, g.add_constant(torch.tensor(0.5))]).output
        g.outputs = [g.add_node(op, [positive], attrs).output]
    else:
        g = _one_op_graph(op, shapes, attrs, dtype=dtype)
    _check(g, opset=18, rtol=1e-4, atol=1e-5)


def test_mixed_dtype_operands_are_cast() -> None:
    """torch promotes int32 + float32 to float32; ONNX needs explicit casts."""
    g = Graph("promote")
    a = g.add_input("a", TensorType(torch.int32, (3,)))
    b = g.add_input("b", TensorType(torch.float32, (3,)))
    g.outputs = [g.add_node("add", [a, b]).output]
    model = _check(g, opset=17)
    assert "Cast" in _op_types(model)


def test_torch_opaque_is_exported_and_spliced() -> None:
    g = Graph("opaque")
    x = g.add_input("x", TensorType(torch.float32, (1, 8, 3, 3)))
    node = g.add_node("torch.opaque", [x], {"target": torch.ops.aten.pixel_shuffle.default, "args": (Arg(0), 2),
                                            "kwargs": {}, "num_outputs": 1})
    g.outputs = [g.add_node("relu", [node.output]).output]
    model = _check(g, opset=17)
    assert "DepthToSpace" in _op_types(model)


def test_unexportable_torch_opaque_names_the_op() -> None:
    g = Graph("opaque")
    x = g.add_input("x", TensorType(torch.float32, (3, 3)))
    node = g.add_node("torch.opaque", [x], {"target": torch.linalg.eigvalsh, "args": (Arg(0),), "kwargs": {},
                                            "num_outputs": 1})
    g.outputs = [node.output]
    with pytest.raises(EmitError, match="eigvalsh"):
        emit_onnx(g)


def test_output_names_survive_optimization() -> None:
    """Cleanup removes the Identity that produced ``y``; the emitted model still calls its output ``y``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"]),
             helper.make_node("Identity", ["r"], ["z"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y, z]), opset_imports=[helper.make_opsetid("", 17)])
    graph = graphopt.optimize(graphopt.load_onnx(model), "O1")
    emitted = graph.to_onnx()
    onnx.checker.check_model(emitted, full_check=True)
    assert [o.name for o in emitted.graph.output] == ["y", "z"] and [i.name for i in emitted.graph.input] == ["x"]
    data = torch.randn(2, 3)
    for out in _ort(emitted, [data]):
        np.testing.assert_allclose(out, data.relu().numpy())


def test_save_onnx_writes_external_data_past_the_threshold(tmp_path) -> None:
    g = Graph("weights")
    x = g.add_input("x", TensorType(torch.float32, (2, 64)))
    w = g.add_constant(torch.randn(64, 64), "w", parameter=True)
    g.outputs = [g.add_node("matmul", [x, w]).output]
    path = save_onnx(g, tmp_path / "model.onnx", external_data_threshold=1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    model = onnx.load(str(path))
    data = torch.randn(2, 64)
    np.testing.assert_allclose(_ort(model, [data])[0], (data @ w.data).numpy(), rtol=1e-5, atol=1e-5)
    small = save_onnx(g, tmp_path / "inline.onnx")
    assert not (tmp_path / "inline.onnx.data").exists() and onnx.load(str(small)).graph.initializer[0].raw_data


def test_opset_below_13_is_refused() -> None:
    g = _one_op_graph("relu", [(2,)], {})
    with pytest.raises(EmitError, match="opset"):
        emit_onnx(g, opset=11)


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("target", [{"size": [7, 3]}, {"size": [1, 9]}, {"scale_factor": [2.0, 1.5]},
                                    {"scale_factor": [0.5, 0.75]}], ids=["up_down", "to_1", "scale_up", "scale_down"])
def test_interpolate_lowering_matches_torch(mode: str, align_corners: bool, target: dict) -> None:
    if mode == "nearest" and align_corners:
        pytest.skip("torch has no align_corners for nearest")
    attrs = {"size": None, "scale_factor": None, **target, "mode": mode,
             "align_corners": align_corners if mode != "nearest" else None}
    _check(_one_op_graph("interpolate", [(1, 2, 6, 8)], attrs), opset=18, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("x_shape,index_shapes,dims,transposes", [
    ((5, 6, 7), [(2, 1), (1, 4)], [0, 1], 0),  # leading: GatherND as is
    ((2, 16), [(2, 1, 1, 1), (1, 1, 1, 16)], [0, 1], 0),  # the HF mask builders' form
    ((4, 5, 6, 7), [(2, 3), (3,)], [1, 2], 2),  # consecutive, not leading: the index shape stays in place
    ((4, 5, 6, 7), [(), ()], [1, 2], 2),  # 0-d indices select
    ((4, 5, 6, 7), [(2, 3), (3,)], [1, 3], 1),  # apart: the index shape leads
    ((4, 5, 6, 7), [(2, 1, 1), (1, 3), (3,)], [0, 2, 3], 1),
], ids=["leading", "hf_mask", "middle", "scalars", "apart", "three"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_index_lowering_matches_torch(x_shape, index_shapes, dims, transposes, index_dtype) -> None:
    """Random indices, negative ones included, through onnxruntime against torch's advanced indexing."""
    g = Graph("index")
    x = g.add_input("x", TensorType(torch.float32, x_shape))
    indices = [g.add_input(f"i{k}", TensorType(index_dtype, s)) for k, s in enumerate(index_shapes)]
    g.outputs = [g.add_node("index", [x, *indices], {"dims": dims}).output]
    model = emit_onnx(g, opset=13)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node].count("Transpose") == transposes
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(x_shape, generator=gen)
    values = [torch.randint(-x_shape[d], x_shape[d], s, generator=gen, dtype=index_dtype)
              for s, d in zip(index_shapes, dims)]
    key = [slice(None)] * (max(dims) + 1)
    for d, idx in zip(dims, values):
        key[d] = idx.long()
    (got,) = _ort(model, [data, *values])
    np.testing.assert_array_equal(got, data[tuple(key)].numpy())


def test_index_lowering_broadcasts_symbolic_index_shapes() -> None:
    g = Graph("index")
    x = g.add_input("x", TensorType(torch.float32, ("n", 5, "m")))
    rows = g.add_input("rows", TensorType(torch.int64, ("b", 1)))
    cols = g.add_input("cols", TensorType(torch.int64, (1, "s")))
    g.outputs = [g.add_node("index", [x, rows, cols], {"dims": [0, 2]},
                            output_types=[TensorType(torch.float32, ("b", "s", 5))]).output]
    model = emit_onnx(g, opset=18)
    onnx.checker.check_model(model, full_check=True)
    gen = torch.Generator().manual_seed(0)
    for n, m, b, s in [(3, 4, 2, 5), (6, 2, 1, 3)]:
        data = torch.randn(n, 5, m, generator=gen)
        r = torch.randint(-n, n, (b, 1), generator=gen)
        c = torch.randint(-m, m, (1, s), generator=gen)
        (got,) = _ort(model, [data, r, c])
        np.testing.assert_array_equal(got, data[r, :, c].numpy())


def test_linear_with_constant_weight_lowers_to_matmul_on_a_transposed_initializer() -> None:
    g = _one_op_graph("linear", [(2, 5, 8)], {}, extra=[torch.randn(4, 8), torch.randn(4)])
    model = _check(g, opset=18)
    assert _op_types(model) == {"MatMul", "Add"}
    assert [tuple(t.dims) for t in model.graph.initializer if t.name.startswith("c")] == [(4,), (8, 4)]
    shared = Graph("shared")
    x = shared.add_input("x", TensorType(torch.float32, (2, 5, 8)))
    w = shared.add_constant(torch.randn(4, 8), "w")
    lin = shared.add_node("linear", [x, w, None])
    shared.outputs = [lin.output, shared.add_node("neg", [w]).output]
    model = _check(shared, opset=18)
    assert {t.name for t in model.graph.initializer} == {"w", "w_t"}  # w is still read by Neg
