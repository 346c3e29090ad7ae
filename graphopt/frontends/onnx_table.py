"""ONNX op -> canonical IR ops, one small importer per ONNX op type (default domain, opset >= 13).

An importer returns the IR values for the node's outputs, or raises ``NoMatch``
when the node's attributes or inputs do not fit a canonical op exactly; the
front end then keeps the node opaque. Importers only cover what they can map
exactly: ONNX and torch differ in integer promotion (torch sums ints to int64),
negative indices, and window rules, and those forms stay opaque.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from graphopt.ir import Value

from .onnx import ONNX_TO_TORCH, NodeContext, NoMatch

Importer = Callable[[NodeContext], list]
IMPORTERS: dict[str, Importer] = {}

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _register(*op_types: str):
    def wrap(fn: Importer) -> Importer:
        for t in op_types:
            IMPORTERS[t] = fn
        return fn

    return wrap


def _require(condition: bool, why: str = "") -> None:
    if not condition:
        raise NoMatch(why)


def _is_float(v: Value) -> bool:
    return v.type.dtype in FLOATS


# ------------------------------------------------------------ elementwise
_UNARY = {
    "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
    "Neg": "neg", "Abs": "abs", "Erf": "erf", "Sin": "sin", "Cos": "cos", "Tan": "tan", "Asin": "asin",
    "Acos": "acos", "Atan": "atan", "Sinh": "sinh", "Cosh": "cosh", "Asinh": "asinh", "Acosh": "acosh",
    "Atanh": "atanh", "Reciprocal": "reciprocal", "Floor": "floor", "Ceil": "ceil", "Round": "round",
    "Sign": "sign", "Not": "logical_not", "BitwiseNot": "bitwise_not", "IsNaN": "isnan", "Mish": "mish",
    "HardSwish": "hardswish", "Identity": "identity",
}
_FLOAT_ONLY_UNARY = {"Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Erf", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan",
                     "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Reciprocal", "Floor", "Ceil", "Round", "Mish",
                     "HardSwish", "IsNaN"}


@_register(*_UNARY)
def _unary(c: NodeContext) -> list:
    x = c.input(0)
    _require(len(c.node.input) == 1)
    if c.node.op_type in _FLOAT_ONLY_UNARY:
        _require(_is_float(x), "integer forms differ from torch")
    return [c.op(_UNARY[c.node.op_type], [x])]


_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Equal": "eq", "Less": "lt", "LessOrEqual": "le",
           "Greater": "gt", "GreaterOrEqual": "ge", "And": "logical_and", "Or": "logical_or",
           "Xor": "logical_xor", "BitwiseAnd": "bitwise_and", "BitwiseOr": "bitwise_or",
           "BitwiseXor": "bitwise_xor"}


@_register(*_BINARY)
def _binary(c: NodeContext) -> list:
    a, b = c.input(0), c.input(1)
    _require(a.type.dtype == b.type.dtype)
    return [c.op(_BINARY[c.node.op_type], [a, b])]


@_register("Div")
def _div(c: NodeContext) -> list:
    a, b = c.input(0), c.input(1)
    _require(a.type.dtype == b.type.dtype and a.type.dtype != torch.bool)
    return [c.op("div", [a, b], rounding_mode=None if _is_float(a) else "trunc")]


@_register("Pow")
def _pow(c: NodeContext) -> list:
    a, b = c.input(0), c.input(1)
    _require(_is_float(a) and (_is_float(b) and a.type.dtype == b.type.dtype or b.data is not None),
             "ONNX Pow keeps the base type; torch promotes")
    if b.type.dtype != a.type.dtype:
        b = c.constant(b.data.to(a.type.dtype), "exponent")
    return [c.op("pow", [a, b])]


@_register("Mod")
def _mod(c: NodeContext) -> list:
    a, b = c.input(0), c.input(1)
    fmod = c.attr("fmod", 0)
    _require(a.type.dtype == b.type.dtype and (fmod or not _is_float(a)))
    return [c.op("fmod" if fmod else "remainder", [a, b])]


@_register("Max", "Min", "Sum")
def _variadic(c: NodeContext) -> list:
    xs = c.inputs()
    _require(len({x.type.dtype for x in xs}) == 1)
    op = {"Max": "maximum", "Min": "minimum", "Sum": "add"}[c.node.op_type]
    if c.node.op_type != "Sum":
        _require(_is_float(xs[0]) or xs[0].type.dtype in (torch.int32, torch.int64), "NaN/uint rules")
    out = xs[0]
    for x in xs[1:]:
        out = c.op(op, [out, x])
    if len(xs) == 1:
        out = c.op("identity", [out])
    return [out]


@_register("Mean")
def _mean(c: NodeContext) -> list:
    xs = c.inputs()
    _require(_is_float(xs[0]) and len({x.type.dtype for x in xs}) == 1)
    out = xs[0]
    for x in xs[1:]:
        out = c.op("add", [out, x])
    count = c.constant(torch.tensor(float(len(xs)), dtype=xs[0].type.dtype), "count")
    return [c.op("div", [out, count])]


@_register("Where")
def _where(c: NodeContext) -> list:
    cond, a, b = c.inputs()
    _require(a.type.dtype == b.type.dtype)
    return [c.op("where", [cond, a, b])]


@_register("IsInf")
def _isinf(c: NodeContext) -> list:
    x = c.input(0)
    _require(_is_float(x))
    return [c.op("isinf", [x], detect_positive=bool(c.attr("detect_positive", 1)),
                 detect_negative=bool(c.attr("detect_negative", 1)))]


_ACTIVATIONS = {
    "LeakyRelu": ("leaky_relu", {"alpha": ("negative_slope", 0.01)}),
    "Elu": ("elu", {"alpha": ("alpha", 1.0)}),
    "Celu": ("celu", {"alpha": ("alpha", 1.0)}),
    "HardSigmoid": ("hardsigmoid", {"alpha": ("alpha", 0.2), "beta": ("beta", 0.5)}),
}


@_register(*_ACTIVATIONS)
def _activation(c: NodeContext) -> list:
    x = c.input(0)
    _require(_is_float(x))
    op, attr_map = _ACTIVATIONS[c.node.op_type]
    attrs = {ir_name: float(c.attr(name, default)) for name, (ir_name, default) in attr_map.items()}
    return [c.op(op, [x], **attrs)]


@_register("Selu")
def _selu(c: NodeContext) -> list:
    x = c.input(0)
    _require(_is_float(x))
    _require(math.isclose(c.attr("alpha", 1.67326319217681884765625), 1.6732632423543772, rel_tol=1e-6)
             and math.isclose(c.attr("gamma", 1.05070102214813232421875), 1.0507009873554805, rel_tol=1e-6))
    return [c.op("selu", [x])]


@_register("Softplus")
def _softplus(c: NodeContext) -> list:
    x = c.input(0)
    _require(_is_float(x))
    return [c.op("softplus", [x], beta=1.0, threshold=20.0)]


@_register("Gelu")
def _gelu(c: NodeContext) -> list:
    x = c.input(0)
    _require(_is_float(x))
    return [c.op("gelu", [x], approximate=c.attr("approximate", "none"))]


@_register("Clip")
def _clip(c: NodeContext) -> list:
    x = c.input(0)
    bounds = [c.const(i).item() if c.has_input(i) else None for i in (1, 2)]
    _require(_is_float(x) or x.type.dtype in (torch.int32, torch.int64))
    return [c.op("clamp", [x], min=bounds[0], max=bounds[1])]


@_register("Cast", "CastLike")
def _cast(c: NodeContext) -> list:
    x = c.input(0)
    if c.node.op_type == "Cast":
        _require(c.attr("saturate", 1) == 1 and c.attr("round_mode", "up") == "up")
        dtype = ONNX_TO_TORCH.get(c.attr("to"))
    else:
        dtype = c.input(1).type.dtype
    _require(dtype is not None and dtype in (*FLOATS, torch.int8, torch.int16, torch.int32, torch.int64,
                                              torch.uint8, torch.bool))
    _require(not (_is_float(x) and not dtype.is_floating_point), "float->int conversion of out-of-range values")
    return [c.op("cast", [x], dtype=dtype)]


@_register("Dropout")
def _dropout(c: NodeContext) -> list:
    _require(len([o for o in c.node.output if o]) == 1 and c.node.output[0] != "")
    if c.has_input(2):
        _require(not bool(c.const(2).item()), "training dropout")
    ratio = float(c.const(1).item()) if c.has_input(1) else 0.5
    return [c.op("dropout", [c.input(0)], p=ratio, training=False)]


# ----------------------------------------------------------------- linalg
@_register("MatMul")
def _matmul(c: NodeContext) -> list:
    a, b = c.input(0), c.input(1)
    _require(_is_float(a) and a.type.dtype == b.type.dtype)
    return [c.op("matmul", [a, b])]


@_register("Gemm")
def _gemm(c: NodeContext) -> list:
    a, b = c.input(0), c.input(1)
    _require(_is_float(a))
    bias = c.input(2) if c.has_input(2) else None
    return [c.op("gemm", [a, b, bias], alpha=float(c.attr("alpha", 1.0)), beta=float(c.attr("beta", 1.0)),
                 trans_a=bool(c.attr("transA", 0)), trans_b=bool(c.attr("transB", 0)))]


@_register("Einsum")
def _einsum(c: NodeContext) -> list:
    xs = c.inputs()
    _require(_is_float(xs[0]))
    return [c.op("einsum", xs, equation=c.attr("equation"))]


def _spatial_pads(c: NodeContext, x: Value, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """Explicit ONNX pads [begin..., end...] after resolving auto_pad (static spatial dims for SAME_*)."""
    n = len(kernel)
    auto_pad = c.attr("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return [0] * (2 * n)
    if auto_pad == "NOTSET":
        return list(c.attr("pads", [0] * (2 * n)))
    spatial = c.shape(x)[2:]
    _require(all(isinstance(d, int) for d in spatial), "SAME padding of symbolic dims")
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _pad_first(c: NodeContext, x: Value, pads: list[int], value: float = 0.0) -> tuple[Value, list[int]]:
    """Split pads into a symmetric part and an explicit ``pad`` node for the rest."""
    n = len(pads) // 2
    sym = [min(pads[i], pads[i + n]) for i in range(n)]
    extra = [(pads[i] - sym[i], pads[i + n] - sym[i]) for i in range(n)]
    if any(e != (0, 0) for e in extra):
        _require(min(pads) >= 0)
        flat = [p for pair in reversed(extra) for p in pair]
        x = c.op("pad", [x], pads=flat, mode="constant", value=value)
    return x, sym


@_register("Conv")
def _conv(c: NodeContext) -> list:
    x, w = c.input(0), c.input(1)
    _require(_is_float(x))
    wshape = c.shape(w)
    n = len(wshape) - 2
    kernel = list(c.attr("kernel_shape", wshape[2:]))
    _require(all(isinstance(k, int) for k in kernel) and kernel == list(wshape[2:]))
    strides = list(c.attr("strides", [1] * n))
    dilations = list(c.attr("dilations", [1] * n))
    x, padding = _pad_first(c, x, _spatial_pads(c, x, kernel, strides, dilations))
    bias = c.input(2) if c.has_input(2) else None
    return [c.op("conv", [x, w, bias], stride=strides, padding=padding, dilation=dilations,
                 groups=int(c.attr("group", 1)), transposed=False, output_padding=[0] * n)]


@_register("ConvTranspose")
def _conv_transpose(c: NodeContext) -> list:
    x, w = c.input(0), c.input(1)
    _require(_is_float(x))
    _require("output_shape" not in c.attrs and c.attr("auto_pad", "NOTSET") in ("NOTSET", "VALID"))
    wshape = c.shape(w)
    n = len(wshape) - 2
    _require(list(c.attr("kernel_shape", wshape[2:])) == list(wshape[2:]))
    pads = list(c.attr("pads", [0] * (2 * n))) if c.attr("auto_pad", "NOTSET") == "NOTSET" else [0] * (2 * n)
    _require(pads[:n] == pads[n:], "asymmetric transposed-conv pads")
    strides = list(c.attr("strides", [1] * n))
    output_padding = list(c.attr("output_padding", [0] * n))
    dilations = list(c.attr("dilations", [1] * n))
    _require(all(op < max(s, d) for op, s, d in zip(output_padding, strides, dilations)))
    bias = c.input(2) if c.has_input(2) else None
    return [c.op("conv", [x, w, bias], stride=strides, padding=pads[:n], dilation=dilations,
                 groups=int(c.attr("group", 1)), transposed=True, output_padding=output_padding)]


# ------------------------------------------------------------------- norms
@_register("BatchNormalization")
def _batch_norm(c: NodeContext) -> list:
    _require(len(c.node.output) == 1 and not c.attr("training_mode", 0))
    x, scale, bias, mean, var = c.inputs()
    _require(_is_float(x) and c.rank(x) >= 2)
    _require(len({v.type.dtype for v in (x, scale, bias, mean, var)}) == 1)
    return [c.op("batch_norm", [x, scale, bias, mean, var], eps=float(c.attr("epsilon", 1e-5)))]


@_register("LayerNormalization")
def _layer_norm(c: NodeContext) -> list:
    _require(len([o for o in c.node.output if o]) == 1 and c.node.output[0])
    x = c.input(0)
    _require(_is_float(x) and c.attr("stash_type", 1) == 1)
    shape = c.shape(x)
    axis = c.attr("axis", -1) % len(shape)
    normalized = list(shape[axis:])
    _require(all(isinstance(d, int) for d in normalized))
    weight = c.input(1)
    bias = c.input(2) if c.has_input(2) else None
    for v in (weight, bias):
        _require(v is None or (list(c.shape(v)) == normalized and v.type.dtype == x.type.dtype))
    return [c.op("layer_norm", [x, weight, bias], normalized_shape=normalized, eps=float(c.attr("epsilon", 1e-5)))]


@_register("GroupNormalization")
def _group_norm(c: NodeContext) -> list:
    _require(c.opset >= 21, "opset 18 GroupNormalization scales per group")
    x, scale, bias = c.inputs()
    _require(_is_float(x) and c.attr("stash_type", 1) == 1)
    channels = c.shape(x)[1]
    _require(list(c.shape(scale)) == [channels] and list(c.shape(bias)) == [channels])
    return [c.op("group_norm", [x, scale, bias], num_groups=int(c.attr("num_groups")),
                 eps=float(c.attr("epsilon", 1e-5)))]


@_register("InstanceNormalization")
def _instance_norm(c: NodeContext) -> list:
    x, scale, bias = c.inputs()
    _require(_is_float(x) and c.rank(x) >= 3)
    channels = c.shape(x)[1]
    _require(isinstance(channels, int))
    return [c.op("group_norm", [x, scale, bias], num_groups=channels, eps=float(c.attr("epsilon", 1e-5)))]


@_register("Softmax", "LogSoftmax")
def _softmax(c: NodeContext) -> list:
    x = c.input(0)
    _require(_is_float(x))
    op = "softmax" if c.node.op_type == "Softmax" else "log_softmax"
    return [c.op(op, [x], dim=int(c.attr("axis", -1)))]


# -------------------------------------------------------------- reductions
_REDUCE = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "amax", "ReduceMin": "amin",
           "ReduceProd": "prod"}


@_register(*_REDUCE)
def _reduce(c: NodeContext) -> list:
    x = c.input(0)
    op = _REDUCE[c.node.op_type]
    _require(_is_float(x) or (op in ("amax", "amin") and x.type.dtype != torch.bool),
             "torch sums integers into int64")
    _require(all(isinstance(d, int) and d > 0 for d in c.shape(x)) or op in ("sum", "mean"),
             "reducing empty or symbolic dims")
    if "axes" in c.attrs:
        axes = list(c.attr("axes"))
    elif c.has_input(1):
        axes = c.const_ints(1)
    else:
        axes = []
    keepdim = bool(c.attr("keepdims", 1))
    if not axes:
        if c.attr("noop_with_empty_axes", 0):
            return [c.op("identity", [x])]
        return [c.op(op, [x], dims=None, keepdim=keepdim)]
    return [c.op(op, [x], dims=axes, keepdim=keepdim)]


@_register("ArgMax", "ArgMin")
def _arg_reduce(c: NodeContext) -> list:
    x = c.input(0)
    _require(not c.attr("select_last_index", 0) and x.type.dtype != torch.bool)
    op = "argmax" if c.node.op_type == "ArgMax" else "argmin"
    return [c.op(op, [x], dim=int(c.attr("axis", 0)), keepdim=bool(c.attr("keepdims", 1)))]


@_register("CumSum")
def _cumsum(c: NodeContext) -> list:
    x = c.input(0)
    _require(_is_float(x) and not c.attr("exclusive", 0) and not c.attr("reverse", 0))
    return [c.op("cumsum", [x], dim=int(c.const(1).item()))]


@_register("TopK")
def _topk(c: NodeContext) -> list:
    x = c.input(0)
    _require(_is_float(x))
    return c.op_multi("topk", [x], k=int(c.const(1).item()), dim=int(c.attr("axis", -1)),
                      largest=bool(c.attr("largest", 1)), sorted=bool(c.attr("sorted", 1)))


# ------------------------------------------------------------------ shapes
@_register("Transpose")
def _transpose(c: NodeContext) -> list:
    x = c.input(0)
    perm = c.attr("perm")
    if perm is None:
        perm = list(reversed(range(c.rank(x))))
    return [c.op("permute", [x], dims=list(perm))]


def _static_output_shape(c: NodeContext) -> list[int]:
    """The output shape ONNX inference found, one unknown dim as -1: how a computed shape input becomes static."""
    t = c.scope.ir_type(c.node.output[0])
    _require(t is not None and t.shape is not None, "output shape unknown")
    shape = [d if isinstance(d, int) else -1 for d in t.shape]
    _require(shape.count(-1) <= 1, "several unknown output dims")
    return shape


def _shape_entries(v: Value) -> list | None:
    """The entries of a shape tensor: an int where known, a dim symbol where it copies one, else None.

    Exporters build shapes as ``Concat(Unsqueeze(Gather(Shape(x), i)), constants...)``;
    after folding only the dynamic dims stay computed, and those read a dim of
    ``x``, whose symbol the IR knows. None when even the length is unknown.
    """
    if v.data is not None:
        return [int(e) for e in v.data.reshape(-1).tolist()]
    node, length = v.producer, _static_length(v)
    if node is not None and node.op == "concat":
        pieces = [_shape_entries(piece) for piece in node.inputs]
        return None if None in pieces else [e for piece in pieces for e in piece]
    if node is not None and node.op in ("unsqueeze", "squeeze", "reshape") and length is not None:
        entries = _shape_entries(node.inputs[0])
        return entries if entries is not None and len(entries) == length else [None] * length
    dims = _dims_read(v)
    if dims is not None:
        return dims
    return None if length is None else [None] * length


def _static_length(v: Value) -> int | None:
    shape = v.type.shape
    if shape is None or len(shape) > 1 or not all(isinstance(d, int) for d in shape):
        return None
    return shape[0] if shape else 1


def _dims_read(v: Value) -> list | None:
    """The dims ``shape(x)`` or ``take(shape(x), constant)`` reads: ints and symbols of ``x``'s type."""
    node = v.producer
    index = None
    if node is not None and node.op == "take" and node.inputs[1].data is not None and node.attrs.get("axis", 0) == 0:
        index, node = node.inputs[1].data.reshape(-1).tolist(), node.inputs[0].producer
    if node is None or node.op != "shape" or node.inputs[0].type.shape is None:
        return None
    dims = list(node.inputs[0].type.shape)[node.attrs.get("start", 0):node.attrs.get("end")]
    return dims if index is None else [dims[i] for i in index]


