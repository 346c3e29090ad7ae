"""ONNX's own backend test cases through graphopt (load -> O2 -> emit -> onnxruntime).

Cases onnxruntime itself fails or gets wrong on the unmodified model are skipped
as baseline failures; every other case, at every opset (graphopt converts those
before 13 on load), must give the expected outputs. The
harness is ``graphopt.onnx_conformance``; ``benchmarks/onnx_backend_pass_rate.py``
prints the pass rate.
"""
from __future__ import annotations

import pytest

from graphopt import onnx_conformance as harness

CASES = {case.name: case for case in harness.collect_cases()}
# cases graphopt refuses with a clear error because onnx's version converter gets them wrong
CONVERTER_BUGS = {"test_scan_sum": "onnx's version converter drops Scan-8's batch axis from the declared inputs"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_case(name: str) -> None:
    case = CASES[name]
    why_not = harness.baseline_failure(case)
    if why_not is not None:
        pytest.skip(f"baseline failure: {why_not}")
    reason = harness.graphopt_failure(case)
    if name in CONVERTER_BUGS:
        assert reason is not None and "cannot convert the model" in reason, reason
        pytest.xfail(CONVERTER_BUGS[name])
    assert reason is None, f"{name}: {reason}"


def test_cases_older_than_opset_13_are_counted() -> None:
    """Old opsets are not baseline failures any more: graphopt converts them on load."""
    old = [c for c in CASES.values() if c.model.opset_import and
           next((o.version for o in c.model.opset_import if o.domain in ("", "ai.onnx")), 13) < 13]
    assert len(old) > 150
    conv = CASES["test_Conv2d_groups"]  # opset 6, written by pytorch
    assert conv.model.opset_import[0].version == 6
    assert harness.baseline_failure(conv) is None and harness.graphopt_failure(conv) is None


def test_collection_covers_node_and_model_cases() -> None:
    """The suite really holds ONNX's node cases and the shipped model folders."""
    assert len(CASES) > 1500
    assert "test_single_relu_model" in CASES and "test_AvgPool1d" in CASES and "test_operator_conv" in CASES
