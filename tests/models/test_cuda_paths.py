"""Real models on CUDA through capture → O2 → to_torch and torch.compile(backend="graphopt").

The emitted code keeps devices and dtypes: fp32 must match eager tightly, fp16
and bf16 within their precision. Skipped without CUDA.
"""
from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.compile_backend import graphopt_backend
from graphopt.models import MODEL_CASES
from graphopt.testing import flatten_outputs, max_rel_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODELS = ("torchvision.resnet18", "timm.vit_tiny_patch16_224", "transformers.bert", "transformers.llama",
          "transformers.mistral", "transformers.qwen2")  # grouped-query heads: on CUDA transformers calls sdpa with enable_gqa
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}  # TF32 convs/matmuls on fp32


def _on_cuda(name: str, dtype: torch.dtype):
    model, inputs = MODEL_CASES[name].build()
    model = model.to("cuda", dtype)
    inputs = tuple(x.to("cuda", dtype) if x.is_floating_point() else x.to("cuda") for x in inputs)
    return model, inputs


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_cuda_paths_match_eager(name: str, dtype: torch.dtype):
    model, inputs = _on_cuda(name, dtype)
    with torch.no_grad():
        reference = model(*inputs)
        module = graphopt.optimize(graphopt.capture(model, inputs), "O2").to_torch()
        emitted = module(*inputs)
        torch.compiler.reset()
        compiled = torch.compile(model, backend=graphopt_backend, options={"level": "O2", "fallback": False})(*inputs)
    for got in (emitted, compiled):
        assert all(t.device.type == "cuda" and t.dtype == r.dtype
                   for t, r in zip(flatten_outputs(got), flatten_outputs(reference)))
        assert max_rel_error(reference, got) <= TOLERANCE[dtype]
