"""One pipeline per ONNX target: what ``--target`` adds after the optimisation level.

``onnx`` needs nothing; ``onnxruntime`` rewrites into onnxruntime's contrib ops
(``onnxruntime_contrib``); ``onnxruntime-cpu`` first runs the conv regions that
pay for it in this CPU's NCHWc layout (``onnxruntime_nchwc``), then the contrib
ops tuned for the CPU kernels. The emitter then writes what the IR holds.
"""
from __future__ import annotations

from typing import Any

from graphopt.ir import Graph
from graphopt.pass_manager import PassManager, Report, get_pass, register_pipeline

from . import onnxruntime_contrib, onnxruntime_nchwc  # noqa: F401  (register the passes named below)

TARGET_PIPELINES = {
    "onnx": [],
    "onnxruntime": ["fuse_onnxruntime_contrib"],
    "onnxruntime-cpu": ["plan_nchwc_regions", "fuse_onnxruntime_cpu_contrib"],
}
for _target, _passes in TARGET_PIPELINES.items():
    register_pipeline(f"target:{_target}", _passes)


def optimize_for_target(graph: Graph, target: str, opset: int | None = None,
                        options: dict[str, dict[str, Any]] | None = None, verify: bool | None = None) -> Graph:
    """A copy of ``graph`` rewritten for ``target`` (``graph`` itself for plain ONNX).

    ``opset``: the ONNX opset it will be emitted at, for every pass of the pipeline with an ``opset`` option;
    ``options``: other pass options (``{"plan_nchwc_regions": {"block": 16}}``). The report in
    ``graph.meta["report"]`` goes on with the target's passes.
    """
    if target not in TARGET_PIPELINES:
        raise ValueError(f"unknown target {target!r}: choose one of {', '.join(TARGET_PIPELINES)}")
    names = TARGET_PIPELINES[target]
    if not names:
        return graph
    options = {name: dict(values) for name, values in (options or {}).items()}
    for name in names:
        if opset and "opset" in get_pass(name).option_names():
            options.setdefault(name, {})["opset"] = opset
    manager = PassManager([f"target:{target}"], options=options, fixed_point=False, verify=verify)
    result = manager.run(graph.clone())
    earlier = graph.meta.get("report")
    result.graph.meta["report"] = Report([*(earlier.records if earlier is not None else []),
                                          *manager.report.records])
    return result.graph
