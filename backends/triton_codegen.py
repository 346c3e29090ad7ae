"""Triton source for one fusion group: the kernel's text, its arguments in order, and how to launch it.

Pure code generation, no Triton import (``_triton`` turns the text into a kernel). The
input is a fusion group's standalone graph (``region.extract``); the kernel's shape follows
from its ops:

- **epilogue**: a matmul, linear or gemm (the left operand's leading dims flattened into
  rows, the right operand 2-D) as a tiled ``tl.dot`` loop with fp32 accumulation; the
  group's pointwise consumers (bias, activation, residual, per-channel scale) finish the
  tile in registers before its one store;
- **reduction**: one program per row, the whole last dim in registers, for softmax,
  log_softmax, layer and RMS norm, and sum, mean, amax, amin, var over the last dim, with the
  group's pointwise producers and consumers computed in the same pass;
- **elementwise**: a 1-D grid over the group's broadcast shape, ``BLOCK`` elements per program.

Shapes are static, so every index is affine arithmetic on constants worked out here:
each value is *placed* on the kernel's iteration domain (which domain axis each of its
axes runs along), broadcasting included, and read through contiguous strides. Floating
values are computed in fp32 and rounded once, on store. Whatever falls outside this raises
``Unsupported``, and the backend runs the group's ops in torch instead.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from graphopt.ir import Graph, Node, TensorType, Value


class Unsupported(Exception):
    """A group this code generator cannot lower; the caller runs its ops in torch instead."""


@dataclass(frozen=True)
class LaunchConfig:
    """One way to launch a kernel: its grid, its ``tl.constexpr`` block sizes and its launch options."""

    grid: tuple[int, ...]
    constants: Mapping[str, int]
    options: Mapping[str, int]
    """``num_warps``, and ``num_stages`` for the pipelined matmul loop."""


@dataclass(frozen=True)
class KernelSource:
    """A generated kernel. Arguments: ``inputs`` (names of the group graph's inputs and tensor
    constants, read through pointers), then one pointer per ``graph.outputs``, then the constants
    of a ``LaunchConfig``; the backend picks among ``configs`` (several only for matmuls)."""

    name: str
    kind: str
    text: str
    inputs: tuple[str, ...]
    arg_types: tuple[str, ...]
    """Triton's pointer type of every tensor argument (``"*fp32"``), inputs then outputs."""
    configs: tuple[LaunchConfig, ...]


Axes = tuple[int | None, ...]
"""Where a value lies on the iteration domain: per axis of the value, the domain axis it runs along,
or None where it does not vary (an axis of size 1, broadcast)."""

MAX_ROW = 16384
"""Widest row the reduction kernel holds in registers; wider rows would need a loop over chunks."""

ANCHORS = frozenset({"matmul", "linear", "gemm"})
ROW_OPS = frozenset({"softmax", "log_softmax", "layer_norm", "rms_norm", "sum", "mean", "amax", "amin", "var"})
"""The row ops (``OpDef.row_op``) the row kernel has code for."""

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.bool: "*i1"}
_ROUNDED = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}


def generate(graph: Graph, matmul_tiles: Sequence[Mapping[str, int]]) -> KernelSource:
    """The kernel computing ``graph`` (one fusion group): its kind follows from its ops.

    ``matmul_tiles`` are the candidate tiles of an epilogue kernel (``BLOCK_M``, ``BLOCK_N``,
    ``BLOCK_K`` and launch options), shrunk to the problem and deduplicated.
    """
    if not graph.outputs:
        raise Unsupported("the group has no outputs")
    for v in graph.values():
        if not (v.is_constant and v.data.numel() == 1):  # type: ignore[union-attr]  (those become literals)
            _check_tensor(v)
    ops = {n.op for n in graph.nodes}
    if unknown := ops - lowered_ops():
        raise Unsupported(f"no Triton lowering for {', '.join(sorted(unknown))}")
    if ops & ANCHORS:
        writer: _Writer = _EpilogueWriter(graph, matmul_tiles)
    elif any(n.opdef.row_op for n in graph.nodes):
        writer = _RowWriter(graph)
    else:
        writer = _ElementwiseWriter(graph)
    return writer.write()


