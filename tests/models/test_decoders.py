"""Decoder LLMs with grouped-query attention (4 query heads over 2 key/value heads) through every path.

transformers spells grouped-query attention three ways, all covered: sdpa reading the key/value heads
unrepeated (``enable_gqa``, what transformers does on CUDA without a mask), sdpa after ``repeat_kv`` (on
CPU), and eager matmul/softmax after ``repeat_kv`` (which O2's ``fuse_attention`` turns into a grouped
sdpa). Mistral is in the fast suite; Qwen2, Phi3 and Gemma, the KV-cache spelling and O3 are slow.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch

import graphopt
from graphopt.models import gqa_decoder_builder
from graphopt.testing import SUITE_RTOL, max_rel_error, run_onnxruntime

FAMILIES = ("mistral", "qwen2", "phi3", "gemma")


def _families(fast: str = "mistral"):
    return [pytest.param(f, marks=[] if f == fast else [pytest.mark.slow]) for f in FAMILIES]


@functools.lru_cache(maxsize=2)
def prepared(family: str, attention: str, kv_cache: bool = False):
    """The model, its inputs, eager's outputs and its capture."""
    model, inputs = gqa_decoder_builder(family, attention, kv_cache)()
    with torch.no_grad():
        reference = model(*inputs)
    return model, inputs, reference, graphopt.capture(model, inputs)


def grouped_sdpas(graph) -> list:
    return [n for n in graph.find("sdpa") if n.attrs.get("enable_gqa")]


@pytest.mark.parametrize("family", _families())
def test_captured_grouped_sdpa_runs_in_onnxruntime_and_matches_eager(family):
    model, inputs, reference, graph = prepared(family, "grouped_sdpa")
    assert len(grouped_sdpas(graph)) == 2, "each layer's sdpa reads 2 key/value heads for 4 query heads"
    onnx_model = graph.to_onnx()
    assert "Attention" not in {n.op_type for n in onnx_model.graph.node}  # default opset: the decomposition
    assert max_rel_error(reference, run_onnxruntime(graph, inputs)) <= SUITE_RTOL


@pytest.mark.parametrize("family", _families())
def test_o2_fuses_eager_grouped_attention_and_emits_it_to_onnx_at_the_default_opset(family):
    model, inputs, reference, graph = prepared(family, "eager")
    optimized = graphopt.optimize(graph, "O2")
    assert optimized.meta["report"].fired.count("fuse_attention") >= 1
    assert len(grouped_sdpas(optimized)) == 2, "repeat_kv folded into sdpa's grouped-query heads"
    assert max_rel_error(reference, run_onnxruntime(optimized, inputs)) <= SUITE_RTOL
    assert max_rel_error(reference, optimized.to_torch()(*inputs)) <= SUITE_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target", ["onnx", "onnxruntime", "onnxruntime-cpu"])
def test_o2_grouped_sdpa_matches_eager_on_every_onnx_target(family, target):
    model, inputs, reference, graph = prepared(family, "grouped_sdpa")
    optimized = graphopt.optimize(graph, "O2")
    assert grouped_sdpas(optimized)
    assert max_rel_error(reference, run_onnxruntime(optimized, inputs, target=target)) <= SUITE_RTOL


@pytest.mark.slow
def test_grouped_sdpa_lowers_to_onnx_attention_at_opset_23():
    import onnxruntime as ort

    model, inputs, reference, graph = prepared("mistral", "grouped_sdpa")
    onnx_model = graphopt.optimize(graph, "O2").to_onnx(opset=23)
    assert sum(n.op_type == "Attention" for n in onnx_model.graph.node) == 2
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})
    assert max_rel_error(reference, [torch.from_numpy(o) for o in got]) <= SUITE_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_with_its_kv_cache_on_runs_in_onnxruntime(family):
    """The empty cache is a 1-D empty tensor concatenated with 4-D keys: torch.cat skips it, ONNX's Concat
    must not see it."""
    model, inputs, reference, graph = prepared(family, "sdpa", kv_cache=True)
    assert any(v.type.shape == (0,) for n in graph.find("concat") for v in n.inputs)
    for level in ("O0", "O2"):
        assert max_rel_error(reference, run_onnxruntime(graphopt.optimize(graph, level), inputs)) <= SUITE_RTOL


def compile_and_run(model, inputs, tmp_path, level: str):
    torch.compiler.reset()
    report = tmp_path / "report.json"
    with torch.no_grad():
        got = torch.compile(model, backend="graphopt",
                            options={"level": level, "fallback": False, "report": str(report)})(*inputs)
    torch.compiler.reset()
    return got, json.loads(report.read_text())["graphs"]


@pytest.mark.parametrize("family", _families())
@pytest.mark.parametrize("attention", ["grouped_sdpa", "eager"])
def test_torch_compile_o2_runs_grouped_query_decoders_optimized(family, attention, tmp_path):
    model, inputs, reference, _ = prepared(family, attention)
    got, graphs = compile_and_run(model, inputs, tmp_path, "O2")
    assert max_rel_error(reference, got) <= SUITE_RTOL
    assert graphs and all("fallback" not in g and g["checked"].startswith("first call matched") for g in graphs)
    fired = [name for g in graphs for name in g["passes_fired"]]
    if attention == "eager":
        assert "fuse_attention" in fired


@pytest.mark.slow
def test_torch_compile_o3_runs_a_grouped_query_decoder(tmp_path):
    model, inputs, reference, _ = prepared("qwen2", "grouped_sdpa")
    got, graphs = compile_and_run(model, inputs, tmp_path, "O3")
    assert max_rel_error(reference, got) <= SUITE_RTOL
    assert all("fallback" not in g for g in graphs) and any(g["lowering"] for g in graphs)
