"""The real-model suite: every zoo model through capture → O2 → each emitter, against eager.

First the captured graph itself: it verifies with types re-inferred by the op
registry, and every ATen op maps to a canonical op (no ``torch.opaque``). Then the
paths: ``to_torch`` (the emitted fx module), ``to_onnx`` (the emitted ONNX model in
onnxruntime) and ``torch_compile`` (``torch.compile(backend="graphopt")``). A model
that cannot pass a path is listed in ``KNOWN_FAILURES`` with its reason (strict
xfail: it turns red once fixed, so the list stays true); nothing is skipped.
"""
from __future__ import annotations

import functools

import pytest
import torch

from graphopt.models import MODEL_CASES
from graphopt.testing import PATHS, SUITE_RTOL, capture_and_optimize, run_path

KNOWN_FAILURES: dict[tuple[str, str], str] = {
    ("diffusers.wan", "ir"): "aten.empty_permuted (the rotary embedding's output buffer) has no canonical op: "
                             "it stays torch.opaque (every path still matches eager)",
}


@functools.lru_cache(maxsize=1)
def prepared(name: str):
    """Build, run eager, capture and optimize one model; the three paths of a model share it."""
    model, inputs = MODEL_CASES[name].build()
    with torch.no_grad():
        reference = model(*inputs)
    return model, inputs, reference, capture_and_optimize(model, inputs)


def _params():
    for name, case in MODEL_CASES.items():
        for path in ("ir", *PATHS):
            marks = [pytest.mark.slow] if case.slow else []
            if (name, path) in KNOWN_FAILURES:
                marks.append(pytest.mark.xfail(reason=KNOWN_FAILURES[name, path], strict=True))
            yield pytest.param(name, path, marks=marks, id=f"{name}-{path}")


@pytest.mark.parametrize("name, path", list(_params()))
def test_model_path_matches_eager(name: str, path: str):
    model, inputs, reference, graph = prepared(name)
    if path == "ir":
        graph.verify(check_types=True)
        assert not graph.find("torch.opaque"), [str(n.attrs["target"]) for n in graph.find("torch.opaque")]
        return
    with torch.no_grad():
        result = run_path(path, model, inputs, reference, graph=graph)
    assert result.ok, f"{name} via {path}: {result.reason} (tolerance {SUITE_RTOL:g})"


def test_passes_fire_on_real_models():
    """O2 shrinks the captured graph of a transformer, a DiT and a Swin (what the demo shows)."""
    for name in ("transformers.bert", "diffusers.dit", "timm.swin_tiny_patch4_window7_224"):
        model, inputs = MODEL_CASES[name].build()
        graph = capture_and_optimize(model, inputs)
        assert graph.meta["report"].fired, f"O2 changed nothing on {name}"
        assert len(graph) < graph.meta["report"].records[0].nodes_before, name
