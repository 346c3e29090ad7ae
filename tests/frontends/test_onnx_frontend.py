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
from graphopt.errors import UnsupportedModelError
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


def _relu_model(opset: int, extra_nodes: tuple = (), extra_opsets: tuple = ()) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Softmax", ["x"], ["s"]), *extra_nodes, helper.make_node("Relu", ["s"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def test_old_opset_is_converted_to_13_and_the_conversion_is_recorded_and_logged(caplog) -> None:
    """Softmax changed meaning at 13 (axis 1 coerced to 2-D before, last axis after): the converter keeps it right."""
    model = _relu_model(11)
    with caplog.at_level("INFO", logger="graphopt.frontends.onnx_checks"):
        graph = graphopt.load_onnx(model)
    assert graph.meta["onnx"]["converted_from_opset"] == 11
    assert graph.meta["onnx"]["opset_imports"][""] == 13
    assert any("from ONNX opset 11 to 13" in r.getMessage() for r in caplog.records)
    emitted = graphopt.optimize(graph, "O2").to_onnx()
    assert {o.domain: o.version for o in emitted.opset_import}[""] == 13
    data = np.random.rand(2, 3).astype(np.float32)
    np.testing.assert_allclose(_ort(emitted, {"x": data})[0], _ort(model, {"x": data})[0], rtol=1e-6)


def test_models_at_13_and_up_are_not_converted() -> None:
    graph = graphopt.load_onnx(_relu_model(17))
    assert "converted_from_opset" not in graph.meta["onnx"] and graph.meta["onnx"]["opset_imports"][""] == 17


def test_custom_domain_ops_keep_their_domain_through_conversion() -> None:
    custom = helper.make_node("Frobnicate", ["s"], ["f"], domain="com.example")
    model = _relu_model(9, (custom,), (helper.make_opsetid("com.example", 2),))
    model.graph.node[-1].input[0] = "f"
    graph = graphopt.load_onnx(model)
    frob, = [n for n in graph.nodes if n.op == "onnx.opaque" and n.attrs["op_type"] == "Frobnicate"]
    assert frob.attrs["domain"] == "com.example" and graph.meta["onnx"]["converted_from_opset"] == 9
    imports = {o.domain: o.version for o in graph.to_onnx().opset_import}
    assert imports == {"": 13, "com.example": 2}


def test_a_conversion_the_converter_gets_wrong_is_refused_naming_the_op() -> None:
    """Scan-8 has a batch axis Scan-9 lacks; onnx's converter drops it from the declared inputs."""
    from graphopt.onnx_conformance import collect_cases

    case = next(c for c in collect_cases() if c.name == "test_scan_sum")
    assert case.model.opset_import[0].version == 8
    with pytest.raises(UnsupportedModelError, match=r"opset 8 to 13.*Scan") as info:
        graphopt.load_onnx(case.model)
    assert "\n" not in str(info.value)


def _vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _invalid_model(defect: str) -> onnx.ModelProto:
    """A small model with one defect, as a broken exporter or a hand edit leaves it."""
    x, y, inits = _vi("x", [2, 3]), _vi("y", [2, 3]), []
    outputs = [y]
    if defect == "cycle":
        nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="first"), helper.make_node("Relu", ["a"], ["b"], name="second"),
                 helper.make_node("Neg", ["b"], ["y"], name="last")]
    elif defect == "undefined input":
        nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")]
    elif defect == "output nobody produces":
        nodes, outputs = [helper.make_node("Relu", ["x"], ["y"], name="relu")], [y, _vi("z", [2, 3])]
    elif defect == "initializer byte count":
        inits = [TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 3], raw_data=b"\0" * 20)]
        nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    elif defect == "two writers":
        nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"), helper.make_node("Neg", ["x"], ["y"], name="neg")]
    elif defect == "attribute type":
        nodes = [helper.make_node("Softmax", ["x"], ["y"], name="softmax", axis="last")]
    elif defect == "negative dim":
        x = _vi("x", [-2, 3])
        nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    elif defect == "unknown op":
        nodes = [helper.make_node("Frobnicate", ["x"], ["y"], name="frob")]
    elif defect == "input of the wrong type":
        x = helper.make_tensor_value_info("x", TensorProto.INT64, [2, 3])
        nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add")]
        inits = [onnx.numpy_helper.from_array(np.ones((2, 3), np.float32), "w")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], outputs, inits),
                             opset_imports=[helper.make_opsetid("", 17)])


# each defect, and what the one-line message must name: the defect and where it is
_DEFECTS = {
    "cycle": r"cycle: node 'first' \(Add\) -> node 'second' \(Relu\) -> node 'first'",
    "undefined input": r"node 'add' \(Add\) reads 'ghost', which no node, graph input or initializer produces",
    "output nobody produces": r"graph output 'z' is produced by no node",
    "initializer byte count": r"tensor name: w\) raw_data size \(20 bytes\) is too small .*24 bytes",
    "two writers": r"value 'y' is written by two nodes, node 'relu' \(Relu\) and node 'neg' \(Neg\)",
    "attribute type": r"attribute type in 'softmax : axis'.*Expected: 'INT', actual: 'STRING'",
    "negative dim": r"graph input 'x' has dim -2 at axis 0",
    "unknown op": r"No Op registered for Frobnicate .*\(node 'frob', Frobnicate\)",
    "input of the wrong type": r"shape inference fails: \(op_type:Add, node name: add\): .*INT64 vs FLOAT",
}


