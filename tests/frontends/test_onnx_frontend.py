"""ONNX front end: real exported models round-trip through the IR, odd inputs fail clearly."""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import graphopt
from graphopt.ir import TensorType, get_op


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _run_torch(graph: graphopt.Graph, *inputs: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        results = graph.to_torch()(*inputs)
    return list(results) if isinstance(results, (tuple, list)) else [results]


def _export(model: torch.nn.Module, args: tuple, dynamo: bool, **kwargs) -> onnx.ModelProto:
    if dynamo:
        program = torch.onnx.export(model, args, dynamo=True, **kwargs)
        return program.model_proto
    buffer = io.BytesIO()
    torch.onnx.export(model, args, buffer, dynamo=False, opset_version=17, **kwargs)
    return onnx.load_from_string(buffer.getvalue())


def _assert_round_trip(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-4,
                       atol: float = 1e-5) -> graphopt.Graph:
    """load -> O1 -> emit gives onnxruntime the same outputs, and to_torch() agrees too."""
    expected = _ort(model, feeds)
    graph = graphopt.optimize(graphopt.load_onnx(model), "O1")
    emitted = graph.to_onnx()
    onnx.checker.check_model(emitted, full_check=True)
    assert [o.name for o in emitted.graph.output] == [o.name for o in model.graph.output]
    for want, got in zip(expected, _ort(emitted, feeds)):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    results = _run_torch(graph, *(torch.from_numpy(feeds[v.name]) for v in graph.inputs))
    for want, got in zip(expected, results):
        np.testing.assert_allclose(got.numpy(), want, rtol=rtol, atol=atol)
    return graph


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_resnet18_round_trip(dynamo: bool) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    proto = _export(model, (x,), dynamo)
    graph = _assert_round_trip(proto, {proto.graph.input[0].name: x.numpy()})
    counts = graph.op_counts()
    assert counts.get("conv", 0) == 20 and "onnx.opaque" not in counts, counts


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_tiny_bert_round_trip(dynamo: bool) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 5:] = 0

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    proto = _export(Wrapper().eval(), (ids, mask), dynamo, input_names=["input_ids", "attention_mask"])
    graph = _assert_round_trip(proto, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert graph.op_counts().get("matmul", 0) + graph.op_counts().get("gemm", 0) >= 12


def test_maps_common_ops_to_canonical_ops() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    w = onnx.numpy_helper.from_array(np.random.rand(8, 4).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Softmax", ["r"], ["y"], axis=-1)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    graph = graphopt.load_onnx(model)
    assert [n.op for n in graph.nodes] == ["matmul", "relu", "softmax"]
    assert graph.inputs[0].type == TensorType(torch.float32, ("batch", 8))
    assert graph.outputs[0].type == TensorType(torch.float32, ("batch", 4))
    assert graph.meta["source"] == "onnx" and graph.meta["onnx"]["opset_imports"] == {"": 17}


def test_integer_div_truncates_like_onnx() -> None:
    a = helper.make_tensor_value_info("a", TensorProto.INT64, [4])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, [4])
    out = helper.make_tensor_value_info("q", TensorProto.INT64, [4])
    model = helper.make_model(helper.make_graph([helper.make_node("Div", ["a", "b"], ["q"])], "g", [a, b], [out]),
                              opset_imports=[helper.make_opsetid("", 14)])
    graph = graphopt.load_onnx(model)
    node, = graph.nodes
    assert node.op == "div" and node.attrs["rounding_mode"] == "trunc"
    lhs, rhs = torch.tensor([7, -7, 7, -7]), torch.tensor([2, 2, -2, -2])
    assert _run_torch(graph, lhs, rhs)[0].tolist() == [3, -3, -3, 3]


def test_unmappable_nodes_stay_opaque_and_still_run() -> None:
    """A loop body reads an outer value: it becomes an implicit input and the node runs in onnxruntime."""
    cond_in = helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])
    iter_in = helper.make_tensor_value_info("i", TensorProto.INT64, [])
    acc_in = helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [3])
    acc_out = helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [3])
    cond_out = helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                              helper.make_node("Add", ["acc_in", "step"], ["acc_out"])],
                             "body", [iter_in, cond_in, acc_in], [cond_out, acc_out])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    trip = onnx.numpy_helper.from_array(np.array(4, dtype=np.int64), "trip")
    nodes = [helper.make_node("Mul", ["x", "x"], ["step"]),
             helper.make_node("Loop", ["trip", "", "x"], ["y"], body=body)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [trip]),
                              opset_imports=[helper.make_opsetid("", 17)])
    graph = graphopt.optimize(graphopt.load_onnx(model), "O1")
    loop, = graph.find("onnx.opaque")
    assert loop.attrs["op_type"] == "Loop" and loop.attrs["implicit"] == ("step",)
    assert not get_op("onnx.opaque").pure
    data = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    expected = data + 4 * data * data
    np.testing.assert_allclose(_ort(graph.to_onnx(), {"x": data})[0], expected)
    np.testing.assert_allclose(_run_torch(graph, torch.from_numpy(data))[0].numpy(), expected)


