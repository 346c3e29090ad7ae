"""ONNX's own backend test cases through graphopt: the pass rate over onnxruntime's baseline.

Prints the counts and every failing case with its reason, and writes them to
``benchmarks/results/onnx_backend.md``.

    python benchmarks/onnx_backend_pass_rate.py [LEVEL]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import onnx
import onnxruntime

from graphopt.onnx_conformance import baseline_failure, collect_cases, graphopt_failure

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_backend.md"


def main(argv: list[str]) -> int:
    level = argv[1] if len(argv) > 1 else "O2"
    start = time.perf_counter()
    cases = collect_cases()
    baseline, failures = [], []
    for case in cases:
        if baseline_failure(case) is not None:
            continue
        baseline.append(case)
        reason = graphopt_failure(case, level)
        if reason:
            failures.append((case.name, reason))
    passed = len(baseline) - len(failures)
    lines = [
        f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, level {level}",
        "",
        "| cases | onnxruntime passes as is | graphopt passes | rate |",
        "|---|---|---|---|",
        f"| {len(cases)} | {len(baseline)} | {passed} | {passed / max(len(baseline), 1):.2%} |",
        "",
        f"{time.perf_counter() - start:.0f} s",
    ]
    lines += [f"- FAIL {name}: {reason}" for name, reason in failures]
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# ONNX backend test cases\n\n" + text + "\n")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
