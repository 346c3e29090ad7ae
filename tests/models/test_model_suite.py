"""The real-model suite: every zoo model through capture → O1 → each emitter, against eager.

First the captured graph itself: it verifies with types re-inferred by the op
registry, and only the ops listed in ``EXPECTED_OPAQUE`` stay opaque. Then the
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

KNOWN_FAILURES: dict[tuple[str, str], str] = {}

# ATen ops no canonical op models, and why: Hugging Face mask builders index with two
# broadcast index tensors (``mask[batch_idx, kv_idx]``).
EXPECTED_OPAQUE = {"aten.index.Tensor"}


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
        assert {str(n.attrs["target"]) for n in graph.find("torch.opaque")} <= EXPECTED_OPAQUE
        return
    with torch.no_grad():
        result = run_path(path, model, inputs, reference, graph=graph)
    assert result.ok, f"{name} via {path}: {result.reason} (tolerance {SUITE_RTOL:g})"


def test_capture_fires_cleanup_on_a_real_model():
    _, _, _, graph = prepared("torchvision.resnet18")
    assert graph.meta["report"].records, "O1 ran no pass"
    assert not graph.find("torch.opaque"), "resnet18 should map to canonical ops entirely"
