"""Canonical IR op -> ONNX nodes, one lowering per op, aware of the target opset.

A lowering ``fn(e, node, ins, outs)`` appends ONNX nodes to the emitter ``e``
that read the ONNX names ``ins`` and write exactly ``outs``. Where ONNX lacks
an op at the target opset (LayerNormalization before 17, Gelu before 20, ...)
the lowering decomposes it into older ops with the same math.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from graphopt.frontends.onnx import TORCH_TO_ONNX
from graphopt.ir import Node, TensorType, Value
from graphopt.ir.ops.shape import skipped_by_concat

from .onnx import EmitError, OnnxEmitter

Lowering = Callable[[OnnxEmitter, Node, list, list], None]
EMITTERS: dict[str, Lowering] = {}
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def _register(*ops: str):
    def wrap(fn: Lowering) -> Lowering:
        for op in ops:
            EMITTERS[op] = fn
        return fn

    return wrap


def _dtype(v) -> torch.dtype:
    t = v.type
    if isinstance(t, TensorType):
        return t.dtype
    return getattr(t, "dtype", torch.float32)


def _shape(v) -> tuple:
    if not isinstance(v.type, TensorType) or v.type.shape is None:
        raise EmitError(f"%{v.name}: the lowering needs a known rank")
    return v.type.shape


def _axes_input(e: OnnxEmitter, dims) -> str:
    return e.ints(list(dims), "axes")


# -------------------------------------------------------------- elementwise
_UNARY = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp", "log": "Log", "sqrt": "Sqrt",
          "neg": "Neg", "abs": "Abs", "erf": "Erf", "sin": "Sin", "cos": "Cos", "tan": "Tan", "asin": "Asin",
          "acos": "Acos", "atan": "Atan", "sinh": "Sinh", "cosh": "Cosh", "asinh": "Asinh", "acosh": "Acosh",
          "atanh": "Atanh", "reciprocal": "Reciprocal", "floor": "Floor", "ceil": "Ceil", "round": "Round",
          "sign": "Sign", "logical_not": "Not", "isnan": "IsNaN", "selu": "Selu", "identity": "Identity"}


@_register(*_UNARY)
def _unary(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    x = ins[0]
    if n.op in ("exp", "log", "sqrt", "sin", "cos", "tan", "erf", "sigmoid", "tanh", "reciprocal", "asin", "acos",
                "atan", "sinh", "cosh", "asinh", "acosh", "atanh"):
        x = e.cast(x, _dtype(n.inputs[0]), _dtype(n.output))  # torch computes integer inputs in float
    e.add(_UNARY[n.op], [x], outs)


@_register("bitwise_not")
def _bitwise_not(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    if _dtype(n.inputs[0]) == torch.bool:
        e.add("Not", ins, outs)
    else:
        e.add("BitwiseNot", ins, outs)


@_register("rsqrt")
def _rsqrt(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("Reciprocal", [e.add1("Sqrt", ins)], outs)


@_register("silu")
def _silu(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("Mul", [ins[0], e.add1("Sigmoid", ins)], outs)


@_register("mish")
def _mish(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    if e.opset >= 18:
        e.add("Mish", ins, outs)
    else:
        e.add("Mul", [ins[0], e.add1("Tanh", [e.add1("Softplus", ins)])], outs)


@_register("hardswish")
def _hardswish(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("HardSwish", ins, outs)


_ARITH = {"add": "Add", "sub": "Sub", "mul": "Mul", "pow": "Pow", "maximum": "Max", "minimum": "Min",
          "bitwise_and": "BitwiseAnd", "bitwise_or": "BitwiseOr", "bitwise_xor": "BitwiseXor"}
_COMPARE = {"eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual"}
_LOGICAL = {"logical_and": "And", "logical_or": "Or", "logical_xor": "Xor"}


def _operands(e: OnnxEmitter, n: Node, ins: list, dtype: torch.dtype) -> list:
    """Inputs cast to one dtype: ONNX has no type promotion."""
    return [e.cast(name, _dtype(v), dtype) for name, v in zip(ins, n.inputs)]


@_register(*_ARITH)
def _arith(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dtype = _dtype(n.output)
    op = _ARITH[n.op]
    if dtype == torch.bool and n.op.startswith("bitwise"):
        op = {"bitwise_and": "And", "bitwise_or": "Or", "bitwise_xor": "Xor"}[n.op]
    e.add(op, _operands(e, n, ins, dtype), outs)


@_register(*_COMPARE)
def _compare(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dtype = torch.promote_types(_dtype(n.inputs[0]), _dtype(n.inputs[1]))
    e.add(_COMPARE[n.op], _operands(e, n, ins, dtype), outs)


@_register("ne")
def _ne(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dtype = torch.promote_types(_dtype(n.inputs[0]), _dtype(n.inputs[1]))
    e.add("Not", [e.add1("Equal", _operands(e, n, ins, dtype))], outs)


@_register(*_LOGICAL)
def _logical(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add(_LOGICAL[n.op], _operands(e, n, ins, torch.bool), outs)


@_register("div")
def _div(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    mode = n.attrs["rounding_mode"]
    dtype = _dtype(n.output)
    a, b = _operands(e, n, ins, dtype)
    if mode is None or (mode == "trunc" and not dtype.is_floating_point):
        e.add("Div", [a, b], outs)
    elif mode == "trunc":
        q = e.add1("Div", [a, b])
        e.add("Mul", [e.add1("Sign", [q]), e.add1("Floor", [e.add1("Abs", [q])])], outs)
    elif dtype.is_floating_point:
        e.add("Floor", [e.add1("Div", [a, b])], outs)
    else:  # integer floor division: (a - python_mod(a, b)) / b is exact
        e.add("Div", [e.add1("Sub", [a, e.add1("Mod", [a, b], fmod=0)]), b], outs)


@_register("fmod")
def _fmod(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("Mod", _operands(e, n, ins, _dtype(n.output)), outs, fmod=1)


@_register("remainder")
def _remainder(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dtype = _dtype(n.output)
    a, b = _operands(e, n, ins, dtype)
    if not dtype.is_floating_point:
        e.add("Mod", [a, b], outs, fmod=0)
        return
    floor = e.add1("Floor", [e.add1("Div", [a, b])])
    e.add("Sub", [a, e.add1("Mul", [floor, b])], outs)


@_register("atan2")
def _atan2(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    """atan(y/x), shifted by +-pi in the left half plane; x == 0 gives +-pi/2."""
    dtype = _dtype(n.output)
    y, x = _operands(e, n, ins, dtype)
    zero, pi = e.const(0.0, dtype), e.const(math.pi, dtype)
    base = e.add1("Atan", [e.add1("Div", [y, x])])
    y_neg = e.add1("Less", [y, zero])
    shift = e.add1("Where", [y_neg, e.add1("Neg", [pi]), pi])
    left = e.add1("Where", [e.add1("Less", [x, zero]), e.add1("Add", [base, shift]), base])
    half = e.add1("Mul", [e.add1("Sign", [y]), e.const(math.pi / 2, dtype)])
    e.add("Where", [e.add1("Equal", [x, zero]), half, left], outs)


_WHERE_AS = {torch.bool: torch.uint8, torch.int16: torch.int32, torch.uint16: torch.int32,
             torch.uint64: torch.int64, torch.bfloat16: torch.float32}
"""Types ONNX's Where takes but onnxruntime has no Where kernel for (its CPU provider, 1.32), each
with the type it selects in instead: every value converts there and back unchanged."""


@_register("where")
def _where(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dtype = _dtype(n.output)
    kernel = _WHERE_AS.get(dtype, dtype)
    cond = e.cast(ins[0], _dtype(n.inputs[0]), torch.bool)
    branches = [e.cast(ins[i], _dtype(n.inputs[i]), kernel) for i in (1, 2)]
    if kernel == dtype:
        e.add("Where", [cond, *branches], outs)
    else:
        e.add("Cast", [e.add1("Where", [cond, *branches])], outs, to=TORCH_TO_ONNX[dtype])


@_register("isinf")
def _isinf(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("IsInf", ins, outs, detect_positive=int(n.attrs["detect_positive"]),
          detect_negative=int(n.attrs["detect_negative"]))


@_register("gelu")
def _gelu(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    approximate = n.attrs["approximate"]
    if e.opset >= 20:
        e.add("Gelu", ins, outs, approximate=approximate)
        return
    dtype = _dtype(n.output)
    x = ins[0]
    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = e.add1("Mul", [e.add1("Mul", [x, x]), x])
        inner = e.add1("Add", [x, e.add1("Mul", [cube, e.const(0.044715, dtype)])])
        t = e.add1("Tanh", [e.add1("Mul", [inner, e.const(math.sqrt(2 / math.pi), dtype)])])
    else:  # 0.5 x (1 + erf(x / sqrt 2))
        t = e.add1("Erf", [e.add1("Mul", [x, e.const(1 / math.sqrt(2), dtype)])])
    one_plus = e.add1("Add", [t, e.const(1.0, dtype)])
    e.add("Mul", [e.add1("Mul", [x, e.const(0.5, dtype)]), one_plus], outs)


@_register("leaky_relu")
def _leaky_relu(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("LeakyRelu", ins, outs, alpha=float(n.attrs["negative_slope"]))


@_register("elu", "celu")
def _elu(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add(n.op.capitalize(), ins, outs, alpha=float(n.attrs["alpha"]))


@_register("softplus")
def _softplus(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    """softplus(beta x)/beta, linear where beta x exceeds the threshold (torch's form)."""
    beta, threshold = float(n.attrs["beta"]), float(n.attrs["threshold"])
    dtype = _dtype(n.output)
    x = ins[0]
    scaled = x if beta == 1.0 else e.add1("Mul", [x, e.const(beta, dtype)])
    soft = e.add1("Softplus", [scaled])
    if beta != 1.0:
        soft = e.add1("Div", [soft, e.const(beta, dtype)])
    e.add("Where", [e.add1("Greater", [scaled, e.const(threshold, dtype)]), x, soft], outs)


@_register("hardsigmoid")
def _hardsigmoid(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("HardSigmoid", ins, outs, alpha=float(n.attrs["alpha"]), beta=float(n.attrs["beta"]))


@_register("clamp")
def _clamp(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dtype = _dtype(n.output)
    x = e.cast(ins[0], _dtype(n.inputs[0]), dtype)
    lo, hi = n.attrs["min"], n.attrs["max"]
    e.add("Clip", [x, "" if lo is None else e.const(lo, dtype, "min"), "" if hi is None else e.const(hi, dtype, "max")],
          outs)


@_register("cast")
def _cast(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("Cast", ins, outs, to=TORCH_TO_ONNX[n.attrs["dtype"]])


@_register("dropout")
def _dropout(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    if n.attrs["training"] and n.attrs["p"] > 0:
        e.add("Dropout", [ins[0], e.const(float(n.attrs["p"]), _dtype(n.output)), e.const(True, torch.bool)], outs)
    else:
        e.add("Identity", ins, outs)


# ------------------------------------------------------------------- linalg
@_register("matmul")
def _matmul(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("MatMul", ins, outs)


@_register("linear")
def _linear(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    x, w = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else ""
    if len(_shape(n.inputs[0])) == 2:
        e.add("Gemm", [x, w, bias] if bias else [x, w], outs, transB=1)
        return
    weight = n.inputs[1]
    wt = e.transposed_constant(weight) if weight.is_constant else e.add1("Transpose", [w], perm=[1, 0])
    if bias:
        e.add("Add", [e.add1("MatMul", [x, wt]), bias], outs)
    else:
        e.add("MatMul", [x, wt], outs)


@_register("gemm")
def _gemm(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    a = n.attrs
    e.add("Gemm", [i for i in ins if i] if ins[-1] else ins[:2], outs, alpha=float(a.get("alpha", 1.0)),
          beta=float(a.get("beta", 1.0)), transA=int(a.get("trans_a", False)), transB=int(a.get("trans_b", False)))


@_register("conv")
def _conv(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    inputs = ins if ins[-1] else ins[:2]
    if n.attrs["transposed"]:
        spatial = len(_shape(n.inputs[1])) - 2
        e.add("ConvTranspose", inputs, outs, output_padding=per_dim(n.attrs["output_padding"], spatial),
              **conv_attributes(n))
    else:
        e.add("Conv", inputs, outs, **conv_attributes(n))


def conv_attributes(n: Node) -> dict:
    """The ONNX Conv attributes of an IR conv (shared with the fused convolutions of other domains)."""
    a = n.attrs
    spatial = len(_shape(n.inputs[1])) - 2
    padding = per_dim(a.get("padding", (0,)), spatial)
    return dict(strides=per_dim(a.get("stride", (1,)), spatial), dilations=per_dim(a.get("dilation", (1,)), spatial),
                group=int(a.get("groups", 1)), pads=padding + padding, kernel_shape=list(_shape(n.inputs[1])[2:]))


def per_dim(values, n: int) -> list[int]:
    """One int per spatial dim: a single value (torch's ``stride=2``) is repeated ``n`` times."""
    values = [int(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return values * n if len(values) == 1 else values


@_register("einsum")
def _einsum(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("Einsum", ins, outs, equation=n.attrs["equation"])


@_register("sdpa")
def _sdpa(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    """softmax(q k^T * scale + mask) v: one Attention node from opset 23, else MatMul/Softmax.

    Attention reads rank-3 inputs as packed heads, unlike torch, and onnxruntime refuses a mask
    that broadcasts over its last two dims; those cases keep the decomposition, where causal and
    boolean masks become additive and grouped-query key/value heads are repeated to the query's.
    """
    q, k, v = ins[:3]
    mask = ins[3] if len(ins) > 3 else ""
    qshape, kshape = _shape(n.inputs[0]), _shape(n.inputs[1])
    dtype = _dtype(n.output)
    scale = n.attrs["scale"]
    boolean_mask = bool(mask) and _dtype(n.inputs[3]) == torch.bool
    if mask and not boolean_mask:
        mask = e.cast(mask, _dtype(n.inputs[3]), dtype)
    if (e.opset >= 23 and all(len(_shape(x)) == 4 for x in n.inputs[:3])
            and (not mask or tuple(_shape(n.inputs[3])[-2:]) == (qshape[-2], kshape[-2]))):
        e.add("Attention", [q, k, v, mask] if mask else [q, k, v], outs, is_causal=int(bool(n.attrs["is_causal"])),
              scale=None if scale is None else float(scale))  # absent: 1/sqrt(head size), as torch
        return
    if n.attrs["enable_gqa"]:
        k, v = (_repeat_heads(e, n, x, value, qshape[-3]) for x, value in ((k, n.inputs[1]), (v, n.inputs[2])))
    if scale is None:
        if not isinstance(qshape[-1], int):
            raise EmitError(f"node {n.name}: sdpa default scale needs a static head size")
        scale = 1 / math.sqrt(qshape[-1])
    rank = len(kshape)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = e.add1("MatMul", [e.add1("Mul", [q, e.const(math.sqrt(scale), dtype)]),
                               e.add1("Mul", [e.add1("Transpose", [k], perm=perm), e.const(math.sqrt(scale), dtype)])])
    if n.attrs["is_causal"]:
        lq, lk = qshape[-2], kshape[-2]
        if not (isinstance(lq, int) and isinstance(lk, int)):
            raise EmitError(f"node {n.name}: causal sdpa needs static sequence lengths")
        causal = torch.ones(lq, lk, dtype=torch.bool).tril()
        scores = e.add1("Where", [e.const(causal), scores, e.const(float("-inf"), dtype)])
    if boolean_mask:
        scores = e.add1("Where", [mask, scores, e.const(float("-inf"), dtype)])
    elif mask:
        scores = e.add1("Add", [scores, mask])
    e.add("MatMul", [attention_probabilities(e, scores, bool(mask), dtype), v], outs)


def _repeat_heads(e: OnnxEmitter, n: Node, x: str, value: Value, heads) -> str:
    """``x`` ([B, h, S, D]) with each head repeated ``heads / h`` times in a row, as sdpa's ``enable_gqa`` reads it
    (head ``j`` from head ``j // (heads / h)``): Unsqueeze, Expand over the new axis, Reshape back to rank 4."""
    shape = _shape(value)
    if len(shape) != 4 or not isinstance(heads, int) or not isinstance(shape[1], int) or heads % shape[1]:
        raise EmitError(f"node {n.name}: sdpa with grouped-query heads needs rank-4 inputs and static head counts, "
                        f"the query's a multiple of the key's and value's")
    if heads == shape[1]:
        return x
    seq, dim = shape[2:]
    if not (isinstance(seq, int) or isinstance(dim, int)):
        raise EmitError(f"node {n.name}: sdpa with grouped-query heads needs a static sequence length or head size")
    expanded = e.add1("Expand", [e.add1("Unsqueeze", [x, _axes_input(e, [2])]),
                                 e.ints([1, 1, heads // shape[1], 1, 1])])
    return e.add1("Reshape", [expanded, e.ints([0, heads, -1, dim] if isinstance(dim, int) else [0, heads, seq, -1])])


def attention_probabilities(e: OnnxEmitter, scores: str, masked: bool, dtype: torch.dtype) -> str:
    """Softmax over the keys; under a mask, a row masked everywhere gives zeros (NaN in plain Softmax), as in sdpa."""
    probs = e.add1("Softmax", [scores], axis=-1)
    if not masked:
        return probs
    return e.add1("Where", [e.add1("IsNaN", [probs]), e.const(0.0, dtype), probs])


# -------------------------------------------------------------------- norms
def _ones_or(e: OnnxEmitter, name: str, n: Node, size, dtype: torch.dtype, value: float) -> str:
    if name:
        return name
    if not all(isinstance(s, int) for s in size):
        raise EmitError(f"node {n.name}: absent affine parameters need a static size")
    return e.const(torch.full(list(size), value, dtype=dtype), hint="affine")


@_register("batch_norm")
def _batch_norm(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dtype = _dtype(n.output)
    channels = [_shape(n.inputs[0])[1]]
    scale = _ones_or(e, ins[1], n, channels, dtype, 1.0)
    bias = _ones_or(e, ins[2], n, channels, dtype, 0.0)
    e.add("BatchNormalization", [ins[0], scale, bias, ins[3], ins[4]], outs, epsilon=float(n.attrs["eps"]))


@_register("layer_norm")
def _layer_norm(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    shape = list(n.attrs["normalized_shape"])
    eps = float(n.attrs["eps"])
    dtype = _dtype(n.output)
    weight, bias = (ins + ["", ""])[1:3]
    if e.opset >= 17:
        weight = _ones_or(e, weight, n, shape, dtype, 1.0)
        e.add("LayerNormalization", [ins[0], weight, bias] if bias else [ins[0], weight], outs, axis=-len(shape),
              epsilon=eps)
        return
    axes = list(range(-len(shape), 0))
    normalized = _normalize(e, ins[0], axes, eps, dtype)
    _affine(e, normalized, weight, bias, outs)


def _reduce_mean(e: OnnxEmitter, x: str, axes: list[int]) -> str:
    if e.opset >= 18:
        return e.add1("ReduceMean", [x, _axes_input(e, axes)], keepdims=1)
    return e.add1("ReduceMean", [x], axes=axes, keepdims=1)


def _normalize(e: OnnxEmitter, x: str, axes: list[int], eps: float, dtype: torch.dtype) -> str:
    """(x - mean) / sqrt(var + eps) over ``axes`` (biased variance)."""
    centered = e.add1("Sub", [x, _reduce_mean(e, x, axes)])
    var = _reduce_mean(e, e.add1("Mul", [centered, centered]), axes)
    return e.add1("Div", [centered, e.add1("Sqrt", [e.add1("Add", [var, e.const(eps, dtype)])])])


def _affine(e: OnnxEmitter, x: str, weight: str, bias: str, outs: list) -> None:
    if weight and bias:
        e.add("Add", [e.add1("Mul", [x, weight]), bias], outs)
    elif weight:
        e.add("Mul", [x, weight], outs)
    elif bias:
        e.add("Add", [x, bias], outs)
    else:
        e.add("Identity", [x], outs)


@_register("group_norm")
def _group_norm(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    """GroupNormalization from opset 21; before it, the 5 nodes torch.onnx exports and runtimes fuse.

    InstanceNormalization over x viewed as (N, G, -1) normalizes each group; the per-channel
    affine follows with weight and bias as (C, 1, ..., 1), pre-shaped when they are constants.
    """
    groups, eps = int(n.attrs["num_groups"]), float(n.attrs["eps"])
    shape = _shape(n.inputs[0])
    dtype = _dtype(n.output)
    weight, bias = (ins + ["", ""])[1:3]
    if e.opset >= 21:
        channels = [shape[1]]
        e.add("GroupNormalization", [ins[0], _ones_or(e, weight, n, channels, dtype, 1.0),
                                     _ones_or(e, bias, n, channels, dtype, 0.0)], outs, num_groups=groups,
              epsilon=eps)
        return
    grouped = e.add1("Reshape", [ins[0], e.ints([0, groups, -1])])
    if dtype == torch.float64:  # onnxruntime has no double InstanceNormalization kernel
        normalized = _normalize(e, grouped, [2], eps, dtype)
    else:
        normalized = e.add1("InstanceNormalization", [grouped, e.const(torch.ones(groups), dtype),
                                                      e.const(torch.zeros(groups), dtype)], epsilon=eps)
    static = all(isinstance(s, int) for s in shape)
    restored = e.add1("Reshape", [normalized, e.ints(shape) if static else e.add1("Shape", [ins[0]])])
    column = [-1] + [1] * (len(shape) - 2)

    def per_channel(k: int) -> str:
        """Input ``k`` (1: weight, 2: bias) as (C, 1, ..., 1), or "" where it is absent."""
        if not (weight, bias)[k - 1]:
            return ""
        if n.inputs[k].is_constant:
            return e.const(n.inputs[k].data.reshape(column), hint=f"{n.inputs[k].name}_column")
        return e.add1("Reshape", [ins[k], e.ints(column)])

    _affine(e, restored, per_channel(1), per_channel(2), outs)


@_register("rms_norm")
def _rms_norm(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    shape = list(n.attrs["normalized_shape"])
    dtype = _dtype(n.output)
    eps = n.attrs["eps"]
    eps = float(torch.finfo(dtype).eps) if eps is None else float(eps)
    weight = ins[1] if len(ins) > 1 else ""
    axes = list(range(-len(shape), 0))
    if e.opset >= 23:
        e.add("RMSNormalization", [ins[0], _ones_or(e, weight, n, shape, dtype, 1.0)], outs, axis=-len(shape),
              epsilon=eps)
        return
    mean_sq = _reduce_mean(e, e.add1("Mul", [ins[0], ins[0]]), axes)
    normalized = e.add1("Div", [ins[0], e.add1("Sqrt", [e.add1("Add", [mean_sq, e.const(eps, dtype)])])])
    _affine(e, normalized, weight, "", outs)


@_register("softmax", "log_softmax")
def _softmax(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("Softmax" if n.op == "softmax" else "LogSoftmax", ins, outs, axis=int(n.attrs["dim"]))


# --------------------------------------------------------------- reductions
_REDUCE = {"sum": "ReduceSum", "mean": "ReduceMean", "amax": "ReduceMax", "amin": "ReduceMin", "prod": "ReduceProd"}


def _reduce(e: OnnxEmitter, op_type: str, x: str, dims, keepdim: bool, outs: list | int = 1) -> list:
    """One ReduceX node in the opset's form (axes as an input for ReduceSum >= 13, all >= 18).

    ``dims`` None or empty reduces every dim, as torch does.
    """
    if not dims:
        return e.add(op_type, [x], outs, keepdims=int(keepdim))
    if e.opset >= 18 or op_type == "ReduceSum":
        return e.add(op_type, [x, _axes_input(e, dims)], outs, keepdims=int(keepdim))
    return e.add(op_type, [x], outs, axes=list(dims), keepdims=int(keepdim))


@_register(*_REDUCE)
def _reduction(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    x = e.cast(ins[0], _dtype(n.inputs[0]), _dtype(n.output))  # torch sums bool/int into int64
    if n.op == "mean" and _is_global_pool(n):  # onnxruntime's pooling kernel: the source model's rounding, faster
        e.add("GlobalAveragePool", [x], outs)
        return
    _reduce(e, _REDUCE[n.op], x, n.attrs["dims"], n.attrs["keepdim"], outs)


def _is_global_pool(n: Node) -> bool:
    """A keepdim mean over every spatial dim (all after N and C) of a float tensor: GlobalAveragePool."""
    t = n.inputs[0].type
    if not isinstance(t, TensorType) or t.shape is None or not n.attrs["keepdim"]:
        return False
    shape = t.shape
    if len(shape) < 3 or not _dtype(n.output).is_floating_point:
        return False
    return sorted(d % len(shape) for d in n.attrs["dims"] or ()) == list(range(2, len(shape)))


@_register("any", "all")
def _any_all(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    as_int = e.add1("Cast", [ins[0]], to=TORCH_TO_ONNX[torch.bool])
    as_int = e.add1("Cast", [as_int], to=TORCH_TO_ONNX[torch.int32])
    reduced = _reduce(e, "ReduceMax" if n.op == "any" else "ReduceMin", as_int, n.attrs["dims"],
                      n.attrs["keepdim"])[0]
    e.add("Cast", [reduced], outs, to=TORCH_TO_ONNX[torch.bool])


@_register("var")
def _var(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dims = n.attrs["dims"]
    shape = _shape(n.inputs[0])
    axes = list(range(len(shape))) if dims is None else [d % len(shape) for d in dims]
    count = math.prod(shape[a] for a in axes) if all(isinstance(shape[a], int) for a in axes) else None
    if count is None:
        raise EmitError(f"node {n.name}: var over symbolic dims needs static sizes")
    dtype = _dtype(n.output)
    centered = e.add1("Sub", [ins[0], _reduce(e, "ReduceMean", ins[0], axes, True)[0]])
    total = _reduce(e, "ReduceSum", e.add1("Mul", [centered, centered]), axes, n.attrs["keepdim"])[0]
    divisor = max(count - float(n.attrs["correction"]), 0.0)
    e.add("Div", [total, e.const(divisor, dtype)], outs)


@_register("argmax", "argmin")
def _argmax(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("ArgMax" if n.op == "argmax" else "ArgMin", ins, outs, axis=int(n.attrs["dim"]),
          keepdims=int(n.attrs["keepdim"]))


@_register("cumsum")
def _cumsum(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    x = e.cast(ins[0], _dtype(n.inputs[0]), _dtype(n.output))
    e.add("CumSum", [x, e.const(int(n.attrs["dim"]), torch.int64)], outs)


@_register("topk")
def _topk(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    a = n.attrs
    e.add("TopK", [ins[0], e.ints([int(a.get("k", 1))], "k")], outs, axis=int(a.get("dim", -1)),
          largest=int(a.get("largest", True)), sorted=int(a.get("sorted", True)))


# ------------------------------------------------------------------- shapes
@_register("reshape")
def _reshape(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    shape = [int(s) for s in n.attrs["shape"]]
    e.add("Reshape", [ins[0], e.ints(shape, "shape")], outs, allowzero=1 if 0 in shape else None)


@_register("contiguous")
def _contiguous(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("Identity", ins, outs)  # a memory format: ONNX tensors have no strides


@_register("permute")
def _permute(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    rank = len(n.attrs["dims"])
    e.add("Transpose", ins, outs, perm=[int(d) % rank for d in n.attrs["dims"]])


@_register("flatten")
def _flatten(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    shape = _shape(n.inputs[0])
    rank = len(shape)
    if rank == 0:
        e.add("Reshape", [ins[0], e.ints([1], "shape")], outs)
        return
    start, end = n.attrs["start_dim"] % rank, n.attrs["end_dim"] % rank
    tail = shape[end + 1:]
    head = [0] * start + [-1]
    if all(isinstance(d, int) for d in tail):
        e.add("Reshape", [ins[0], e.ints(head + list(tail), "shape")], outs)
        return
    dynamic_tail = e.add1("Shape", [ins[0]], start=end + 1) if e.opset >= 15 else e.add1(
        "Slice", [e.add1("Shape", [ins[0]]), e.ints([end + 1]), e.ints([INT64_MAX])])
    e.add("Reshape", [ins[0], e.add1("Concat", [e.ints(head, "shape"), dynamic_tail], axis=0)], outs)


@_register("squeeze")
def _squeeze(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dims = n.attrs["dims"]
    if dims is None:
        e.add("Squeeze", ins, outs)
        return
    shape = _shape(n.inputs[0])
    rank = len(shape)
    dims = [d % rank for d in dims if not isinstance(shape[d % rank], int) or shape[d % rank] == 1] if rank else []
    if not dims:
        e.add("Identity", ins, outs)
    else:
        e.add("Squeeze", [ins[0], _axes_input(e, dims)], outs)


@_register("unsqueeze")
def _unsqueeze(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("Unsqueeze", [ins[0], _axes_input(e, n.attrs["dims"])], outs)


@_register("expand")
def _expand(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    shape = [1 if int(s) == -1 else int(s) for s in n.attrs["shape"]]
    e.add("Expand", [ins[0], e.ints(shape, "shape")], outs)


@_register("broadcast_to")
def _broadcast_to(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("Expand", [ins[0], e.cast(ins[1], _dtype(n.inputs[1]), torch.int64)], outs)


@_register("slice")
def _slice(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    a = n.attrs
    end = a.get("end")
    end = INT64_MAX if end is None else min(int(end), INT64_MAX)
    e.add("Slice", [ins[0], e.ints([int(a.get("start", 0) or 0)], "starts"), e.ints([end], "ends"),
                    e.ints([int(a.get("dim", 0))], "axes"), e.ints([int(a.get("step", 1))], "steps")], outs)


@_register("select")
def _select(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("Gather", [ins[0], e.const(int(n.attrs["index"]), torch.int64, "index")], outs,
          axis=int(n.attrs["dim"]))


@_register("take", "index_select")
def _take(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    axis = n.attrs["axis"] if n.op == "take" else n.attrs["dim"]
    e.add("Gather", ins, outs, axis=int(axis))


@_register("index")
def _index(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    """Advanced indexing as one GatherND over the indexed dims moved to the front.

    GatherND puts the broadcast index shape first, as torch does for indexed dims
    that are not consecutive; a consecutive block keeps its place in torch, so
    one that does not start at dim 0 is transposed back.
    """
    shape = _shape(n.inputs[0])
    dims = [int(d) for d in n.attrs["dims"]]
    front = dims + [d for d in range(len(shape)) if d not in dims]
    x = ins[0] if front == list(range(len(shape))) else e.add1("Transpose", [ins[0]], perm=front)
    in_place = dims[0] > 0 and dims == list(range(dims[0], dims[0] + len(dims)))
    start = dims[0] if in_place else 0
    index_rank = max(len(_shape(v)) for v in n.inputs[1:])
    batch = tuple(_shape(n.output)[start:start + index_rank])
    needs_expand = any(tuple(_shape(v)) != batch for v in n.inputs[1:])
    target = _broadcast_shape(e, batch, ins[1:]) if needs_expand else ""
    coords = [_index_coordinate(e, name, v, batch, target) for name, v in zip(ins[1:], n.inputs[1:])]
    indices = e.add1("Concat", coords, axis=-1)
    if not in_place:
        e.add("GatherND", [x, indices], outs)
        return
    gathered = e.add1("GatherND", [x, indices])  # batch dims, then dims[:start], then the dims after the block
    after = len(shape) - len(dims) + index_rank
    perm = [*range(index_rank, index_rank + start), *range(index_rank), *range(index_rank + start, after)]
    e.add("Transpose", [gathered], outs, perm=perm)


def _broadcast_shape(e: OnnxEmitter, batch: tuple, indices: list) -> str:
    """The common shape of the index tensors: a constant when static, else broadcast at run time."""
    if all(isinstance(d, int) for d in batch):
        return e.ints(batch, "index_shape")
    common = e.add1("Shape", [indices[0]])
    for idx in indices[1:]:
        common = e.add1("Shape", [e.add1("Expand", [idx, common])])
    return common


def _index_coordinate(e: OnnxEmitter, name: str, v, batch: tuple, target: str) -> str:
    """One index tensor as int64, broadcast, with a trailing axis for GatherND (which wraps negatives)."""
    idx = e.cast(name, _dtype(v), torch.int64)
    if tuple(_shape(v)) != batch:
        idx = e.add1("Expand", [idx, target])
    return e.add1("Unsqueeze", [idx, _axes_input(e, [-1])])


@_register("gather")
def _gather(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("GatherElements", ins, outs, axis=int(n.attrs["dim"]))


@_register("embedding")
def _embedding(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("Gather", ins, outs, axis=0)


@_register("concat")
def _concat(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dtype = _dtype(n.output)
    parts = [e.cast(name, _dtype(v), dtype) for name, v in zip(ins, n.inputs)
             if not skipped_by_concat(getattr(v.type, "shape", None), getattr(n.output.type, "rank", None))]
    if len(parts) == 1:
        e.add("Identity", parts, outs)
    else:
        e.add("Concat", parts, outs, axis=int(n.attrs["dim"]))


@_register("stack")
def _stack(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dim = int(n.attrs["dim"])
    axes = _axes_input(e, [dim])
    e.add("Concat", [e.add1("Unsqueeze", [x, axes]) for x in ins], outs, axis=dim)


@_register("split")
def _split(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("Split", [ins[0], e.ints(n.attrs["sizes"], "split")], outs, axis=int(n.attrs["dim"]))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@_register("pad")
def _pad(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    rank = len(_shape(n.inputs[0]))
    pads = [int(p) for p in n.attrs["pads"]]
    begins, ends = [0] * rank, [0] * rank
    for k in range(len(pads) // 2):
        begins[rank - 1 - k], ends[rank - 1 - k] = pads[2 * k], pads[2 * k + 1]
    mode = n.attrs["mode"]
    if mode == "circular" and e.opset < 19:
        raise EmitError(f"node {n.name}: circular padding needs opset 19")
    inputs = [ins[0], e.ints(begins + ends, "pads")]
    if mode == "constant":
        inputs.append(e.const(n.attrs["value"] or 0, _dtype(n.output), "pad_value"))
    e.add("Pad", inputs, outs, mode=_PAD_MODES[mode])


@_register("repeat")
def _repeat(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    repeats = [int(r) for r in n.attrs["repeats"]]
    rank = len(_shape(n.inputs[0]))
    x = ins[0]
    if len(repeats) > rank:  # torch adds leading dims
        x = e.add1("Unsqueeze", [x, _axes_input(e, range(len(repeats) - rank))])
    e.add("Tile", [x, e.ints(repeats, "repeats")], outs)


@_register("flip")
def _flip(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dims = [int(d) for d in n.attrs["dims"]]
    k = len(dims)
    e.add("Slice", [ins[0], e.ints([-1] * k), e.ints([INT64_MIN] * k), e.ints(dims), e.ints([-1] * k)], outs)


@_register("roll")
def _roll(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    shape = _shape(n.inputs[0])
    shifts, dims = list(n.attrs["shifts"]), list(n.attrs["dims"] or [])
    x = ins[0]
    flat = not dims  # torch rolls the flattened tensor
    if flat:
        x = e.add1("Reshape", [x, e.ints([-1])])
        shape, dims = (math.prod(shape),), [0]
    for step, (shift, dim) in enumerate(zip(shifts, dims)):
        size = shape[dim]
        if not isinstance(size, int):
            raise EmitError(f"node {n.name}: roll along a symbolic dim")
        shift %= max(size, 1)
        tail = e.add1("Slice", [x, e.ints([size - shift]), e.ints([INT64_MAX]), e.ints([dim])])
        head = e.add1("Slice", [x, e.ints([0]), e.ints([size - shift]), e.ints([dim])])
        last = step == len(dims) - 1 and not flat
        x = e.add("Concat", [tail, head], outs if last else 1, axis=dim)[0]
    if flat:
        e.add("Reshape", [x, e.add1("Shape", [ins[0]])], outs)


@_register("tril", "triu")
def _trilu(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    e.add("Trilu", [ins[0], e.const(int(n.attrs["diagonal"]), torch.int64, "k")], outs,
          upper=int(n.op == "triu"))


@_register("shape")
def _shape_op(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    start, end = int(n.attrs["start"]), n.attrs["end"]
    if start == 0 and end is None:
        e.add("Shape", ins, outs)
    elif e.opset >= 15:
        e.add("Shape", ins, outs, start=start, end=None if end is None else int(end))
    else:
        full = e.add1("Shape", ins)
        e.add("Slice", [full, e.ints([start]), e.ints([INT64_MAX if end is None else int(end)])], outs)


# ------------------------------------------------------------------ pooling
def pool_window(n: Node) -> dict:
    """The ONNX window attributes (kernel, strides, pads, ceil mode) of a pooling node."""
    a = n.attrs
    kernel = [int(k) for k in a["kernel_size"]]
    k = len(kernel)
    stride = per_dim(a.get("stride") or kernel, k)
    padding = per_dim(a.get("padding", (0,)), k)
    return dict(kernel_shape=kernel, strides=stride, pads=padding + padding, ceil_mode=int(a.get("ceil_mode", False)))


@_register("max_pool")
def _max_pool(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    window = pool_window(n)
    dilation = per_dim(n.attrs["dilation"], len(window["kernel_shape"]))
    e.add("MaxPool", ins, outs, dilations=dilation, **window)


@_register("avg_pool")
def _avg_pool(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    if n.attrs["divisor_override"]:
        raise EmitError(f"node {n.name}: avg_pool divisor_override has no ONNX form")
    e.add("AveragePool", ins, outs, count_include_pad=int(n.attrs["count_include_pad"]), **pool_window(n))


@_register("adaptive_avg_pool")
def _adaptive_avg_pool(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    out_size = [int(s) for s in n.attrs["output_size"]]
    spatial = _shape(n.inputs[0])[2:]
    if all(s == 1 for s in out_size):
        e.add("GlobalAveragePool", ins, outs)
        return
    if not all(isinstance(d, int) for d in spatial):
        raise EmitError(f"node {n.name}: adaptive pooling to {out_size} from {spatial} needs static spatial sizes")
    if all(d % o == 0 for d, o in zip(spatial, out_size)):
        kernel = [d // o for d, o in zip(spatial, out_size)]
        e.add("AveragePool", ins, outs, kernel_shape=kernel, strides=kernel)
        return
    if len(spatial) > 2:
        raise EmitError(f"node {n.name}: adaptive pooling to {out_size} from {spatial} has no fixed window")
    # windows of uneven size (VGG's 7x7 from a small input): one averaging matrix per spatial dim
    dtype = _dtype(n.inputs[0])
    x = ins[0]
    if len(spatial) == 2:
        x = e.add("MatMul", [e.const(adaptive_pool_matrix(spatial[0], out_size[0]), dtype), x])[0]
    e.add("MatMul", [x, e.const(adaptive_pool_matrix(spatial[-1], out_size[-1]).T.contiguous(), dtype)], outs)


def adaptive_pool_matrix(size: int, out: int) -> torch.Tensor:
    """``(out, size)`` weights of torch's adaptive average pooling: bin i averages ``[floor(i*size/out), ceil((i+1)*size/out))``."""
    weights = torch.zeros(out, size, dtype=torch.float64)
    for i in range(out):
        start, end = i * size // out, -(-(i + 1) * size // out)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


@_register("interpolate")
def _interpolate(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    a = n.attrs
    mode = a.get("mode", "nearest")
    align = bool(a.get("align_corners"))
    attrs: dict = {}
    if mode == "nearest":
        attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    elif mode in ("linear", "bilinear", "trilinear", "bicubic"):
        attrs = dict(mode="cubic" if mode == "bicubic" else "linear",
                     coordinate_transformation_mode="align_corners" if align else "half_pixel")
        if mode == "bicubic":
            attrs["cubic_coeff_a"] = -0.75
    else:
        raise EmitError(f"node {n.name}: interpolate mode {mode!r} has no ONNX Resize form")
    rank = len(_shape(n.inputs[0]))
    if a.get("size") is not None:
        size = per_dim(a["size"], rank - 2)
        out_shape = _shape(n.output)
        sizes = e.ints([*out_shape[:2], *size]) if all(isinstance(d, int) for d in out_shape[:2]) else e.add1(
            "Concat", [e.add1("Slice", [e.add1("Shape", ins), e.ints([0]), e.ints([2])]), e.ints(size)], axis=0)
        e.add("Resize", [ins[0], "", "", sizes], outs, **attrs)
    else:
        scales = a["scale_factor"]
        scales = list(scales) if isinstance(scales, (list, tuple)) else [scales] * (rank - 2)
        e.add("Resize", [ins[0], "", e.const([1.0, 1.0, *[float(s) for s in scales]], torch.float32, "scales")],
              outs, **attrs)


# ------------------------------------------------------------------ creation
@_register("full")
def _full(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dtype = n.attrs["dtype"]
    value = torch.tensor([n.attrs["value"]]).to(dtype)
    e.add("ConstantOfShape", [e.ints(list(n.attrs["shape"]), "shape")], outs,
          value=_value_attr(value))


def _value_attr(value: torch.Tensor):
    from .onnx import tensor_proto

    return tensor_proto(value.reshape(1), "value")


@_register("full_like")
def _full_like(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    value = torch.tensor([n.attrs["value"]]).to(_dtype(n.output))
    e.add("ConstantOfShape", [e.add1("Shape", ins)], outs, value=_value_attr(value))


@_register("arange")
def _arange(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    dtype = n.attrs["dtype"]
    a = n.attrs
    e.add("Range", [e.const(a.get("start", 0), dtype), e.const(a.get("end", 0), dtype), e.const(a.get("step", 1), dtype)],
          outs)
