"""ONNX's own backend test cases through graphopt (load -> O1 -> emit -> onnxruntime).

Cases onnxruntime itself fails or gets wrong on the unmodified model are skipped
as baseline failures; every other case must give the expected outputs. The
harness lives in ``benchmarks/onnx_backend_pass_rate.py``, which also prints the
pass rate as a script.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_HARNESS_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "onnx_backend_pass_rate.py"


def _load_harness():
    spec = importlib.util.spec_from_file_location("onnx_backend_pass_rate", _HARNESS_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


harness = _load_harness()
CASES = {case.name: case for case in harness.collect_cases()}

# Cases graphopt cannot pass, with the reason (empty: every baseline-passing case passes).
XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_case(name: str) -> None:
    case = CASES[name]
    why_not = harness.baseline_failure(case)
    if why_not is not None:
        pytest.skip(f"baseline failure: {why_not}")
    if name in XFAIL:
        pytest.xfail(XFAIL[name])
    reason = harness.graphopt_failure(case)
    assert reason is None, f"{name}: {reason}"


def test_collection_covers_node_and_model_cases() -> None:
    """The suite really holds ONNX's node cases and the shipped model folders."""
    assert len(CASES) > 1500
    assert "test_single_relu_model" in CASES and "test_AvgPool1d" in CASES and "test_operator_conv" in CASES