def test_initializer_that_is_also_an_input_stays_overridable() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    bias_vi = helper.make_tensor_value_info("bias", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    bias = onnx.numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32), "bias")
    model = helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "bias"], ["y"])], "g",
                                                [x, bias_vi], [y], [bias]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    graph = graphopt.optimize(graphopt.load_onnx(model), "O1")
    assert [v.name for v in graph.inputs] == ["x", "bias"] and not graph.constants
    emitted = graph.to_onnx()
    ones = np.ones(2, dtype=np.float32)
    np.testing.assert_allclose(_ort(emitted, {"x": ones})[0], [2.0, 3.0])
    np.testing.assert_allclose(_ort(emitted, {"x": ones, "bias": ones})[0], [2.0, 2.0])


def test_external_data_is_loaded_from_the_model_folder(tmp_path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])
    weight = np.random.rand(64, 64).astype(np.float32)
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                                                [onnx.numpy_helper.from_array(weight, "w")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").exists()
    graph = graphopt.load_onnx(path)
    np.testing.assert_array_equal(graph.constants["w"].data.numpy(), weight)


def test_bfloat16_initializers_keep_their_bits() -> None:
    values = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)
    tensor = TensorProto(name="c", data_type=TensorProto.BFLOAT16, dims=[3],
                         raw_data=values.view(torch.uint16).numpy().tobytes())
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [3])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["c"], ["y"])], "g", [], [y], [tensor]),
                              opset_imports=[helper.make_opsetid("", 17)])
    graph = graphopt.load_onnx(model)
    assert torch.equal(graph.constants["c"].data, values)


def test_random_ops_are_kept_and_impure() -> None:
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(helper.make_graph([helper.make_node("RandomNormal", [], ["y"], shape=[2, 3])], "g", [],
                                                [y]), opset_imports=[helper.make_opsetid("", 17)])
    graph = graphopt.optimize(graphopt.load_onnx(model), "O1")
    node, = graph.nodes
    assert node.op == "onnx.opaque" and not node.opdef.pure
    assert _ort(graph.to_onnx(), {})[0].shape == (2, 3)


def test_old_opset_is_refused_with_advice() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
                              opset_imports=[helper.make_opsetid("", 11)])
    with pytest.raises(ValueError, match="version_converter"):
        graphopt.load_onnx(model)


def test_bad_file_gives_a_one_line_error(tmp_path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 8)
    with pytest.raises(ValueError) as info:
        graphopt.load_onnx(path)
    assert "broken.onnx" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError):
        graphopt.load_onnx(tmp_path / "missing.onnx")


