"""The analytical cost model: a roofline per kernel, from op counts and the device's measured limits.

Each kernel (``features.launches``) takes as long as the slower of its two
ceilings, arithmetic at a share of the device's peak and memory traffic at
its bandwidth, plus a launch overhead; a region takes the sum over its
kernels plus the cost of entering the backend's runtime once. The shares are
per backend and deliberately coarse: the model is the fallback that needs no
measurement, and its job is to get the order of magnitude and the direction
of fusion and launch-overhead trade-offs right.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graphopt.backends.region import Region

from .base import CostModel
from .device_profile import DeviceProfile
from .features import Launch, launches


@dataclass(frozen=True)
class BackendConstants:
    """How close one backend gets to the device's measured limits."""

    fused: bool
    """Runs fusion groups as one kernel (else every compute node is its own)."""
    library_efficiency: float
    """Share of peak FLOP/s reached by kernels with a matmul, conv or attention."""
    other_efficiency: float = 0.1
    """Share of peak FLOP/s reached by elementwise, reduction and data-movement kernels. Peak is an FMA
    GEMM's; a loop of transcendental ops does a tenth of that and is memory-bound at any size anyway."""
    launch_cost: float = 1.0
    """Overhead per kernel, in multiples of the device's launch overhead (a tiny torch op)."""
    call_cost: float = 0.0
    """Overhead per call of the region (entering the runtime, converting tensors), in the same unit."""


DEFAULT_CONSTANTS: dict[str, BackendConstants] = {
    # Eager: BLAS and oneDNN/cuDNN calls near the peak that torch's own GEMM defines; a graph node
    # costs about two tiny ops (dispatch plus allocating its output).
    "torch": BackendConstants(fused=False, library_efficiency=0.8, launch_cost=2.0),
    # Inductor calls the same libraries for GEMMs and convs and generates the rest; its compiled
    # function first runs Dynamo's guards.
    "inductor": BackendConstants(fused=True, library_efficiency=0.8, launch_cost=1.0, call_cost=10.0),
    # MLAS is a little behind oneDNN/MKL; a session run converts tensors and crosses into C++.
    "onnxruntime": BackendConstants(fused=True, library_efficiency=0.6, launch_cost=0.5, call_cost=15.0),
    # Untuned TVM: default schedules run ResNet-50 about 47 times slower than eager on CPU, nearly all
    # of it in the convolutions: 0.8 / 47.
    "tvm": BackendConstants(fused=True, library_efficiency=0.017, launch_cost=0.5, call_cost=10.0),
    # Triton: generated GEMM epilogues somewhat behind cuBLAS; its Python launcher costs more than a torch op.
    "triton": BackendConstants(fused=True, library_efficiency=0.6, launch_cost=3.0),
}


@dataclass
class AnalyticalCostModel(CostModel):
    """Roofline estimate of a region on a backend; None for a backend without constants."""

    name = "analytical"
    backends: dict[str, BackendConstants] = field(default_factory=lambda: dict(DEFAULT_CONSTANTS))

    def predict(self, region: Region, backend: str, device: torch.device) -> float | None:
        constants = self.backends.get(backend)
        if constants is None:
            return None
        profile = DeviceProfile.for_device(device)
        kernels = launches(region.graph, constants.fused)
        return (sum(self.launch_seconds(k, constants, profile) for k in kernels)
                + constants.call_cost * profile.launch_overhead)

    @staticmethod
    def launch_seconds(launch: Launch, constants: BackendConstants, profile: DeviceProfile) -> float:
        efficiency = constants.library_efficiency if launch.uses_library else constants.other_efficiency
        return (max(launch.flops / (profile.peak_flops * efficiency), launch.bytes / profile.bandwidth)
                + constants.launch_cost * profile.launch_overhead)
