"""ONNX's own backend test cases through graphopt (load -> O2 -> emit -> onnxruntime).

Cases onnxruntime itself fails or gets wrong on the unmodified model are skipped
as baseline failures; every other case must give the expected outputs. The
harness is ``graphopt.onnx_conformance``; ``benchmarks/onnx_backend_pass_rate.py``
prints the pass rate.
"""
from __future__ import annotations

import pytest

from graphopt import onnx_conformance as harness

CASES = {case.name: case for case in harness.collect_cases()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_case(name: str) -> None:
    case = CASES[name]
    why_not = harness.baseline_failure(case)
    if why_not is not None:
        pytest.skip(f"baseline failure: {why_not}")
    reason = harness.graphopt_failure(case)
    assert reason is None, f"{name}: {reason}"


def test_collection_covers_node_and_model_cases() -> None:
    """The suite really holds ONNX's node cases and the shipped model folders."""
    assert len(CASES) > 1500
    assert "test_single_relu_model" in CASES and "test_AvgPool1d" in CASES and "test_operator_conv" in CASES