def lowered_ops() -> frozenset[str]:
    """The ops a kernel can hold: pointwise ones, row reductions and norms, matmul anchors, inference batch norm."""
    return frozenset(POINTWISE) | ROW_OPS | ANCHORS | {"batch_norm"}


NOT_LOWERED: dict[str, str] = {
    **dict.fromkeys(["conv", "avg_pool", "max_pool", "adaptive_avg_pool", "interpolate", "sdpa", "einsum",
                     "group_norm"], "left to torch's own kernel (cuDNN, flash attention)"),
    **dict.fromkeys(["reshape", "permute", "expand", "broadcast_to", "flatten", "squeeze", "unsqueeze", "slice",
                     "select", "split", "concat", "stack", "pad", "repeat", "flip", "roll", "contiguous", "tril",
                     "triu", "gather", "index", "index_select", "take", "embedding"],
                    "moves entries: no indexing lowering, so torch runs it between kernels"),
    **dict.fromkeys(["arange", "full", "full_like", "shape"], "makes a tensor from sizes: nothing to fuse"),
    **dict.fromkeys(["all", "any", "argmax", "argmin", "cumsum", "prod", "topk"],
                    "a reduction or scan the row kernel does not write"),
    **dict.fromkeys(["acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "cosh", "sinh", "tan", "celu",
                     "mish", "selu", "sign", "round", "fmod", "remainder", "isinf", "logical_xor", "bitwise_and",
                     "bitwise_or", "bitwise_xor", "bitwise_not"],
                    "pointwise, but no Triton expression written for it yet: its group runs in torch"),
}
"""Canonical ops no kernel holds, and why (the registry coverage test reads this)."""


def _check_tensor(v: Value) -> None:
    t = v.type
    if not isinstance(t, TensorType) or not t.is_static:
        raise Unsupported(f"%{v.name} is not a tensor of static shape ({t})")
    if t.dtype not in _POINTER_TYPES:
        raise Unsupported(f"%{v.name} is {t.dtype}; kernels compute on fp32/fp16/bf16 and bool")
    if t.numel >= 2**31:
        raise Unsupported(f"%{v.name} has {t.numel} elements: int32 indices would overflow")


def _shape(v: Value) -> tuple[int, ...]:
    return v.type.shape  # type: ignore[union-attr, return-value]


def _strides(shape: Sequence[int]) -> list[int]:
    return [math.prod(shape[k + 1:]) for k in range(len(shape))]


def _scaled(index: str, stride: int) -> str:
    return index if stride == 1 else f"{index} * {stride}"


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _literal(t: torch.Tensor) -> str:
    """A one-element constant as Triton source."""
    x = t.reshape(()).item()
    if isinstance(x, bool):
        return repr(x)
    x = float(x)
    if math.isnan(x):
        return 'float("nan")'
    if math.isinf(x):
        return 'float("inf")' if x > 0 else '-float("inf")'
    return repr(x)


# -------------------------------------------------------------- pointwise ops
def _tanh(x: str) -> str:
    return f"(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)"


def _gelu(x: str, approximate: str = "none") -> str:
    if approximate == "tanh":
        return f"0.5 * {x} * (1.0 + {_tanh(f'0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})')})"
    return f"0.5 * {x} * (1.0 + tl.math.erf({x} * 0.7071067811865476))"


def _pow(x: str, e: str) -> str:
    """Powers by a literal exponent: small integers as products, halves as (reciprocal) square roots."""
    try:
        exponent = float(e)
    except ValueError:
        raise Unsupported("pow needs a constant exponent") from None
    if exponent == 0.5:
        return f"tl.sqrt({x})"
    if exponent == -0.5:
        return f"tl.rsqrt({x})"
    if exponent.is_integer() and 1 <= abs(exponent) <= 4:
        product = " * ".join([x] * int(abs(exponent)))
        return f"({product})" if exponent > 0 else f"1.0 / ({product})"
    raise Unsupported(f"pow by {exponent}")


def _div(a: str, b: str, rounding_mode: str | None = None) -> str:
    if rounding_mode is None:
        return f"{a} / {b}"
    if rounding_mode == "floor":
        return f"tl.floor({a} / {b})"
    raise Unsupported(f"div with rounding_mode={rounding_mode!r}")


