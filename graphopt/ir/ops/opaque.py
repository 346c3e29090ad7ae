"""``torch.opaque``: a torch call the registry does not model, carried as is.

The node keeps the original callable (an ATen overload, a Python function) and an
argument template in which ``Arg(i)`` stands for the node's i-th input, so any
torch op survives capture, passes and emission unchanged. Passes treat it as a
black box: not pure (never deduplicated or folded), never fused; but a call
whose results are all host scalars (a size query, SymInt arithmetic) is pure,
so it may be recomputed where its value is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..registry import OpDef, register_op


@dataclass(frozen=True)
class Arg:
    """Placeholder for input ``index`` of an opaque node inside its argument template."""

    index: int


def fill(template: Any, inputs: tuple[Any, ...]) -> Any:
    if isinstance(template, Arg):
        return inputs[template.index]
    if isinstance(template, (list, tuple)):
        return type(template)(fill(t, inputs) for t in template)
    if isinstance(template, dict):
        return {k: fill(t, inputs) for k, t in template.items()}
    return template


def torch_opaque(*inputs: Any, target: Any, args: tuple = (), kwargs: dict | None = None,
                 num_outputs: int = 1) -> Any:
    """Call ``target`` with the template filled in; several outputs come back as a tuple."""
    result = target(*fill(args, inputs), **fill(kwargs or {}, inputs))
    if num_outputs != 1 and not isinstance(result, (tuple, list)):
        raise TypeError(f"{target} returned one value, the node expects {num_outputs}")
    return tuple(result) if num_outputs != 1 else result


register_op(OpDef("torch.opaque", torch_opaque, category="opaque", pure=False, pure_when=lambda node: node.yields_host_scalars,
                  num_outputs=lambda attrs: attrs.get("num_outputs", 1), doc=torch_opaque.__doc__))


def kernel_call(*inputs: Any, kernel: Any, num_outputs: int = 1) -> Any:
    """Call a compiled kernel (a lowered region) that returns a tuple; one result comes back bare."""
    results = tuple(kernel(*inputs))
    if len(results) != num_outputs:
        raise TypeError(f"kernel {kernel} returned {len(results)} results, the node expects {num_outputs}")
    return results if num_outputs != 1 else results[0]


register_op(OpDef("kernel_call", kernel_call, category="opaque", pure=False,
                  num_outputs=lambda attrs: attrs.get("num_outputs", 1), doc=kernel_call.__doc__))
