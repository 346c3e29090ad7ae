"""onnxruntime as a backend: a region becomes an ONNX model run by an ``InferenceSession``.

The region is emitted for onnxruntime's own fused ops (and, on CPU, its NCHWc
blocked convolutions) and the session applies its full optimisation level. On
CPU the session is called with numpy views of the torch tensors, and its output
arrays are wrapped as tensors, neither copied. On CUDA tensors are bound in
place with IO binding: inputs are read from the torch tensors' memory and
outputs written into tensors allocated here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from graphopt.emitters.onnx import DEFAULT_OPSET
from graphopt.emitters.onnx_table import EMITTERS
from graphopt.frontends.onnx import numpy_to_torch, torch_to_numpy
from graphopt.ir import Node, TensorType

from .base import Backend, Kernel, register_backend, static_tensors_only
from .region import Region


@register_backend
@dataclass
class OnnxRuntimeBackend(Backend):
    """Regions of ops with an ONNX lowering and static shapes, run by onnxruntime (CPU or CUDA provider)."""

    name = "onnxruntime"

    threads: int | None = None
    """Intra-op threads; default torch's thread count, so both runtimes use the same cores."""

    def unavailable(self, device: torch.device) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "this onnxruntime build has no CUDA execution provider (install onnxruntime-gpu)"
        if device.type not in ("cpu", "cuda"):
            return f"onnxruntime runs on cpu and cuda, not {device.type}"
        return None

    def supports(self, node: Node) -> bool:
        return node.op in EMITTERS and static_tensors_only(node)

    def compile(self, region: Region, device: torch.device) -> Kernel:
        import onnxruntime as ort

        target = "onnxruntime-cpu" if device.type == "cpu" else "onnxruntime"
        model = region.graph.to_onnx(opset=DEFAULT_OPSET, target=target)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        # Workers spin inside a run (parking them between its many small ops costs up to a third of the
        # latency) but stop as soon as it returns, leaving the cores to torch's threads between region calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        return _NumpySession(session) if device.type == "cpu" else _BoundSession(session, region, device)


class _NumpySession:
    """Calls a CPU session on numpy views of torch tensors. Cheaper than IO binding on CPU, whose
    per-call binding objects cost more than the copies they save (HF ViT-tiny: 0.16 against 0.21 ms)."""

    def __init__(self, session):
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: torch_to_numpy(t) for name, t in zip(self.inputs, tensors)}
        return tuple(map(_as_tensor, self.session.run(self.outputs, feeds)))


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """An output array of onnxruntime as a tensor sharing its memory (numpy_to_torch copies)."""
    if array.size and array.dtype.type.__module__ == "numpy":
        return torch.from_numpy(array)
    return numpy_to_torch(array)  # empty, or an ml_dtypes element type


class _BoundSession:
    """Calls a CUDA session through IO binding on torch tensors: zero-copy in, outputs allocated by torch."""

    def __init__(self, session, region: Region, device: torch.device):
        self.session = session
        self.device = device
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [(o.name, v.type) for o, v in zip(session.get_outputs(), region.graph.outputs)]

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        binding = self.session.io_binding()
        kept = []  # contiguous copies must outlive the run
        for name, t in zip(self.inputs, tensors):
            t = t.contiguous()
            kept.append(t)
            binding.bind_input(name, self.device.type, self.device.index or 0, _numpy_dtype(t.dtype),
                               tuple(t.shape), t.data_ptr())
        results = []
        for name, t in self.outputs:
            assert isinstance(t, TensorType)
            out = torch.empty(t.shape, dtype=t.dtype, device=self.device)
            binding.bind_output(name, self.device.type, self.device.index or 0, _numpy_dtype(t.dtype),
                                tuple(out.shape), out.data_ptr())
            results.append(out)
        self.session.run_with_iobinding(binding)
        return tuple(results)


def _numpy_dtype(dtype: torch.dtype) -> Any:
    """The numpy element type onnxruntime binds for a torch dtype (ml_dtypes for bfloat16)."""
    return torch_to_numpy(torch.empty(0, dtype=dtype)).dtype
