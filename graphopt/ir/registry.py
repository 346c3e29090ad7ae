"""The op registry: what each IR op means, how to run it, type it and cost it.

An ``OpDef`` carries the torch implementation (the reference semantics and the
eager lowering), the attribute schema derived from that implementation's
signature, the traits passes ask about (commutative, view, row op, ...), type
inference, and FLOP/byte counts for the cost models. Framework mappings (ATen
and ONNX, both directions) live in the front ends and emitters, keyed by op
name, so this floor imports no framework but torch.

Type inference defaults to running the torch implementation on meta tensors;
symbolic dimensions are stood in for by distinct sizes and mapped back.
"""
from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .types import OpaqueType, ScalarType, TensorType, Type

if TYPE_CHECKING:
    from .graph import Node


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The default of an attribute every node must set (``einsum``'s ``equation``)."""

DIM_ATTR_NAMES = frozenset({"dim", "dims", "axis", "start_dim", "end_dim"})
"""Parameter names that index a tensor's dims: their negative values are normalised on ``add_node``."""


@dataclass(frozen=True)
class AttrSpec:
    """One attribute of an op: its name, default (or ``REQUIRED``), type (as annotated) and
    whether it holds dims (one or a list) of the tensor the op's ``dim_rank`` names."""

    name: str
    default: Any = REQUIRED
    type: str = "any"
    is_dim: bool = False


def attrs_of(fn: Callable[..., Any]) -> tuple[AttrSpec, ...]:
    """The attribute schema of a torch implementation ``fn(*inputs, **attrs)``.

    Inputs are the parameters annotated as tensors and a ``*args``; every other
    parameter is an attribute, with its default and annotation. A function
    without a readable signature (a C builtin like ``torch.relu``) has none.
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    specs = []
    for p in params:
        annotation = "" if p.annotation is p.empty else str(p.annotation)
        if p.kind is p.VAR_POSITIONAL or "Tensor" in annotation or p.kind is p.VAR_KEYWORD:
            continue
        default = REQUIRED if p.default is p.empty else p.default
        kind = annotation or ("any" if default is None or default is REQUIRED else type(default).__name__)
        specs.append(AttrSpec(p.name, default, kind, p.name in DIM_ATTR_NAMES))
    return tuple(specs)


def rank_of_first_input(inputs: Sequence[Any], attrs: dict[str, Any]) -> int | None:
    """The rank dim attributes refer to for most ops: that of the first input."""
    return _rank(inputs[0]) if inputs else None


def _rank(v: Any) -> int | None:
    t = getattr(v, "type", None)
    return len(t.shape) if isinstance(t, TensorType) and t.shape is not None else None


@dataclass
class OpDef:
    """The schema of one IR op.

    ``torch_impl(*inputs, **attrs)`` returns a tensor, or a tuple for ops with
    several outputs. ``num_outputs`` may be a callable of the attrs for ops like
    ``split``. ``category`` groups ops for fusion and cost modelling
    (``elementwise``, ``reduction``, ``matmul``, ``conv``, ``norm``, ``shape``,
    ``data``, ``attention``, ``pool``, ``opaque``). ``pure`` ops may be
    deduplicated and removed when unused.

    ``attrs`` is the attribute schema, derived from ``torch_impl``'s signature
    unless given; ``Graph.add_node`` fills defaults from it, rejects unknown
    names and normalises negative dims against ``dim_rank(inputs, attrs)``.
    The remaining fields are traits: what passes, code generators and cost
    models may assume about the op, stated once here.
    """

    name: str
    torch_impl: Callable[..., Any] | None
    category: str = "elementwise"
    num_outputs: int | Callable[[dict[str, Any]], int] = 1
    infer: Callable[[Node], list[Type]] | None = None
    flops: Callable[[Node], int] | None = None
    pure: bool = True
    pure_when: Callable[[Node], bool] | None = None
    """Purity that depends on the node's attributes (dropout in inference mode); ``pure`` otherwise."""
    doc: str = ""
    state_method: str | None = None
    """Reads or writes the emitted module's state: the ``GraphState`` method an emitted call goes to."""
    torch_module: Callable[..., Any] | None = None
    """Emitted as a submodule: ``torch_module(node, emit_body, state)`` builds it, where ``emit_body(graph)``
    emits a body graph sharing the module's ``GraphState`` ``state`` (regions, step caches)."""
    attrs: tuple[AttrSpec, ...] | None = None
    dim_rank: Callable[[Sequence[Any], dict[str, Any]], int | None] = rank_of_first_input
    open_attrs: bool = False
    """Nodes may carry attributes beyond the schema (a front end's pass-through, ``torch.opaque``'s template)."""
    # ------------------------------------------------------------------ traits
    commutative: bool = False
    """Binary, and its two inputs may be swapped (``add``, ``eq``, ``maximum``)."""
    identity_element: float | None = None
    """``x op e == x`` for this ``e`` on the right (and the left, when commutative): 0 for add/sub, 1 for mul/div."""
    view: bool = False
    """Changes only how memory is indexed (torch returns a view; code generators fold it into indexing)."""
    moves_entries: bool = False
    """The result's entries are entries of the first input, moved but never computed on."""
    reads_shape_only: bool = False
    """Reads only the dtype and shape of its tensor inputs, never their data (``shape``, ``full_like``)."""
    layout_blind: bool = False
    """Pointwise and finite on zero padding: runs unchanged on a blocked or padded layout (NCHWc)."""
    row_op: bool = False
    """Reduces or normalises along one dim: a code generator gives each program a row."""
    scan: bool = False
    """A reduction that is not a plain one (a selection like ``topk``, a prefix scan like ``cumsum``)."""
    channels_last_kernel: bool = False
    """torch's kernel keeps a channels-last 4-D input channels-last."""
    channelwise: bool = False
    """Pointwise but for operands indexed by channel (dim 1) alone: inference ``batch_norm``, an affine map per channel."""
    reshapes: bool = False
    """Only the shape changes: the result holds the first input's entries in the same (row-major) order."""
    keeps_dims: bool = False
    """Each output has the first input's dims in place and acts along those its dim attributes name:
    a permute of the input passes through once those attributes are remapped (``softmax``, ``slice``)."""

    def __post_init__(self) -> None:
        if self.attrs is None:
            self.attrs = attrs_of(self.torch_impl) if self.torch_impl is not None else ()
        self._by_name = {a.name: a for a in self.attrs}

    @property
    def pointwise(self) -> bool:
        """Each output entry depends only on the input entries at the same (broadcast) index."""
        return self.category == "elementwise"

    @property
    def reduction(self) -> bool:
        return self.category == "reduction"

    @property
    def dim_attrs(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attrs if a.is_dim)

    def attr(self, name: str) -> AttrSpec:
        return self._by_name[name]

    def default(self, name: str) -> Any:
        """The schema's default for ``name`` (raises for required attributes and unknown names)."""
        value = self._by_name[name].default
        if value is REQUIRED:
            raise KeyError(f"attribute {name!r} of {self.name} has no default")
        return value

    def complete_attrs(self, inputs: Sequence[Any], attrs: dict[str, Any]) -> dict[str, Any]:
        """``attrs`` checked against the schema, defaults filled in and negative dims made positive."""
        unknown = [k for k in attrs if k not in self._by_name]
        if unknown and not self.open_attrs:
            known = ", ".join(self._by_name) or "none"
            raise ValueError(f"op {self.name} has no attribute {', '.join(map(repr, unknown))}; its attributes: {known}")
        full = dict(attrs)
        for a in self.attrs:
            if a.name not in full:
                if a.default is REQUIRED:
                    raise ValueError(f"op {self.name} needs attribute {a.name!r}")
                full[a.name] = a.default
        dims = self.dim_attrs
        if dims:
            rank = self.dim_rank(inputs, full)
            if rank:
                for name in dims:
                    full[name] = _positive_dims(full[name], rank)
        return full

    def output_count(self, attrs: dict[str, Any]) -> int:
        return self.num_outputs(attrs) if callable(self.num_outputs) else self.num_outputs


def _positive_dims(value: Any, rank: int) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value + rank if -rank <= value < 0 else value
    if isinstance(value, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        return type(value)(d + rank if -rank <= d < 0 else d for d in value)
    return value


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
    opdef = OPS.get(name)
    if opdef is not None:
        return opdef
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