_RESIZE_CASES = {
    "nearest_scales": (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                       (1, 2, 5, 6), "scales", [1, 1, 2.0, 1.5], True),
    "nearest_sizes_down": (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                           (1, 2, 5, 6), "sizes", [1, 2, 3, 4], True),
    "linear_half_pixel": (dict(mode="linear"), (1, 2, 5, 6), "sizes", [1, 2, 7, 9], True),
    "linear_half_pixel_to_1": (dict(mode="linear"), (1, 2, 5, 6), "sizes", [1, 2, 1, 3], True),
    "linear_align_corners_to_1": (dict(mode="linear", coordinate_transformation_mode="align_corners"),
                                  (1, 2, 5, 6), "sizes", [1, 2, 1, 3], False),
    "linear_scales_down": (dict(mode="linear"), (2, 1, 6, 8), "scales", [1, 1, 0.5, 0.75], True),
    "linear_pytorch_half_pixel": (dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
                                  (1, 2, 5, 6), "sizes", [1, 2, 8, 3], True),
    "linear_align_corners": (dict(mode="linear", coordinate_transformation_mode="align_corners"),
                             (1, 2, 5, 6), "sizes", [1, 2, 9, 4], True),
    "linear_1d": (dict(mode="linear"), (1, 3, 7), "scales", [1, 1, 2.0], True),
    "trilinear": (dict(mode="linear"), (1, 1, 3, 4, 5), "sizes", [1, 1, 5, 3, 7], True),
    "cubic_half_pixel": (dict(mode="cubic", cubic_coeff_a=-0.75), (1, 2, 5, 6), "sizes", [1, 2, 9, 4], True),
    "cubic_align_corners": (dict(mode="cubic", cubic_coeff_a=-0.75, coordinate_transformation_mode="align_corners"),
                            (1, 2, 5, 6), "scales", [1, 1, 2.0, 2.0], True),
    "nearest_round": (dict(mode="nearest"), (1, 2, 5, 6), "scales", [1, 1, 2.0, 2.0], False),
    "cubic_default_a": (dict(mode="cubic"), (1, 2, 5, 6), "sizes", [1, 2, 9, 4], True),
    "cubic_a_half": (dict(mode="cubic", cubic_coeff_a=-0.5), (1, 2, 5, 6), "sizes", [1, 2, 9, 4], False),
    "cubic_exclude_outside": (dict(mode="cubic", exclude_outside=1), (1, 2, 5, 6), "sizes", [1, 2, 9, 4], False),
    "linear_pytorch_half_pixel_to_1": (dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
                                       (1, 2, 5, 6), "sizes", [1, 2, 1, 3], False),
    "linear_asymmetric": (dict(mode="linear", coordinate_transformation_mode="asymmetric"),
                          (1, 2, 5, 6), "scales", [1, 1, 2.0, 2.0], False),
}


@pytest.mark.parametrize("case", list(_RESIZE_CASES))
def test_resize_maps_to_interpolate_exactly_when_torch_computes_the_same(case: str) -> None:
    attrs, shape, kind, target, canonical = _RESIZE_CASES[case]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    dtype = np.float32 if kind == "scales" else np.int64
    init = onnx.numpy_helper.from_array(np.array(target, dtype), kind)
    inputs = ["x", "", "scales"] if kind == "scales" else ["x", "", "", "sizes"]
    node = helper.make_node("Resize", inputs, ["y"], **attrs)
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], [init]),
                              opset_imports=[helper.make_opsetid("", 19)])
    graph = graphopt.load_onnx(model)
    assert [n.op for n in graph.nodes] == (["interpolate"] if canonical else ["onnx.opaque"])
    data = np.random.rand(*shape).astype(np.float32)
    expected = _ort(model, {"x": data})[0]
    np.testing.assert_allclose(_run_torch(graph, torch.from_numpy(data))[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_ort(graph.to_onnx(), {"x": data})[0], expected, rtol=1e-5, atol=1e-5)
