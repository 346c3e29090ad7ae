"""ONNX's own backend test cases through graphopt: the pass rate over onnxruntime's baseline, at every opset.

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
    failed = {name for name, _ in failures}
    lines = [
        f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, level {level}; graphopt converts "
        f"models before opset 13 on load",
        "",
        "| opsets | cases | onnxruntime passes as is | graphopt passes | rate |",
        "|---|---|---|---|---|",
    ]
    for label, keep in (("all", lambda v: True), ("before 13 (converted)", lambda v: v < 13),
                        ("13 and up", lambda v: v >= 13)):
        some = [c for c in cases if keep(_opset(c))]
        base = [c for c in baseline if keep(_opset(c))]
        passed = sum(c.name not in failed for c in base)
        lines.append(f"| {label} | {len(some)} | {len(base)} | {passed} | {passed / max(len(base), 1):.2%} |")
    lines += [
        "",
        f"{time.perf_counter() - start:.0f} s",
    ]
    lines += [f"- FAIL {name}: {reason}" for name, reason in failures]
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# ONNX backend test cases\n\n" + text + "\n")
    return 0 if not failures else 1


def _opset(case) -> int:
    """The default-domain opset of a case; a model of other domains only counts as current."""
    return next((o.version for o in case.model.opset_import if o.domain in ("", "ai.onnx")), 13)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
