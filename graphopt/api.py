"""The Python API: capture a model, load an ONNX file, optimize or prune a graph."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .errors import InvalidOptionError
from .ir import Graph
from .pass_manager import Instrument, Pass, PassManager, level_then_passes, pipeline


def capture(model: torch.nn.Module, example_inputs: Sequence[Any], dynamic: dict | None = None) -> Graph:
    """Capture ``model`` through torch.export (core ATen) into the IR.

    ``dynamic`` maps input positions (or names) to ``{dim: name}`` for symbolic dims.
    """
    from .frontends.torch import capture as _capture

    return _capture(model, example_inputs, dynamic=dynamic)


def load_onnx(model: Any) -> Graph:
    """Load an ONNX model (a path, bytes or a ``ModelProto``) into the IR; opsets before 13 are converted to 13
    with onnx's version converter, and an invalid model raises UnsupportedModelError naming the defect."""
    from .frontends.onnx import load_onnx as _load

    return _load(model)


def optimize(graph: Graph, level: str = "O1", passes: Sequence[str | Pass] | None = None,
             options: dict[str, dict[str, Any]] | None = None, verify: bool | None = None,
             instruments: Sequence[Instrument] = (), dump_dir: str | os.PathLike | None = None) -> Graph:
    """Run the pipeline ``level`` followed by ``passes`` (names or instances) on ``graph`` in place.

    ``options`` maps pass names to option values. ``instruments`` watch every pass
    (``graphopt.pass_manager.DumpAfter(["fuse_linear"])``, ``TimePasses()``); ``dump_dir`` receives
    the graph before and after a pass that fails verification. The run's report is left in
    ``graph.meta["report"]``.
    """
    _expect_graph(graph, "optimize")
    pipeline(level)  # an unknown level is named as one, not as an unknown pass
    if isinstance(passes, str) or not isinstance(passes, (Sequence, type(None))):
        raise InvalidOptionError(f"passes must be a list of pass names or Pass instances, got {passes!r}")
    manager = PassManager(level_then_passes(level, passes or []), options=options, verify=verify, instruments=instruments,
                          dump_dir=dump_dir)
    result = manager.run(graph)
    result.graph.meta["report"] = manager.report
    return result.graph


def _expect_graph(graph: Any, function: str) -> None:
    """Name the step that turns what the user passed into a graph."""
    if isinstance(graph, Graph):
        return
    if isinstance(graph, torch.nn.Module):
        how = ("capture it first, graphopt.capture(model, example_inputs), or compile it with "
               "torch.compile(model, backend=\"graphopt\")")
    else:
        how = ("capture a module with graphopt.capture(model, example_inputs) "
               "or load an ONNX model with graphopt.load_onnx(path)")
    raise InvalidOptionError(f"{function} takes a graphopt Graph, got {type(graph).__name__}; {how}")


def check_options(options: Mapping[str, Any] | None) -> None:
    """Check ``torch.compile(model, backend="graphopt", options=...)`` options now.

    torch.compile hands options to the backend only at the compiled model's first call, so a
    mistake surfaces there; this raises the same ``InvalidOptionError`` (a ``ValueError``) at once.
    """
    from .compile_backend import BackendOptions

    BackendOptions.parse(options)


def prune(model_or_graph: torch.nn.Module | Graph, example_inputs: Sequence[Any] | None = None,
          ratio: float | Mapping[str, float] = 0.5, importance: str = "l2", round_to: int | None = None,
          ignored: Sequence[str] = (), target: Mapping[str, float] | None = None, heads: str = "heads",
          seed: int = 0, *, ranking: str = "layer", normalize: str = "mean",
          loss_fn: Callable[[Any], torch.Tensor] | None = None) -> torch.fx.GraphModule | Graph:
    """Structurally prune channels (DepGraph groups) so the model really gets smaller.

    A module is captured, cleaned up with ``O1``, pruned and returned as a fine-tunable
    ``GraphModule`` with its own, trainable parameters; a ``Graph`` is pruned in place and returned. ``ratio`` is the share of
    each group's channels to remove (``ranking="global"``: of all channels), or a dict of
    group labels/globs to ratios; ``target`` (``{"macs": N}``, ``{"params": N}`` or
    ``{"latency_ms": T}`` measured in torch, ``{"onnxruntime_latency_ms": T}`` in onnxruntime) searches
    the ratio instead, and a latency target also the channel alignment. ``importance`` is ``l1``, ``l2``,
    ``taylor`` (gradients on ``example_inputs``; loss ``loss_fn`` or the sum of squared
    outputs) or ``random`` (seeded). ``round_to`` keeps channel counts multiples of N,
    ``ignored`` names layers to keep whole, ``heads`` is ``"heads"`` or ``"head_dim"``.
    The plan applied is left in the graph's ``meta["pruning_plan"]``.
    """
    from graphopt.passes.pruning.plan import check_options, prune_graph

    check_options(ratio=ratio, importance=importance, round_to=round_to, target=target, heads=heads,
                  ranking=ranking, normalize=normalize, example_inputs=example_inputs)
    options = dict(ratio=ratio, importance=importance, round_to=round_to, ignored=ignored, target=target,
                   heads=heads, seed=seed, ranking=ranking, normalize=normalize, loss_fn=loss_fn)
    if isinstance(model_or_graph, Graph):
        prune_graph(model_or_graph, example_inputs, **options)
        return model_or_graph
    if not isinstance(model_or_graph, torch.nn.Module):
        raise InvalidOptionError(f"prune takes an nn.Module or a graphopt Graph, got {type(model_or_graph).__name__}")
    if example_inputs is None:
        raise InvalidOptionError("pruning a module captures it first: pass example_inputs")
    graph = optimize(capture(model_or_graph, example_inputs), "O1")
    prune_graph(graph, example_inputs, **options)
    for v in graph.constants.values():  # the module owns its tensors: fine-tuning it leaves the model alone
        v.data = v.data.detach().clone()
    return graph.to_torch()


def explain(model_or_graph: torch.nn.Module | Graph, example_inputs: Sequence[Any] | None = None,
            level: str = "O2", **lowering: Any) -> list[Any]:
    """Decide, per region, which backend runs it, and say why: the decisions ``lower_regions`` makes.

    A module is captured (``example_inputs`` fix the shapes); a graph is copied, never changed.
    ``level`` is the pipeline run first; ``lowering`` holds ``lower_regions`` options (``backends``,
    ``cost_model``, ``force``, ``forbid``, ``expected_calls``, ...). Returns the ``Decision``s;
    ``graphopt.backends.explain.explain_table`` prints them.
    """
    from graphopt.backends.lower import LowerRegions

    if isinstance(model_or_graph, Graph):
        graph = model_or_graph.clone()
    elif isinstance(model_or_graph, torch.nn.Module):
        if example_inputs is None:
            raise InvalidOptionError("explaining a module captures it first: pass example_inputs")
        graph = capture(model_or_graph, example_inputs)
    else:
        raise InvalidOptionError(f"explain takes an nn.Module or a graphopt Graph, got {type(model_or_graph).__name__}")
    try:
        lower = LowerRegions(**lowering)
    except TypeError as e:
        raise InvalidOptionError(f"{e}; lower_regions options: {', '.join(LowerRegions.option_names())}") from None
    except ValueError as e:
        raise InvalidOptionError(str(e)) from None
    graph = optimize(graph, level)
    lower(graph)
    return list(graph.meta.get("lowering", []))
