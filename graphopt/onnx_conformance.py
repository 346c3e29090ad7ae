"""ONNX's own backend test cases through graphopt: load -> optimize -> emit -> onnxruntime.

Every node case from ``onnx.backend.test.case.node`` plus the model folders the
onnx wheel ships (``simple``, ``pytorch-converted``, ``pytorch-operator``) is
first run as is in onnxruntime; cases onnxruntime itself fails or gets wrong
are "baseline failures" and excluded. The rest, at every opset, must give the
expected outputs after the graphopt round trip (whose load converts opsets
before 13). ``tests/onnx/test_backend_cases.py`` runs the check per case;
``benchmarks/onnx_backend_pass_rate.py`` prints the pass rate.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

MODEL_FOLDERS = ("simple", "pytorch-converted", "pytorch-operator")


@dataclass
class BackendCase:
    name: str
    model: onnx.ModelProto
    data_sets: list[tuple[list[Any], list[Any]]]
    rtol: float = 1e-3
    atol: float = 1e-7


@lru_cache(maxsize=1)
def collect_cases() -> tuple[BackendCase, ...]:
    """All node cases and shipped model folders, sorted by name."""
    from onnx.backend.test.case.node import collect_testcases

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [BackendCase(c.name, c.model, [(list(i), list(o)) for i, o in c.data_sets], c.rtol, c.atol)
                 for c in collect_testcases(None)]
    data_root = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
    for folder in MODEL_FOLDERS:
        for model_dir in sorted(glob.glob(os.path.join(data_root, folder, "test_*"))):
            cases.append(_folder_case(model_dir))
    return tuple(sorted(cases, key=lambda c: c.name))


def _folder_case(model_dir: str) -> BackendCase:
    model = onnx.load(os.path.join(model_dir, "model.onnx"))
    data_sets = []
    for data_dir in sorted(glob.glob(os.path.join(model_dir, "test_data_set_*"))):
        inputs = [_read_pb(p, vi.type) for p, vi in zip(sorted(glob.glob(os.path.join(data_dir, "input_*.pb"))),
                                                          _feed_inputs(model))]
        outputs = [_read_pb(p, vi.type) for p, vi in zip(sorted(glob.glob(os.path.join(data_dir, "output_*.pb"))),
                                                           model.graph.output)]
        data_sets.append((inputs, outputs))
    return BackendCase(os.path.basename(model_dir), model, data_sets)


def _read_pb(path: str, tp: onnx.TypeProto) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    kind = tp.WhichOneof("value")
    if kind == "sequence_type":
        return [numpy_helper.to_array(t) for t in onnx.SequenceProto.FromString(data).tensor_values]
    if kind == "optional_type":
        return numpy_helper.to_optional(onnx.OptionalProto.FromString(data))
    return numpy_helper.to_array(onnx.TensorProto.FromString(data))


def _feed_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


# ------------------------------------------------------------------ running
def _as_array(x: Any) -> Any:
    if isinstance(x, onnx.TensorProto):
        return numpy_helper.to_array(x)
    if isinstance(x, list):
        return [_as_array(e) for e in x]
    return x


def run_ort(model: onnx.ModelProto, inputs: list[Any]) -> list[Any]:
    from graphopt.backends._onnxruntime import inference_session

    session = inference_session(model, threads=1, inter_op_threads=1, log_severity=4)
    names = [vi.name for vi in _feed_inputs(model)]
    return session.run(None, {n: _as_array(x) for n, x in zip(names, inputs)})


def outputs_match(expected: list[Any], actual: list[Any], rtol: float, atol: float) -> str | None:
    """None when equal within tolerance, else a one-line reason."""
    if len(expected) != len(actual):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for k, (e, a) in enumerate(zip(expected, actual)):
        e = _as_array(e)
        if isinstance(e, list) or isinstance(a, list):
            if not (isinstance(e, list) and isinstance(a, list)):
                return f"output {k}: sequence vs tensor"
            reason = outputs_match(e, a, rtol, atol)
            if reason:
                return f"output {k}: {reason}"
            continue
        if e is None or a is None:
            if e is not a:
                return f"output {k}: optional presence differs"
            continue
        e, a = np.asarray(e), np.asarray(a)
        if e.shape != a.shape:
            return f"output {k}: shape {a.shape}, expected {e.shape}"
        if e.dtype.kind in "OUS" or a.dtype.kind in "OUS":
            if not np.array_equal(e.astype(str), a.astype(str)):
                return f"output {k}: strings differ"
            continue
        if e.dtype != a.dtype and e.dtype.kind != "V":
            return f"output {k}: dtype {a.dtype}, expected {e.dtype}"
        try:
            np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol)
        except (AssertionError, TypeError, ValueError) as err:
            return f"output {k}: values differ ({str(err).strip().splitlines()[2] if str(err).count(chr(10)) > 2 else err})"
    return None


def baseline_failure(case: BackendCase) -> str | None:
    """Why onnxruntime cannot run the unmodified case, or None when it gets the expected outputs."""
    reason = _data_set_failure(case, case.model)
    return None if reason is None else f"onnxruntime {reason}"


def graphopt_failure(case: BackendCase, level: str = "O2") -> str | None:
    """Why the graphopt round trip fails the case, or None when it passes."""
    import graphopt

    try:
        graph = graphopt.load_onnx(case.model)  # opsets before 13 are converted by load_onnx itself
        graph = graphopt.optimize(graph, level)
        emitted = graph.to_onnx()
    except Exception as err:
        return f"graphopt raised {type(err).__name__}: {_first_line(err)}"
    reason = _data_set_failure(case, emitted)
    return None if reason is None else f"onnxruntime on the emitted model {reason}"


def _data_set_failure(case: BackendCase, model: onnx.ModelProto) -> str | None:
    """How onnxruntime fails the case's data sets on ``model``, or None when every output matches."""
    for inputs, expected in case.data_sets:
        try:
            actual = run_ort(model, inputs)
        except Exception as err:
            return f"fails: {_first_line(err)}"
        reason = outputs_match(expected, actual, case.rtol, case.atol)
        if reason:
            return f"disagrees: {reason}"
    return None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
