"""A readable text form of a graph, one line per node (what ``print(graph)`` shows)."""
from __future__ import annotations

from typing import Any

import torch

from .graph import Graph, Node


def format_graph(graph: Graph, max_constants: int = 20) -> str:
    """The graph as text; a region's body follows its node, indented."""
    lines = [f"graph {graph.name}("]
    lines += [f"    %{v.name}: {v.type}," for v in graph.inputs]
    lines.append(") {")
    consts = list(graph.constants.values())
    for v in consts[:max_constants]:
        kind = "param" if v.is_parameter else "const"
        lines.append(f"  %{v.name}: {v.type} = {kind}")
    if len(consts) > max_constants:
        lines.append(f"  ... {len(consts) - max_constants} more constants")
    for n in graph:
        lines.append("  " + format_node(n))
        if isinstance(n.attrs.get("body"), Graph):
            lines += ["    " + line for line in format_graph(n.attrs["body"], max_constants).splitlines()]
    lines.append("  return " + ", ".join(f"%{v.name}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)


def format_node(node: Node) -> str:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    ins = ", ".join("None" if v is None else f"%{v.name}" for v in node.inputs)
    attrs = ", ".join(f"{k}={_format_attr(a)}" for k, a in node.attrs.items())
    body = f"{node.op}({ins}" + (f"; {attrs}" if attrs else "") + ")"
    return f"{outs} = {body}" if outs else body


def _format_attr(a: Any) -> str:
    if isinstance(a, torch.Tensor):
        return f"tensor<{str(a.dtype).removeprefix('torch.')}{list(a.shape)}>"
    if isinstance(a, torch.dtype):
        return str(a).removeprefix("torch.")
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_format_attr(x) for x in a) + "]"
    if isinstance(a, Graph):
        return f"<body {a.name}: {len(a)} nodes>"
    if hasattr(a, "SerializeToString"):  # a protobuf (an opaque ONNX node)
        return f"<{type(a).__name__}>"
    text = repr(a) if isinstance(a, str) else str(a)
    return text if len(text) <= 60 else text[:57] + "..."
