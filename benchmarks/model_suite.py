"""The real-model suite as a table: every zoo model through capture → a pipeline (O2) → each path.

For each model: IR nodes after capture and after the pipeline, opaque nodes left, and per
path (``to_torch``, ``to_onnx`` in onnxruntime, ``torch.compile(backend="graphopt")``)
the largest relative error against eager, or the reason it failed. Prints the
table and writes it to ``benchmarks/results/model_suite.md``.

    python benchmarks/model_suite.py [--level O2] [--family timm] [--models a,b]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import graphopt
from graphopt.models import MODEL_CASES
from graphopt.testing import PATHS, run_path

RESULTS = Path(__file__).resolve().parent / "results" / "model_suite.md"


def run_model(name: str, level: str) -> list[str]:
    model, inputs = MODEL_CASES[name].build()
    with torch.no_grad():
        reference = model(*inputs)
        start = time.perf_counter()
        graph = graphopt.capture(model, inputs)
        before = len(graph)
        graph = graphopt.optimize(graph, level)
        seconds = time.perf_counter() - start
        fired = ", ".join(graph.meta["report"].fired)
        cells = [name, str(before), str(len(graph)), str(len(graph.find("torch.opaque"))), f"{seconds:.1f}", fired]
        for path in PATHS:
            result = run_path(path, model, inputs, reference, graph=graph, level=level)
            cells.append(f"ok ({result.error:.1e})" if result.ok else f"FAIL: {result.reason}")
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", default="O2", help="pipeline (default O2)")
    parser.add_argument("--family", help="only models of this family (torchvision, timm, transformers, diffusers)")
    parser.add_argument("--models", help="comma-separated model names")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else [
        n for n, c in MODEL_CASES.items() if args.family in (None, c.family)]
    header = ["model", "nodes", f"after {args.level}", "opaque", f"capture+{args.level} s", "passes fired", *PATHS]
    rows = [run_model(n, args.level) for n in names]
    passed = sum(all(c.startswith("ok") for c in r[6:]) for r in rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    summary = f"{passed} of {len(rows)} models pass every path (max relative error ≤ 1e-4)."
    text = "\n".join(lines + ["", summary])
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(f"# Real-model suite, {args.level} (torch {torch.__version__})\n\n{text}\n")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
