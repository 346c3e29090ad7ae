"""The Python API: capture a model, load an ONNX file, optimize a graph."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .ir import Graph
from .pass_manager import Pass, PassManager


def capture(model: torch.nn.Module, example_inputs: Sequence[Any], dynamic: dict | None = None) -> Graph:
    """Capture ``model`` through torch.export (core ATen) into the IR.

    ``dynamic`` maps input positions (or names) to ``{dim: name}`` for symbolic dims.
    """
    from .frontends.torch import capture as _capture

    return _capture(model, tuple(example_inputs), dynamic=dynamic)


def load_onnx(model: Any) -> Graph:
    """Load an ONNX model (a path, bytes or a ``ModelProto``; opset 13 and up) into the IR."""
    from .frontends.onnx import load_onnx as _load

    return _load(model)


def optimize(graph: Graph, level: str = "O1", passes: Sequence[str | Pass] | None = None,
             options: dict[str, dict[str, Any]] | None = None, verify: bool | None = None) -> Graph:
    """Run the pipeline ``level`` followed by ``passes`` (names or instances) on ``graph`` in place.

    ``options`` maps pass names to option values. The run's report is left in
    ``graph.meta["report"]``.
    """
    manager = PassManager([level, *(passes or [])], options=options, verify=verify)
    result = manager.run(graph)
    result.graph.meta["report"] = manager.report
    return result.graph