def _reshape_target(entries: list, in_shape: tuple) -> list[int]:
    """A torch reshape target for ONNX shape entries: at most one -1, solved from the element count if needed.

    An unknown entry (a -1 or a run-time value) is the input's element count over
    the other entries; it is static when the input's symbolic dims and the
    target's cancel. Then one symbolic entry may remain, and becomes the -1.
    """
    unknown = [i for i, e in enumerate(entries) if e is None or e == -1]
    _require(len(unknown) <= 1, "several unknown dims")
    symbols = sorted(e for e in entries if isinstance(e, str))
    if unknown:
        in_symbols = sorted(d for d in in_shape if isinstance(d, str))
        if in_symbols == symbols and symbols:
            known = math.prod(e for e in entries if isinstance(e, int) and e != -1)
            total = math.prod(d for d in in_shape if isinstance(d, int))
            _require(known > 0 and total % known == 0, "sizes do not divide")
            entries = [total // known if i == unknown[0] else e for i, e in enumerate(entries)]
            unknown = []
    _require(len(unknown) + len(symbols) <= 1, "several unknown dims")
    shape = [e if isinstance(e, int) else -1 for e in entries]
    _require(-1 not in shape or 0 not in shape, "-1 next to an empty dim is ambiguous")
    return shape


@_register("Reshape")
def _reshape(c: NodeContext) -> list:
    x = c.input(0)
    if c.input(1).data is None and _output_is_known(c):
        return [c.op("reshape", [x], shape=_static_output_shape(c))]
    entries = _shape_entries(c.input(1))
    _require(entries is not None, "target length unknown")
    in_shape = c.shape(x)
    if not c.attr("allowzero", 0) and 0 in entries:
        entries = [in_shape[i] if e == 0 else e for i, e in enumerate(entries)]
    return [c.op("reshape", [x], shape=_reshape_target(entries, in_shape))]


def _output_is_known(c: NodeContext) -> bool:
    t = c.scope.ir_type(c.node.output[0])
    return t is not None and t.shape is not None and sum(not isinstance(d, int) for d in t.shape) <= 1


@_register("Flatten")
def _flatten(c: NodeContext) -> list:
    x = c.input(0)
    rank = c.rank(x)
    axis = c.attr("axis", 1)
    axis = axis + rank if axis < 0 else axis
    if axis == 0:
        return [c.op("unsqueeze", [c.op("flatten", [x], start_dim=0, end_dim=-1)], dims=[0])]
    if axis == rank:
        return [c.op("unsqueeze", [c.op("flatten", [x], start_dim=0, end_dim=-1)], dims=[1])]
    inner = c.op("flatten", [x], start_dim=axis, end_dim=-1)
    return [c.op("flatten", [inner], start_dim=0, end_dim=axis - 1)]


@_register("Squeeze", "Unsqueeze")
def _squeeze(c: NodeContext) -> list:
    x = c.input(0)
    dims = c.const_ints(1) if c.has_input(1) else None
    if c.node.op_type == "Unsqueeze":
        _require(dims is not None)
        return [c.op("unsqueeze", [x], dims=dims)]
    if dims is not None:
        shape = c.shape(x)
        _require(all(shape[d] == 1 for d in dims), "squeezing a non-1 dim is an ONNX error")
    return [c.op("squeeze", [x], dims=dims)]


@_register("Expand")
def _expand(c: NodeContext) -> list:
    t = c.scope.ir_type(c.node.output[0])
    if c.input(1).data is None and t is not None and t.is_static:
        return [c.op("expand", [c.input(0)], shape=list(t.shape))]
    return [c.op("broadcast_to", [c.input(0), c.input(1)])]


@_register("Slice")
def _slice(c: NodeContext) -> list:
    x = c.input(0)
    starts, ends = c.const_ints(1), c.const_ints(2)
    axes = c.const_ints(3) if c.has_input(3) else list(range(len(starts)))
    steps = c.const_ints(4) if c.has_input(4) else [1] * len(starts)
    _require(all(s > 0 for s in steps), "negative steps")
    rank = c.rank(x)
    out = x
    for start, end, axis, step in zip(starts, ends, axes, steps):
        out = c.op("slice", [out], dim=axis % rank, start=start, end=min(end, 2**63 - 1), step=step)
    if out is x:
        out = c.op("identity", [x])
    return [out]


@_register("Gather")
def _gather(c: NodeContext) -> list:
    x, idx = c.input(0), c.input(1)
    _require(idx.type.dtype in (torch.int32, torch.int64))
    return [c.op("take", [x, idx], axis=int(c.attr("axis", 0)))]


@_register("GatherElements")
def _gather_elements(c: NodeContext) -> list:
    x, idx = c.input(0), c.input(1)
    _require(idx.data is not None and bool((idx.data >= 0).all()), "negative indices wrap in ONNX only")
    if idx.type.dtype != torch.int64:
        idx = c.constant(idx.data.long(), "indices")
    return [c.op("gather", [x, idx], dim=int(c.attr("axis", 0)))]


@_register("Concat")
def _concat(c: NodeContext) -> list:
    xs = c.inputs()
    _require(len({x.type.dtype for x in xs}) == 1)
    return [c.op("concat", xs, dim=int(c.attr("axis")))]


@_register("Split")
def _split(c: NodeContext) -> list:
    x = c.input(0)
    axis = int(c.attr("axis", 0))
    count = len(c.node.output)
    if c.has_input(1):
        sizes = c.const_ints(1)
    else:
        size = c.shape(x)[axis]
        _require(isinstance(size, int))
        chunk = -(-size // count) if "num_outputs" in c.attrs else size // count
        _require("num_outputs" in c.attrs or size % count == 0)
        sizes = [min(chunk, size - k * chunk) for k in range(count)]
    _require(len(sizes) == count and all(s >= 0 for s in sizes))
    return c.op_multi("split", [x], dim=axis, sizes=sizes)


@_register("Pad")
def _pad(c: NodeContext) -> list:
    x = c.input(0)
    _require(c.attr("mode", "constant") == "constant")
    pads = c.const_ints(1)
    value = c.const(2).item() if c.has_input(2) else 0
    rank = c.rank(x)
    axes = [a % rank for a in c.const_ints(3)] if c.has_input(3) else list(range(rank))
    n = len(axes)
    full = {a: (pads[i], pads[i + n]) for i, a in enumerate(axes)}
    flat = [p for a in reversed(range(rank)) for p in full.get(a, (0, 0))]
    return [c.op("pad", [x], pads=flat, mode="constant", value=value)]


@_register("Tile")
def _tile(c: NodeContext) -> list:
    return [c.op("repeat", [c.input(0)], repeats=c.const_ints(1))]


@_register("Trilu")
def _trilu(c: NodeContext) -> list:
    x = c.input(0)
    _require(c.rank(x) >= 2)
    k = int(c.const(1).item()) if c.has_input(1) else 0
    return [c.op("triu" if c.attr("upper", 1) else "tril", [x], diagonal=k)]


@_register("Shape")
def _shape(c: NodeContext) -> list:
    return [c.op("shape", [c.input(0)], start=int(c.attr("start", 0)), end=c.attr("end"))]


@_register("ConstantOfShape")
def _constant_of_shape(c: NodeContext) -> list:
    shape = c.const_ints(0) if c.input(0).data is not None else _static_output_shape(c)
    _require(-1 not in shape)
    value = c.attr("value")
    fill = value.reshape(-1)[0] if value is not None else torch.tensor(0.0)
    _require(fill.dtype in (*FLOATS, torch.int32, torch.int64, torch.bool, torch.int8, torch.uint8))
    return [c.op("full", [], shape=shape, value=fill.item(), dtype=fill.dtype)]


@_register("Range")
def _range(c: NodeContext) -> list:
    start, limit, delta = (c.const(i) for i in range(3))
    _require(start.dtype in (torch.int32, torch.int64, torch.float32, torch.float64))
    return [c.op("arange", [], start=start.item(), end=limit.item(), step=delta.item(), dtype=start.dtype)]


@_register("Constant")
def _constant(c: NodeContext) -> list:
    (name, value), = c.attrs.items()
    if name == "value":
        return [_as_constant(c, c.attr("value"))]
    tensors = {"value_float": torch.float32, "value_floats": torch.float32, "value_int": torch.int64,
               "value_ints": torch.int64}
    _require(name in tensors)
    return [_as_constant(c, torch.tensor(value, dtype=tensors[name]))]


def _as_constant(c: NodeContext, data: torch.Tensor) -> Value:
    return c.constant(data, c.node.output[0])


# -------------------------------------------------------------------- pooling
def _pool_window(c: NodeContext, x: Value) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(c.attr("kernel_shape"))
    n = len(kernel)
    _require(1 <= n <= 3 and c.rank(x) == n + 2)
    strides = list(c.attr("strides", [1] * n))
    dilations = list(c.attr("dilations", [1] * n))
    pads = _spatial_pads(c, x, kernel, strides, dilations)
    _require(pads[:n] == pads[n:], "asymmetric pooling pads")
    _require(all(p <= k // 2 for p, k in zip(pads[:n], kernel)), "torch caps pads at half the window")
    return kernel, strides, pads[:n], dilations


@_register("MaxPool")
def _max_pool(c: NodeContext) -> list:
    x = c.input(0)
    _require(len([o for o in c.node.output if o]) == 1 and c.node.output[0] and _is_float(x))
    _require(not c.attr("storage_order", 0))
    kernel, strides, pads, dilations = _pool_window(c, x)
    _require(not c.attr("ceil_mode", 0), "ceil-mode window rules differ")
    return [c.op("max_pool", [x], kernel_size=kernel, stride=strides, padding=pads, dilation=dilations,
                 ceil_mode=False)]


@_register("AveragePool")
def _avg_pool(c: NodeContext) -> list:
    x = c.input(0)
    _require(_is_float(x))
    kernel, strides, pads, dilations = _pool_window(c, x)
    _require(all(d == 1 for d in dilations) and not c.attr("ceil_mode", 0))
    return [c.op("avg_pool", [x], kernel_size=kernel, stride=strides, padding=pads, ceil_mode=False,
                 count_include_pad=bool(c.attr("count_include_pad", 0)))]


@_register("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(c: NodeContext) -> list:
    x = c.input(0)
    _require(_is_float(x))
    dims = list(range(2, c.rank(x)))
    op = "mean" if c.node.op_type == "GlobalAveragePool" else "amax"
    return [c.op(op, [x], dims=dims, keepdim=True)]


# --------------------------------------------------------------- resampling
_TORCH_LINEAR_MODES = {3: "linear", 4: "bilinear", 5: "trilinear"}


@_register("Resize")
def _resize(c: NodeContext) -> list:
    """The Resize forms that are ``F.interpolate`` exactly: nearest (asymmetric, floor), linear and cubic
    (a = -0.75, edges not excluded) with half-pixel or align-corners coordinates."""
    x = c.input(0)
    rank = c.rank(x)
    _require(_is_float(x) and 3 <= rank <= 5)
    _require(not c.attr("antialias", 0) and "axes" not in c.attrs
             and c.attr("keep_aspect_ratio_policy", "stretch") == "stretch")
    size, scale_factor = _resize_target(c, x)
    out_spatial = c.scope.ir_type(c.node.output[0])
    mode, transform = c.attr("mode", "nearest"), c.attr("coordinate_transformation_mode", "half_pixel")
    if mode == "nearest":
        _require(transform == "asymmetric" and c.attr("nearest_mode", "round_prefer_floor") == "floor")
        return [c.op("interpolate", [x], size=size, scale_factor=scale_factor, mode="nearest")]
    if mode == "cubic":
        _require(rank == 4 and c.attr("cubic_coeff_a", -0.75) == -0.75 and not c.attr("exclude_outside", 0))
    _require(mode in ("linear", "cubic") and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"))
    torch_mode = "bicubic" if mode == "cubic" else _TORCH_LINEAR_MODES[rank]
    if transform != "half_pixel":  # the others read index 0 for an output dim of size 1, torch does not
        _require(out_spatial is not None and out_spatial.shape is not None
                 and all(isinstance(d, int) and d > 1 for d in out_spatial.shape[2:]), "output size 1")
    return [c.op("interpolate", [x], size=size, scale_factor=scale_factor, mode=torch_mode,
                 align_corners=transform == "align_corners")]


def _resize_target(c: NodeContext, x: Value) -> tuple[list[int] | None, list[float] | None]:
    """(size, scale_factor) of the spatial dims: Resize keeps batch and channels."""
    if c.has_input(3):
        sizes = c.const_ints(3)
        _require(list(c.shape(x)[:2]) == sizes[:2], "resizing batch or channels")
        return sizes[2:], None
    scales = [float(s) for s in c.const(2).reshape(-1).tolist()]
    _require(scales[:2] == [1.0, 1.0] and all(s > 0 for s in scales), "resizing batch or channels")
    return None, scales[2:]


NOT_IMPORTED: dict[str, str] = {
    **dict.fromkeys(["atan2", "flip", "roll", "rsqrt", "stack", "var"],
                    "no ONNX op: exporters spell it with others, which import as they are"),
    **dict.fromkeys(["silu", "linear"], "no ONNX op: recognize_patterns and fuse_linear rebuild it from primitives"),
    **dict.fromkeys(["rms_norm", "sdpa"],
                    "RMSNormalization and Attention are opset 23, not imported; passes rebuild them from primitives"),
    **dict.fromkeys(["all", "any"], "no ONNX reduction: exporters cast and use ReduceMin/ReduceMax"),
    "adaptive_avg_pool": "ONNX has only GlobalAveragePool, which imports as mean",
    "contiguous": "ONNX has no memory format: only the layout passes make it",
    "embedding": "ONNX Gather imports as take, whatever the table",
    **dict.fromkeys(["index", "index_select", "select"], "ONNX Gather and GatherElements import as take and gather"),
    "full_like": "ONNX ConstantOfShape imports as full when its shape is constant",
    "ne": "ONNX has no NotEqual: Not(Equal) imports as logical_not of eq",
}
"""Canonical ops no ONNX importer builds, and why (the registry coverage test reads this)."""