@pytest.mark.parametrize("defect", list(_DEFECTS))
def test_an_invalid_model_is_refused_with_one_line_naming_the_defect(defect: str, tmp_path) -> None:
    model = _invalid_model(defect)
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    for given in (model, path):  # in memory and from a file, where onnx's checker reads the file
        with pytest.raises(UnsupportedModelError, match=_DEFECTS[defect]) as info:
            graphopt.load_onnx(given)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("command", ["optimize", "inspect"])
def test_the_cli_reports_an_invalid_model_as_one_error_line_and_writes_nothing(command: str, tmp_path, capsys) -> None:
    from graphopt.cli import main

    src, out = tmp_path / "bad.onnx", tmp_path / "out.onnx"
    src.write_bytes(_invalid_model("two writers").SerializeToString())
    argv = [command, str(src)] + (["-o", str(out)] if command == "optimize" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [line for line in lines if line.startswith("graphopt: error:")] and len(lines) == 1, err
    assert "'y' is written by two nodes" in lines[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_outputs_without_a_shape_load_and_their_nodes_are_still_checked() -> None:
    """onnx's checker wants a shape on every graph output, onnxruntime does not: the nodes are checked alone."""
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    for node, problem in ((helper.make_node("Relu", ["x"], ["y"], name="relu"), None),
                          (helper.make_node("Softmax", ["x"], ["y"], name="sm", axis="last"), "attribute type")):
        model = helper.make_model(helper.make_graph([node], "g", [_vi("x", [2, 3])], [y]),
                                  opset_imports=[helper.make_opsetid("", 17)])
        with pytest.raises(onnx.checker.ValidationError, match="'shape' of 'type' is required"):
            onnx.checker.check_model(model)
        if problem is None:
            assert [n.op for n in graphopt.load_onnx(model).nodes] == ["relu"]
        else:
            with pytest.raises(UnsupportedModelError, match=f"{problem}.*node 'sm' \\(Softmax\\)"):
                graphopt.load_onnx(model)


def test_a_graph_in_the_wrong_order_is_sorted_not_refused() -> None:
    """onnxruntime sorts an unsorted acyclic graph itself; so does graphopt, without touching the caller's model."""
    nodes = [helper.make_node("Neg", ["a"], ["y"], name="late"), helper.make_node("Relu", ["x"], ["a"], name="early")]
    model = helper.make_model(helper.make_graph(nodes, "g", [_vi("x", [2, 3])], [_vi("y", [2, 3])]),
                              opset_imports=[helper.make_opsetid("", 17)])
    graph = graphopt.load_onnx(model)
    assert [n.op for n in graph.nodes] == ["relu", "neg"]
    assert [n.name for n in model.graph.node] == ["late", "early"]
    data = np.random.rand(2, 3).astype(np.float32)
    np.testing.assert_allclose(_ort(graph.to_onnx(), {"x": data})[0], -np.maximum(data, 0))


def test_initializers_listed_as_inputs_before_ir_version_4_stay_constants() -> None:
    """IR version 3 required every initializer among the inputs; onnxruntime does not let feeds override them."""
    x, y = _vi("x", [2]), _vi("y", [2])
    bias = onnx.numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32), "bias")
    model = helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "bias"], ["y"])], "g",
                                                [x, _vi("bias", [2])], [y], [bias]),
                              opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    graph = graphopt.load_onnx(model)
    assert [v.name for v in graph.inputs] == ["x"] and "bias" in graph.constants
    emitted = graph.to_onnx()
    assert [i.name for i in emitted.graph.input] == ["x"]
    ones = np.ones(2, dtype=np.float32)
    np.testing.assert_allclose(_ort(emitted, {"x": ones})[0], _ort(model, {"x": ones})[0])


def test_a_model_past_protobufs_limit_skips_onnxs_checker_but_not_graphopts(monkeypatch) -> None:
    """onnx's checker cannot take an in-memory model over 2 GB; graphopt's own structural checks still run."""
    from graphopt.frontends import onnx_checks

    monkeypatch.setattr(onnx_checks, "_PROTO_LIMIT", 64)
    wrong_attribute = _invalid_model("attribute type")
    assert wrong_attribute.ByteSize() > 64
    graph = graphopt.load_onnx(wrong_attribute)  # only onnx's checker would have caught this one
    assert [n.attrs["op_type"] for n in graph.nodes] == ["Softmax"]
    with pytest.raises(UnsupportedModelError, match="written by two nodes"):
        graphopt.load_onnx(_invalid_model("two writers"))


def test_a_function_op_onnx_cannot_infer_still_loads() -> None:
    """onnx's shape inference fails inside MeanVarianceNormalization's function body; the model is valid."""
    from graphopt.onnx_conformance import collect_cases, graphopt_failure

    case = next(c for c in collect_cases() if c.name == "test_mvn")
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.shape_inference.infer_shapes(case.model, strict_mode=True)
    assert graphopt_failure(case) is None


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
