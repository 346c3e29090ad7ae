"""Re-import of ONNX nodes that constant folding made canonical: exact, and checked against onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import graphopt


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _opaque_types(graph: graphopt.Graph) -> list[str]:
    return sorted(n.attrs["op_type"] for n in graph.find("onnx.opaque"))


def _assert_matches_ort(graph: graphopt.Graph, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for want, got in zip(_ort(model, feeds), _ort(graph.to_onnx(), feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        results = graph.to_torch()(*(torch.from_numpy(feeds[v.name]) for v in graph.inputs))
    for want, got in zip(_ort(model, feeds), results if isinstance(results, (tuple, list)) else [results]):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def _const(name: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(values, np.int64)))


def _computed_size_model() -> onnx.ModelProto:
    """Shape inputs computed from ``Shape(x)`` through Div, which ONNX's data propagation does not follow."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 8])
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        _const("i1", [1]), _const("i2", [2]), _const("two", [2]), _const("zero", [0]), _const("one", [1]),
        helper.make_node("Gather", ["shape", "i2"], ["last"]),
        helper.make_node("Div", ["last", "two"], ["half"]),                      # 4, computed
        _const("three", [3]),
        helper.make_node("Concat", ["half", "three", "half", "two"], ["target"], axis=0),   # [4, 3, 4, 2]
        helper.make_node("Gather", ["shape", "i1"], ["rows"]),
        helper.make_node("Concat", ["rows", "two"], ["target2"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("Slice", ["x", "zero", "half", "i2"], ["s"]),           # x[:, :, :4]
        helper.make_node("Concat", ["two", "rows", "half"], ["big"], axis=0),
        helper.make_node("Expand", ["s", "big"], ["e"]),
        helper.make_node("ConstantOfShape", ["half"], ["zeros"],
                         value=onnx.numpy_helper.from_array(np.array([1.5], np.float32))),
        helper.make_node("Squeeze", ["zero"], ["zero_s"]), helper.make_node("Squeeze", ["half"], ["last_s"]),
        helper.make_node("Squeeze", ["one"], ["one_s"]),
        helper.make_node("Range", ["zero_s", "last_s", "one_s"], ["ramp"]),
        helper.make_node("TopK", ["x", "half"], ["top", "top_idx"], axis=-1),
        helper.make_node("Sub", ["half", "two"], ["axis"]),                      # 2, computed
        helper.make_node("ReduceSum", ["x", "axis"], ["red"], keepdims=1),
        helper.make_node("Unsqueeze", ["red", "axis"], ["uns"]),
        helper.make_node("Tile", ["zeros", "half"], ["tiled"]),
    ]
    outputs = [helper.make_tensor_value_info(n, t, None) for n, t in
               [("r", TensorProto.FLOAT), ("e", TensorProto.FLOAT), ("ramp", TensorProto.INT64),
                ("top", TensorProto.FLOAT), ("top_idx", TensorProto.INT64), ("uns", TensorProto.FLOAT),
                ("tiled", TensorProto.FLOAT), ("target2", TensorProto.INT64)]]
    return helper.make_model(helper.make_graph(nodes, "g", [x], outputs), opset_imports=[helper.make_opsetid("", 17)])


def test_folded_shape_inputs_make_opaque_nodes_canonical() -> None:
    model = _computed_size_model()
    graph = graphopt.load_onnx(model)
    before = _opaque_types(graph)
    assert {"Reshape", "Slice", "ConstantOfShape", "Range", "TopK", "ReduceSum", "Unsqueeze", "Tile"} <= set(before)
    graph = graphopt.optimize(graph, "O1")
    assert "onnx.opaque" not in graph.op_counts(), _opaque_types(graph)
    assert graph.find("reshape")[0].attrs["shape"] == [4, 3, 4, 2]
    _assert_matches_ort(graph, model, {"x": np.random.rand(2, 6, 8).astype(np.float32)})


def test_a_node_whose_inputs_did_not_change_is_not_retried() -> None:
    graph = graphopt.load_onnx(_computed_size_model())
    refine = graphopt.pass_manager.get_pass("refine_onnx_opaque")()
    first = refine(graph)
    assert not first.modified and first.stats["nodes_refined"] == 0  # nothing folded yet
    tried = [n for n in graph.find("onnx.opaque") if "refine_tried" in n.meta]
    assert tried and not refine(graph).modified


def _bert_with_dynamic_batch(dynamo: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    bert = transformers.BertModel(config).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.int64)
    names = ["input_ids", "attention_mask"]
    if dynamo:
        batch = torch.export.Dim("batch")
        return torch.onnx.export(Wrapper().eval(), (ids, mask), dynamo=True, input_names=names,
                                 dynamic_shapes={n: {0: batch} for n in names}).model_proto
    import io

    buffer = io.BytesIO()
    torch.onnx.export(Wrapper().eval(), (ids, mask), buffer, dynamo=False, opset_version=17, input_names=names,
                      dynamic_axes={n: {0: "batch"} for n in names})
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_bert_head_reshapes_become_canonical_with_a_dynamic_batch(dynamo: bool) -> None:
    """``view(batch, seq, heads, -1)`` with a static seq: each target reads one dynamic dim, which becomes -1.

    The legacy export computes the position ids with Slice/GatherElements over
    ``Shape`` reads that fold; a few of its reshapes read dims that ONNX
    inference renamed (a fresh symbol per matmul), and stay opaque.
    """
    model = _bert_with_dynamic_batch(dynamo)
    graph = graphopt.optimize(graphopt.load_onnx(model), "O1")
    left = _opaque_types(graph)
    if dynamo:
        assert "Reshape" not in left and set(left) <= {"Range", "GatherND"}, left
    else:
        assert set(left) <= {"Range", "Reshape"} and left.count("Reshape") <= 5, left
    ids = np.random.randint(0, 100, (3, 8)).astype(np.int64)  # another batch size than the export's
    mask = np.ones((3, 8), np.int64)
    mask[1, 5:] = 0
    _assert_matches_ort(graph, model, {"input_ids": ids, "attention_mask": mask})


def test_swin_window_shapes_fold_block_after_block() -> None:
    """Each Swin block pads and windows by sizes computed from the previous block's output shape.

    Re-importing one block's Reshape makes the next block's Shape static, so
    refinement and folding alternate until no shape computation is left.
    """
    import io

    from graphopt.models import get_case

    model, inputs = get_case("timm.swin_tiny_patch4_window7_224").build()
    buffer = io.BytesIO()
    torch.onnx.export(model, inputs, buffer, dynamo=False, input_names=["x"])
    exported = onnx.load_from_string(buffer.getvalue())
    graph = graphopt.optimize(graphopt.load_onnx(exported), "O1")
    counts = graph.op_counts()
    assert not graph.find("onnx.opaque") and "shape" not in counts and "pad" not in counts, counts
    assert len(graph) < len(exported.graph.node) / 2
    _assert_matches_ort(graph, exported, {"x": inputs[0].numpy()})
