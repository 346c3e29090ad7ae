"""diffusers' video transformers (small configs, random weights) through capture -> ONNX -> onnxruntime and
capture -> torch, against eager.

HunyuanVideo's boolean text mask reaches a ``where`` over booleans, a type onnxruntime has no Where kernel
for: the emitter selects in uint8 and casts back (the fast check of that is in
tests/emitters/test_onnx_emitter.py). Each capture takes 10-40 s on two cores, so all of these are slow.
"""
from __future__ import annotations

import functools
import json

import onnx
import pytest
import torch

import graphopt
from graphopt.models import MODEL_CASES
from graphopt.testing import SUITE_RTOL, max_rel_error, run_onnxruntime

VIDEO = ("diffusers.hunyuan_video", "diffusers.wan", "diffusers.ltx_video", "diffusers.cogvideox")


pytestmark = pytest.mark.slow


@functools.lru_cache(maxsize=1)
def prepared(name: str):
    model, inputs = MODEL_CASES[name].build()
    with torch.no_grad():
        reference = model(*inputs)
    return model, inputs, reference, graphopt.capture(model, inputs)


@pytest.mark.parametrize("name", VIDEO)
def test_captured_video_transformer_runs_in_onnxruntime_and_matches_eager(name):
    model, inputs, reference, graph = prepared(name)
    with torch.no_grad():
        assert max_rel_error(reference, run_onnxruntime(graph, inputs)) <= SUITE_RTOL
        assert max_rel_error(reference, graph.to_torch()(*inputs)) <= SUITE_RTOL


def test_hunyuan_video_selects_booleans_in_a_type_onnxruntime_runs():
    _, _, _, graph = prepared("diffusers.hunyuan_video")
    assert any(n.output.type.dtype == torch.bool for n in graph.find("where")), "the case still covers bool where"
    nodes = graph.to_onnx().graph.node
    where_outputs = {n.output[0] for n in nodes if n.op_type == "Where"}
    back_to_bool = [n for n in nodes if n.op_type == "Cast" and n.input[0] in where_outputs
                    and n.attribute[0].i == onnx.TensorProto.BOOL]
    assert len(back_to_bool) == sum(n.output.type.dtype == torch.bool for n in graph.find("where"))


@pytest.mark.parametrize("name", VIDEO)
def test_o2_video_transformer_matches_eager_in_onnxruntime_and_torch(name):
    model, inputs, reference, graph = prepared(name)
    optimized = graphopt.optimize(graph, "O2")
    assert optimized.meta["report"].fired
    with torch.no_grad():
        assert max_rel_error(reference, run_onnxruntime(optimized, inputs)) <= SUITE_RTOL
        assert max_rel_error(reference, optimized.to_torch()(*inputs)) <= SUITE_RTOL


@pytest.mark.parametrize("name", VIDEO)
def test_torch_compile_o2_runs_video_transformers_optimized(name, tmp_path):
    model, inputs, reference, _ = prepared(name)
    report = tmp_path / "report.json"
    torch.compiler.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="graphopt",
                            options={"level": "O2", "fallback": False, "report": str(report)})(*inputs)
    torch.compiler.reset()
    assert max_rel_error(reference, got) <= SUITE_RTOL
    graphs = json.loads(report.read_text())["graphs"]
    assert graphs and all("fallback" not in g and g["passes_fired"] for g in graphs)
