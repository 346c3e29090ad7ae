"""The op registry: what each IR op means, how to run it, type it and cost it.

An ``OpDef`` carries the torch implementation (the reference semantics and the
eager lowering), type inference, and FLOP/byte counts for the cost models.
Framework mappings (ATen and ONNX, both directions) live in the front ends and
emitters, keyed by op name, so this floor imports no framework but torch.

Type inference defaults to running the torch implementation on meta tensors;
symbolic dimensions are stood in for by distinct sizes and mapped back.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .types import OpaqueType, ScalarType, TensorType, Type

if TYPE_CHECKING:
    from .graph import Node


@dataclass
class OpDef:
    """The schema of one IR op.

    ``torch_impl(*inputs, **attrs)`` returns a tensor, or a tuple for ops with
    several outputs. ``num_outputs`` may be a callable of the attrs for ops like
    ``split``. ``category`` groups ops for fusion and cost modelling
    (``elementwise``, ``reduction``, ``matmul``, ``conv``, ``norm``, ``shape``,
    ``data``, ``attention``, ``pool``, ``opaque``). ``pure`` ops may be
    deduplicated and removed when unused.
    """

    name: str
    torch_impl: Callable[..., Any] | None
    category: str = "elementwise"
    num_outputs: int | Callable[[dict[str, Any]], int] = 1
    infer: Callable[[Node], list[Type]] | None = None
    flops: Callable[[Node], int] | None = None
    pure: bool = True
    doc: str = ""
    attrs: tuple[str, ...] = field(default_factory=tuple)

    def output_count(self, attrs: dict[str, Any]) -> int:
        return self.num_outputs(attrs) if callable(self.num_outputs) else self.num_outputs


OPS: dict[str, OpDef] = {}


def register_op(opdef: OpDef) -> OpDef:
    if opdef.name in OPS:
        raise ValueError(f"op {opdef.name!r} is already registered")
    OPS[opdef.name] = opdef
    return opdef


def op(name: str, category: str = "elementwise", **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register the decorated function as the torch implementation of ``name``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        register_op(OpDef(name, fn, category=category, doc=(fn.__doc__ or "").strip(), **kwargs))
        return fn

    return wrap


def get_op(name: str) -> OpDef:
    _load_builtin_ops()
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown IR op {name!r}; register it with graphopt.ir.register_op") from None


def _load_builtin_ops() -> None:
    if not _loaded:
        _loaded.append(True)
        from . import ops  # noqa: F401  (registers the built-in ops)


_loaded: list[bool] = []


# ------------------------------------------------------------------ inference
_SYMBOL_SIZES = itertools.count(7919, 2)  # odd, unusual sizes that stand in for symbols


def infer_types(node: Node) -> list[Type]:
    opdef = get_op(node.op)
    if opdef.infer is not None:
        return opdef.infer(node)
    return infer_by_meta(node, opdef)


def infer_by_meta(node: Node, opdef: OpDef | None = None) -> list[Type]:
    """Run the torch implementation on meta tensors to get output types.

    Symbolic sizes get stand-in numbers. With any symbol present the op runs
    twice, under two different stand-ins: an output size that differs between
    the runs depends on a symbol, and becomes that symbol or, when derived from
    one (``s0 * 4``), a fresh symbol; only sizes equal in both runs are static.
    """
    opdef = opdef or get_op(node.op)
    if opdef.torch_impl is None:
        raise TypeError(f"cannot infer through {node.op}: it has no torch implementation; pass output_types")
    first, back = _run_meta(node, opdef)
    if not back:
        return [_type_of(r, {}) for r in first]
    try:
        second, _ = _run_meta(node, opdef)
    except Exception:  # sizes the op rejects under the second stand-in: the first run is all we know
        return [_type_of(r, back) for r in first]
    types = []
    for k, (a, b) in enumerate(zip(first, second)):
        t = _type_of(a, back)
        if isinstance(t, TensorType) and isinstance(b, torch.Tensor) and b.dim() == len(t.shape):
            t = TensorType(t.dtype, tuple(
                int(sa) if int(sa) == int(sb) else d if isinstance(d, str) else f"{node.name}_{k}_{i}"
                for i, (d, sa, sb) in enumerate(zip(t.shape, a.shape, b.shape))))
        types.append(t)
    return types


def _run_meta(node: Node, opdef: OpDef) -> tuple[list, dict[int, str]]:
    """The op's results on meta tensors, and the map from each stand-in size back to its symbol."""
    stand_in: dict[str, int] = {}
    args = [_meta_arg(v, stand_in) for v in node.inputs]
    with torch.device("meta"):
        result = opdef.torch_impl(*args, **node.attrs)
    results = list(result) if isinstance(result, (tuple, list)) else [result]
    return results, {size: sym for sym, size in stand_in.items()}


def _meta_arg(v: Any, stand_in: dict[str, int]) -> Any:
    if v is None:
        return None
    t = v.type
    if isinstance(t, TensorType):
        if t.shape is None:
            raise TypeError(f"cannot infer through %{v.name}: its rank is unknown")
        shape = [d if isinstance(d, int) else stand_in.setdefault(d, next(_SYMBOL_SIZES)) for d in t.shape]
        if v.data is not None and v.data.numel() <= 64 and t.is_static:
            return v.data.to("meta")
        return torch.empty(shape, dtype=t.dtype, device="meta")
    if isinstance(t, ScalarType):
        return 1 if not t.dtype.is_floating_point else 1.0
    raise TypeError(f"cannot infer through %{v.name} of type {t}")


def _type_of(r: Any, back: dict[int, str]) -> Type:
    if isinstance(r, torch.Tensor):
        dims: list[int | str] = []
        for d in r.shape:
            d = int(d)
            dims.append(back.get(d, d) if back else d)
        return TensorType(r.dtype, tuple(dims))
    if isinstance(r, bool):
        return ScalarType(torch.bool)
    if isinstance(r, int):
        return ScalarType(torch.int64)
    if isinstance(r, float):
        return ScalarType(torch.float32)
    return OpaqueType(type(r).__name__)


# ---------------------------------------------------------------------- costs
def node_flops(node: Node) -> int:
    """Floating-point operations of one node (multiply-add counts as two); 0 when shapes are symbolic."""
    opdef = get_op(node.op)
    if opdef.flops is not None:
        try:
            return opdef.flops(node)
        except ValueError:
            return 0
    if opdef.category in ("elementwise", "reduction", "norm", "pool", "attention"):
        return sum(_numel(v) for v in (node.inputs if opdef.category != "elementwise" else node.outputs))
    return 0


def node_bytes(node: Node) -> int:
    """Bytes read and written by one node, assuming nothing stays in cache."""
    return sum(_nbytes(v) for v in (*node.inputs, *node.outputs))


def _numel(v: Any) -> int:
    if v is None or not isinstance(v.type, TensorType) or v.type.numel is None:
        return 0
    return v.type.numel


def _nbytes(v: Any) -> int:
    if v is None or not isinstance(v.type, TensorType) or v.type.nbytes is None:
        return 0
    return v.type.nbytes


def shape_of(v: Any) -> Sequence[int]:
    """Static shape of a value (raises for symbolic shapes): a helper for FLOP formulas."""
    t = v.type
    if not isinstance(t, TensorType) or not t.is_static:
        raise ValueError(f"%{v.name} has no static shape")
    return t.shape  # type: ignore[return-value]


def prod(xs: Sequence[int]) -> int:
    return math.prod(xs)
