"""Backends: where lowered regions run (torch eager, inductor, onnxruntime, TVM, Triton).

Each backend module registers itself on import; ``load_builtin_backends``
imports them all. Importing a backend module never imports its library
(tvm, triton, onnxruntime): that happens when a region is compiled.
"""
from __future__ import annotations


def load_builtin_backends() -> None:
    from . import onnxruntime, torch, triton, tvm  # noqa: F401  (register themselves)