def _cast(x: str, dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return f"tl.cast({x}, tl.float32)"
    if dtype in _ROUNDED:
        return f"tl.cast(tl.cast({x}, {_ROUNDED[dtype]}), tl.float32)"
    if dtype == torch.bool:
        return f"({x} != 0)"
    raise Unsupported(f"cast to {dtype}")


def _clamp(x: str, min: float | None = None, max: float | None = None) -> str:  # noqa: A002
    if min is not None:
        x = f"tl.maximum({x}, {float(min)!r})"
    if max is not None:
        x = f"tl.minimum({x}, {float(max)!r})"
    return x


def _dropout(x: str, p: float = 0.5, training: bool = False) -> str:
    if training:
        raise Unsupported("dropout in training mode")
    return x


_NAN = "propagate_nan=tl.PropagateNan.ALL"

POINTWISE: dict[str, Callable[..., str]] = {
    "add": lambda a, b: f"{a} + {b}",
    "sub": lambda a, b: f"{a} - {b}",
    "mul": lambda a, b: f"{a} * {b}",
    "div": _div,
    "pow": _pow,
    "maximum": lambda a, b: f"tl.maximum({a}, {b}, {_NAN})",
    "minimum": lambda a, b: f"tl.minimum({a}, {b}, {_NAN})",
    "neg": lambda x: f"-{x}",
    "abs": lambda x: f"tl.abs({x})",
    "reciprocal": lambda x: f"1.0 / {x}",
    "relu": lambda x: f"tl.maximum({x}, 0.0, {_NAN})",
    "sigmoid": lambda x: f"tl.sigmoid({x})",
    "tanh": _tanh,
    "exp": lambda x: f"tl.exp({x})",
    "log": lambda x: f"tl.log({x})",
    "sqrt": lambda x: f"tl.sqrt({x})",
    "rsqrt": lambda x: f"tl.rsqrt({x})",
    "erf": lambda x: f"tl.math.erf({x})",
    "sin": lambda x: f"tl.sin({x})",
    "cos": lambda x: f"tl.cos({x})",
    "floor": lambda x: f"tl.floor({x})",
    "ceil": lambda x: f"tl.ceil({x})",
    "silu": lambda x: f"{x} * tl.sigmoid({x})",
    "gelu": _gelu,
    "hardswish": lambda x: f"{x} * tl.minimum(tl.maximum({x} + 3.0, 0.0), 6.0) / 6.0",
    "hardsigmoid": lambda x, alpha=1 / 6, beta=0.5: f"tl.minimum(tl.maximum({x} * {alpha!r} + {beta!r}, 0.0), 1.0)",
    "leaky_relu": lambda x, negative_slope=0.01: f"tl.where({x} > 0.0, {x}, {x} * {negative_slope!r})",
    "elu": lambda x, alpha=1.0: f"tl.where({x} > 0.0, {x}, {alpha!r} * (tl.exp({x}) - 1.0))",
    "softplus": lambda x, beta=1.0, threshold=20.0:
        f"tl.where({x} * {beta!r} > {threshold!r}, {x}, tl.log(1.0 + tl.exp({x} * {beta!r})) / {beta!r})",
    "clamp": _clamp,
    "where": lambda c, a, b: f"tl.where({c}, {a}, {b})",
    "eq": lambda a, b: f"{a} == {b}",
    "ne": lambda a, b: f"{a} != {b}",
    "lt": lambda a, b: f"{a} < {b}",
    "le": lambda a, b: f"{a} <= {b}",
    "gt": lambda a, b: f"{a} > {b}",
    "ge": lambda a, b: f"{a} >= {b}",
    "logical_and": lambda a, b: f"{a} & {b}",
    "logical_or": lambda a, b: f"{a} | {b}",
    "logical_not": lambda x: f"{x} == 0",
    "isnan": lambda x: f"{x} != {x}",
    "cast": _cast,
    "identity": lambda x: x,
    "dropout": _dropout,
}
"""IR op -> Triton expression of its operands (variable names or literals) and attributes."""


# ------------------------------------------------------------------ writers
class _Writer:
    """What every kernel shares: arguments, placement of values on the domain, loads, pointwise ops, stores.

    A subclass fixes the iteration domain and how a program names its coordinates
    (``coordinate``, ``linear``, ``mask``), writes its prologue, and lowers the ops
    that are not pointwise.
    """

    kind = ""

    def __init__(self, graph: Graph, domain: tuple[int, ...]):
        self.graph = graph
        self.domain = domain
        self.lines: list[str] = []
        self.pointers: dict[int, str] = {}
        self.arguments: list[Value] = []
        self.expr: dict[int, str] = {}
        self.axes: dict[int, Axes] = {}
        self.loads: dict[tuple[int, Axes], str] = {}
        self.names = itertools.count()

    # Coordinates of the program's elements; subclasses.
    def coordinate(self, axis: int) -> str:
        raise NotImplementedError

    def linear(self) -> str:
        """Index of the program's elements in a contiguous tensor of the domain's shape."""
        raise NotImplementedError

    def mask(self, axes: Axes) -> str | None:
        """Mask of the program's elements when touching a value placed on ``axes``."""
        raise NotImplementedError

    def signature(self) -> tuple[tuple[str, ...], tuple[LaunchConfig, ...]]:
        """``tl.constexpr`` parameter names and the launch configurations."""
        raise NotImplementedError

    def lower(self, node: Node) -> None:
        """Emit a node that is not pointwise."""
        raise Unsupported(f"no Triton lowering for {node.op} in a {self.kind} kernel")

    # ----------------------------------------------------------------- emit
    def write(self) -> KernelSource:
        self.prologue()
        labels: dict[int, str] = {}  # per-kernel value labels: identical layers get identical text

        def label(v: Value | None) -> str:
            return "None" if v is None else labels.setdefault(id(v), f"%{len(labels)}")

        for node in self.graph.nodes:
            operands = ", ".join(label(v) for v in node.inputs)
            self.lines.append(f"# {label(node.outputs[0])} = {node.op}({operands})")
            if node.op == "batch_norm":
                self.batch_norm(node)
            elif node.op in POINTWISE:
                self.pointwise(node)
            else:
                self.lower(node)
        outputs = [f"out{k}" for k in range(len(self.graph.outputs))]
        for param, v in zip(outputs, self.graph.outputs):
            self.store(param, v)
        constexprs, configs = self.signature()
        ops = "_".join(dict.fromkeys(n.op for n in self.graph.nodes))
        name = f"{self.kind}_{ops}"[:60]
        params = [*self.pointers.values(), *outputs, *(f"{c}: tl.constexpr" for c in constexprs)]
        text = "\n".join(["import triton", "import triton.language as tl", "", "",
                          "@triton.jit", f"def {name}({', '.join(params)}):",
                          *(f"    {line}" for line in self.lines), ""])
        types = tuple(_POINTER_TYPES[v.type.dtype] for v in (*self.arguments, *self.graph.outputs))
        return KernelSource(name, self.kind, text, tuple(v.name for v in self.arguments), types, configs)

    def prologue(self) -> None:
        raise NotImplementedError

    def let(self, expr: str) -> str:
        name = f"v{next(self.names)}"
        self.lines.append(f"{name} = {expr}")
        return name

    def define(self, v: Value, expr: str, axes: Axes) -> None:
        self.expr[id(v)] = self.let(expr)
        self.axes[id(v)] = axes

    # --------------------------------------------------------------- values
    def operand(self, v: Value, axes: Axes | None = None) -> tuple[str, Axes]:
        """The expression of ``v`` and its placement: computed in the kernel, a literal, or loaded.

        A value from outside lies right-aligned on the domain, as broadcasting puts it,
        unless ``axes`` places it otherwise (batch norm's per-channel vectors).
        """
        if id(v) in self.expr:
            return self.expr[id(v)], self.axes[id(v)]
        if v.is_constant and v.data.numel() == 1:  # type: ignore[union-attr]
            return _literal(v.data), (None,) * len(_shape(v))  # type: ignore[arg-type]
        axes = self.right_aligned(_shape(v)) if axes is None else axes
        key = (id(v), axes)
        if key not in self.loads:
            pointer = self.pointer(v)
            index = self.index(_shape(v), axes)
            address = pointer if index is None else f"{pointer} + {index}"
            mask = None if index is None else self.mask(axes)
            load = f"tl.load({address})" if mask is None else f"tl.load({address}, mask={mask})"
            if v.type.dtype in _ROUNDED:  # type: ignore[union-attr]
                load += ".to(tl.float32)"
            self.loads[key] = self.let(load)
        return self.loads[key], axes

    def pointer(self, v: Value) -> str:
        if id(v) not in self.pointers:
            self.pointers[id(v)] = f"in{len(self.pointers)}"
            self.arguments.append(v)
        return self.pointers[id(v)]

    def right_aligned(self, shape: Sequence[int]) -> Axes:
        offset = len(self.domain) - len(shape)
        if offset < 0:
            raise Unsupported(f"a value of shape {list(shape)} has more axes than the domain {list(self.domain)}")
        axes: list[int | None] = []
        for k, size in enumerate(shape):
            if size != 1 and size != self.domain[offset + k]:
                raise Unsupported(f"shape {list(shape)} does not broadcast to the domain {list(self.domain)}")
            axes.append(None if size == 1 else offset + k)
        return tuple(axes)

    def index(self, shape: Sequence[int], axes: Axes) -> str | None:
        """Offset of the program's elements in a contiguous tensor of ``shape`` placed on ``axes``."""
        if tuple(shape) == self.domain and axes == tuple(range(len(self.domain))):
            return self.linear()
        terms = [_scaled(self.coordinate(axis), stride) for axis, stride in zip(axes, _strides(shape))
                 if axis is not None]
        return " + ".join(terms) or None

    def store(self, param: str, v: Value) -> None:
        expr, axes = self.operand(v)
        if v.type.dtype in _ROUNDED:  # type: ignore[union-attr]
            expr = f"{expr}.to({_ROUNDED[v.type.dtype]})"  # type: ignore[union-attr]
        index = self.index(_shape(v), axes)
        address = param if index is None else f"{param} + {index}"
        mask = None if index is None else self.mask(axes)
        self.lines.append(f"tl.store({address}, {expr})" if mask is None else
                          f"tl.store({address}, {expr}, mask={mask})")

    # ------------------------------------------------------------ pointwise
    def pointwise(self, node: Node) -> None:
        if any(v is None for v in node.inputs):
            raise Unsupported(f"{node.op} with an absent operand")
        operands = [self.operand(v) for v in node.inputs]  # type: ignore[arg-type]
        axes = self.broadcast(_shape(node.output), [(_shape(v), a) for v, (_, a) in zip(node.inputs, operands)])
        self.define(node.output, POINTWISE[node.op](*(e for e, _ in operands), **node.attrs), axes)

    @staticmethod
    def broadcast(out: Sequence[int], operands: list[tuple[Sequence[int], Axes]]) -> Axes:
        """Placement of a broadcasting op's result: each of its axes runs where its operands' do.

        An operand placed along a domain axis of size 1 (a matmul's accumulator with one row)
        still spans it in the kernel, and so does the result.
        """
        axes: list[int | None] = [None] * len(out)
        for shape, placed in operands:
            offset = len(out) - len(shape)
            for k, axis in enumerate(placed):
                if axis is None:
                    continue
                if axes[offset + k] not in (None, axis):
                    raise Unsupported("operands broadcast along different axes of the domain")
                axes[offset + k] = axis
        return tuple(axes)

    def batch_norm(self, node: Node) -> None:
        """Inference batch norm: a per-channel affine map, its vectors placed on the input's channel axis."""
        x, weight, bias, mean, var = node.inputs
        xe, xa = self.operand(x)
        if len(xa) < 2 or xa[1] is None:
            raise Unsupported("batch norm whose channel axis does not run along the domain")
        channel = (xa[1],)
        me, ve = self.operand(mean, channel)[0], self.operand(var, channel)[0]
        expr = f"({xe} - {me}) * tl.rsqrt({ve} + {float(node.attrs['eps'])!r})"
        if weight is not None:
            expr = f"{expr} * {self.operand(weight, channel)[0]}"
        if bias is not None:
            expr = f"{expr} + {self.operand(bias, channel)[0]}"
        self.define(node.output, expr, xa)


def _axis_term(program: str, stride: int, size: int, outermost: bool) -> str:
    """The coordinate along one axis, from a flat position ``program`` over a contiguous domain."""
    term = program if stride == 1 else f"{program} // {stride}"
    return f"({term})" if outermost else f"({term} % {size})"


class _ElementwiseWriter(_Writer):
    """A 1-D grid of ``BLOCK`` elements per program over the broadcast shape of the group's values."""

    kind = "elementwise"

    def __init__(self, graph: Graph):
        try:
            domain = tuple(torch.broadcast_shapes(*(_shape(o) for n in graph.nodes for o in n.outputs)))
        except RuntimeError:
            raise Unsupported("the group's values do not broadcast to one shape") from None
        super().__init__(graph, domain)
        self.numel = math.prod(domain)
        self.strides = _strides(domain)

    def prologue(self) -> None:
        self.lines += ["offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)", f"mask = offs < {self.numel}"]

    def coordinate(self, axis: int) -> str:
        return _axis_term("offs", self.strides[axis], self.domain[axis], axis == 0)

    def linear(self) -> str:
        return "offs"

    def mask(self, axes: Axes) -> str | None:
        return "mask"

    def signature(self) -> tuple[tuple[str, ...], tuple[LaunchConfig, ...]]:
        block = min(1024, _pow2(self.numel))
        return ("BLOCK",), (LaunchConfig((_cdiv(self.numel, block),), {"BLOCK": block},
                                         {"num_warps": max(1, min(8, block // 256))}),)


class _RowsByColumns(_Writer):
    """A domain read as rows (every axis but the last, flattened) by columns (the last axis); a
    program names its rows and columns by the expressions ``row_index`` and ``column_index``."""

    row_index = ""
    column_index = ""

    def __init__(self, graph: Graph, domain: tuple[int, ...]):
        super().__init__(graph, domain)
        self.row_strides = _strides(domain[:-1])

    def coordinate(self, axis: int) -> str:
        if axis == len(self.domain) - 1:
            return self.column_index
        return _axis_term(self.row_index, self.row_strides[axis], self.domain[axis], axis == 0)

    def linear(self) -> str:
        return f"{self.row_index} * {self.domain[-1]} + {self.column_index}"


class _RowWriter(_RowsByColumns):
    """One program per row of the reductions' input; the row's ``BLOCK_D`` columns in registers."""

    kind = "reduction"
    row_index, column_index = "row", "cols"

    def __init__(self, graph: Graph):
        first = next(n for n in graph.nodes if n.opdef.row_op)
        domain = _shape(first.inputs[0])
        if not domain or domain[-1] > MAX_ROW:
            raise Unsupported(f"rows of shape {list(domain)}: the kernel holds 1 to {MAX_ROW} columns")
        super().__init__(graph, domain)
        self.width = domain[-1]
        self.rows = math.prod(domain[:-1])

    def prologue(self) -> None:
        self.lines += ["row = tl.program_id(0)", "cols = tl.arange(0, BLOCK_D)", f"cmask = cols < {self.width}"]

    def mask(self, axes: Axes) -> str | None:
        """Columns are masked; a value that is one number per row needs no mask."""
        return "cmask" if len(self.domain) - 1 in axes else None

    def signature(self) -> tuple[tuple[str, ...], tuple[LaunchConfig, ...]]:
        block = _pow2(self.width)
        return ("BLOCK_D",), (LaunchConfig((self.rows,), {"BLOCK_D": block},
                                           {"num_warps": max(1, min(16, block // 256))}),)

    def lower(self, node: Node) -> None:
        if not node.opdef.row_op:
            return super().lower(node)
        x, axes = self.operand(node.inputs[0])
        if axes[-1:] != (len(self.domain) - 1,):
            raise Unsupported(f"{node.op} of a value whose last axis is not the row")
        self.check_last_axis(node)
        d = float(self.width)
        if node.op in ("softmax", "log_softmax", "layer_norm", "rms_norm"):
            self.define(node.output, getattr(self, node.op)(node, x, d), axes)
            return
        if node.op == "var":
            mean = self.let(f"{self.total(x)} / {d!r}")
            centred = self.let(f"tl.where(cmask, {x} - {mean}, 0.0)")
            expr = f"tl.sum({centred} * {centred}, axis=0) / {d - node.attrs['correction']!r}"
        elif node.op in ("amax", "amin"):
            fill, fn = ('-float("inf")', "tl.max") if node.op == "amax" else ('float("inf")', "tl.min")
            expr = f"{fn}(tl.where(cmask, {x}, {fill}), axis=0)"
        else:
            expr = self.total(x) + (f" / {d!r}" if node.op == "mean" else "")
        self.define(node.output, expr, axes[:-1] + ((None,) if node.attrs["keepdim"] else ()))

    @staticmethod
    def check_last_axis(node: Node) -> None:
        last = len(_shape(node.inputs[0])) - 1
        if node.op in ("softmax", "log_softmax"):
            ok = node.attrs["dim"] % (last + 1) == last
        elif node.op in ("layer_norm", "rms_norm"):
            ok = len(node.attrs["normalized_shape"]) == 1
        else:
            dims = node.attrs["dims"]
            ok = sorted(d % (last + 1) for d in (range(last + 1) if dims is None else dims)) == [last]
        if not ok:
            raise Unsupported(f"{node.op} over other axes than the last ({node.attrs})")

    def total(self, x: str) -> str:
        return f"tl.sum(tl.where(cmask, {x}, 0.0), axis=0)"

    def softmax(self, node: Node, x: str, d: float) -> str:
        top = self.let(f'tl.max(tl.where(cmask, {x}, -float("inf")), axis=0)')
        e = self.let(f"tl.where(cmask, tl.exp({x} - {top}), 0.0)")
        return f"{e} / tl.sum({e}, axis=0)"

    def log_softmax(self, node: Node, x: str, d: float) -> str:
        top = self.let(f'tl.max(tl.where(cmask, {x}, -float("inf")), axis=0)')
        return f"{x} - {top} - tl.log(tl.sum(tl.where(cmask, tl.exp({x} - {top}), 0.0), axis=0))"

    def layer_norm(self, node: Node, x: str, d: float) -> str:
        mean = self.let(f"{self.total(x)} / {d!r}")
        centred = self.let(f"tl.where(cmask, {x} - {mean}, 0.0)")
        eps = float(node.attrs["eps"])
        expr = f"{centred} * tl.rsqrt(tl.sum({centred} * {centred}, axis=0) / {d!r} + {eps!r})"
        return self.affine(node, expr, node.inputs[1:3])

    def rms_norm(self, node: Node, x: str, d: float) -> str:
        eps = node.attrs["eps"]
        eps = float(torch.finfo(node.inputs[0].type.dtype).eps if eps is None else eps)  # type: ignore[union-attr]
        expr = f"{x} * tl.rsqrt(tl.sum(tl.where(cmask, {x} * {x}, 0.0), axis=0) / {d!r} + {eps!r})"
        return self.affine(node, expr, node.inputs[1:2])

    def affine(self, node: Node, expr: str, params: Sequence[Value | None]) -> str:
        """Scale by the norm's weight and shift by its bias, both per column."""
        for op, v in zip("*+", params):
            if v is not None:
                expr = f"{expr} {op} {self.operand(v)[0]}"
        return expr


class _EpilogueWriter(_RowsByColumns):
    """A ``BLOCK_M`` x ``BLOCK_N`` output tile per program: a K loop of ``tl.dot``, then the epilogue."""

    kind = "epilogue"
    row_index, column_index = "rm[:, None]", "rn[None, :]"

    def __init__(self, graph: Graph, tiles: Sequence[Mapping[str, int]]):
        self.anchor = graph.nodes[0]
        if self.anchor.op not in ANCHORS or any(n.op in ANCHORS for n in graph.nodes[1:]):
            raise Unsupported("an epilogue group is one matmul followed by pointwise ops")
        super().__init__(graph, _shape(self.anchor.output))
        if len(self.domain) < 2:
            raise Unsupported(f"{self.anchor.op} with a result of rank {len(self.domain)}")
        self.m, self.n = math.prod(self.domain[:-1]), self.domain[-1]
        self.tiles = tiles
        self.a, self.b, self.k, self.a_strides, self.b_strides = self.operands()
        if self.a.type.dtype != self.b.type.dtype or self.a.type.dtype == torch.bool:  # type: ignore[union-attr]
            raise Unsupported(f"{self.anchor.op} of {self.a.type} by {self.b.type}")

    def mask(self, axes: Axes) -> str | None:
        return "mask"

    def operands(self) -> tuple[Value, Value, int, tuple[int, int], tuple[int, int]]:
        """Left and right operands, the contraction size K, and the (row, k) and (k, column) strides."""
        node = self.anchor
        a, b = node.inputs[0], node.inputs[1]
        sa, sb = _shape(a), _shape(b)
        if node.op == "matmul":
            if len(sa) < 2 or len(sb) != 2:
                raise Unsupported("matmul of a batch of matrices by a batch: the right operand must be 2-D")
            return a, b, sa[-1], (sa[-1], 1), (sb[1], 1)
        if node.op == "linear":
            if len(sb) != 2:
                raise Unsupported("linear with a weight that is not 2-D")
            return a, b, sa[-1], (sa[-1], 1), (1, sb[1])
        trans_a, trans_b = node.attrs["trans_a"], node.attrs["trans_b"]
        k = sa[0] if trans_a else sa[1]
        return a, b, k, (1, sa[1]) if trans_a else (sa[1], 1), (1, sb[1]) if trans_b else (sb[1], 1)

    def prologue(self) -> None:
        (sam, sak), (sbk, sbn), k = self.a_strides, self.b_strides, self.k
        pa, pb = self.pointer(self.a), self.pointer(self.b)
        precision = ""
        if self.a.type.dtype == torch.float32:  # type: ignore[union-attr]
            # torch computes fp32 matmuls in full precision unless TF32 is allowed; so do we.
            precision = f', input_precision="{"tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"}"'
        self.lines += [
            "pid = tl.program_id(0)",
            f"columns = ({self.n} + BLOCK_N - 1) // BLOCK_N",
            "rm = (pid // columns) * BLOCK_M + tl.arange(0, BLOCK_M)",
            "rn = (pid % columns) * BLOCK_N + tl.arange(0, BLOCK_N)",
            f"mask = (rm[:, None] < {self.m}) & (rn[None, :] < {self.n})",
            "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
            f"for k in range(0, {k}, BLOCK_K):",
            "    rk = k + tl.arange(0, BLOCK_K)",
            f"    a = tl.load({pa} + {_scaled('rm[:, None]', sam)} + {_scaled('rk[None, :]', sak)}, "
            f"mask=(rm[:, None] < {self.m}) & (rk[None, :] < {k}), other=0.0)",
            f"    b = tl.load({pb} + {_scaled('rk[:, None]', sbk)} + {_scaled('rn[None, :]', sbn)}, "
            f"mask=(rk[:, None] < {k}) & (rn[None, :] < {self.n}), other=0.0)",
            f"    acc += tl.dot(a, b{precision})",
        ]

    def lower(self, node: Node) -> None:
        if node is not self.anchor:
            return super().lower(node)
        expr = "acc"
        full = tuple(range(len(self.domain)))
        if node.op == "gemm":
            alpha, beta, c = node.attrs["alpha"], node.attrs["beta"], node.inputs[2:3]
            expr = expr if alpha == 1.0 else f"{expr} * {float(alpha)!r}"
            if c and c[0] is not None:
                ce = self.operand(c[0])[0]
                expr = f"{expr} + {ce}" if beta == 1.0 else f"{expr} + {float(beta)!r} * {ce}"
        elif node.op == "linear" and node.inputs[2:3] and node.inputs[2] is not None:
            expr = f"{expr} + {self.operand(node.inputs[2])[0]}"
        self.define(node.output, expr, full)

    def signature(self) -> tuple[tuple[str, ...], tuple[LaunchConfig, ...]]:
        configs: dict[tuple, LaunchConfig] = {}
        for tile in self.tiles:
            bm, bn, bk = (min(tile[key], max(16, _pow2(size)))
                          for key, size in (("BLOCK_M", self.m), ("BLOCK_N", self.n), ("BLOCK_K", self.k)))
            options = {key: value for key, value in tile.items() if not key.startswith("BLOCK_")}
            grid = (_cdiv(self.m, bm) * _cdiv(self.n, bn),)
            config = LaunchConfig(grid, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, options)
            configs.setdefault((bm, bn, bk, *sorted(options.items())), config)
        if not configs:
            raise Unsupported("no matmul tiles to choose from")
        return ("BLOCK_M", "BLOCK_N", "BLOCK_K"), tuple(configs.values())
