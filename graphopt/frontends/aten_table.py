"""ATen overload -> canonical IR op: the conversion table of the torch front end.

Each handler gets the conversion context ``cx`` of one fx node and the node's
arguments bound by name to the overload's schema (``a["self"]``, ``a["dim"]``),
defaults filled in. It builds the canonical node(s) through ``cx`` and returns
the IR value that stands for the fx node's result (a list of values for an op
with several results). A handler raises ``NotCanonical`` when an argument form
does not fit the canonical op (a symbolic size, a training-mode flag, a used
auxiliary output); the front end then keeps the node as ``torch.opaque``.

The context (``graphopt.frontends.torch.NodeContext``) provides:
``tensor(arg)``, ``optional(arg)``, ``tensors(args)``, ``operands(*args)``
(tensors and scalars, scalars as 0-d constants that keep torch's type
promotion), ``scalar(value, dtype)``, ``ints(arg)``, ``number(arg)``,
``shape(arg)`` (a reshape target, one symbolic entry becomes -1),
``expand_shape(x, arg)``, ``end_index(x, dim, arg)``, ``emit(op, inputs, **attrs)``
(the final node, typed from the fx node's fake value), ``inner(op, inputs,
**attrs)`` (an intermediate node, typed by inference), ``only_first_output()``,
``out_dtype``, ``on_cpu``, ``device_of(arg)``, ``producer_of(value)``, and the
op's ``target_name`` (``add``) and ``overload_name`` (``Tensor``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch

from graphopt.ir.ops.linalg import grouped_heads

aten = torch.ops.aten

Handler = Callable[[Any, dict[str, Any]], Any]
TABLE: dict[Any, Handler] = {}


class NotCanonical(Exception):
    """This call of the ATen op has no canonical form: keep it opaque."""


def converts(*overloads: str) -> Callable[[Handler], Handler]:
    """Register the handler for ``aten.<packet>.<overload>`` names (missing ones are skipped)."""

    def register(fn: Handler) -> Handler:
        for name in overloads:
            packet, overload = name.split(".")
            target = getattr(getattr(aten, packet, None), overload, None)
            if target is not None:
                TABLE[target] = fn
        return fn

    return register


def _expect(condition: bool) -> None:
    if not condition:
        raise NotCanonical


def _dims(dim: Any) -> list[int] | None:
    """A reduction's dims: ``None`` (and ``[]``, ATen's spelling of it) reduces everything."""
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    _expect(all(isinstance(d, int) for d in dims))
    return dims or None


def _per_dim(values: Any, n: int) -> list[int]:
    """Expand an ATen int list that may be given once for all ``n`` spatial dims."""
    values = list(values)
    _expect(all(isinstance(v, int) for v in values))
    return values * n if len(values) == 1 else values


# ---------------------------------------------------------------- elementwise
_UNARY = ["relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "neg", "abs", "erf", "sin", "cos", "tan",
          "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "reciprocal", "floor", "ceil",
          "round", "sign", "logical_not", "bitwise_not", "isnan", "silu", "mish", "selu", "hardswish"]


def _unary(op: str) -> Handler:
    def convert(cx, a):
        return cx.emit(op, [cx.tensor(a["self"])])

    return convert


for _name in _UNARY:
    converts(f"{_name}.default")(_unary(_name))


def _binary(op: str) -> Handler:
    def convert(cx, a):
        return cx.emit(op, cx.operands(a["self"], a["other"]))

    return convert


for _op, _packets in {
    "mul": ["mul"], "maximum": ["maximum"], "minimum": ["minimum"], "fmod": ["fmod"],
    "remainder": ["remainder"], "eq": ["eq"], "ne": ["ne"], "lt": ["lt"], "le": ["le"], "gt": ["gt"],
    "ge": ["ge"], "logical_and": ["logical_and"], "logical_or": ["logical_or"], "logical_xor": ["logical_xor"],
    "bitwise_and": ["bitwise_and"], "bitwise_or": ["bitwise_or"], "bitwise_xor": ["bitwise_xor"],
    "atan2": ["atan2"],
}.items():
    for _packet in _packets:
        converts(f"{_packet}.Tensor", f"{_packet}.Scalar", f"{_packet}.default")(_binary(_op))


def _scaled(cx, operand, alpha):
    """``alpha * operand`` for add/sub's ``alpha`` (no node when alpha is 1)."""
    if alpha == 1:
        return operand
    alpha = cx.number(alpha)
    return cx.inner("mul", [operand, cx.scalar(alpha, like=operand)])


@converts("add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar")
def _add_sub(cx, a):
    x, y = cx.operands(a["self"], a["other"])
    return cx.emit(cx.target_name, [x, _scaled(cx, y, a["alpha"])])


@converts("rsub.Tensor", "rsub.Scalar")
def _rsub(cx, a):
    x, y = cx.operands(a["self"], a["other"])
    return cx.emit("sub", [y, _scaled(cx, x, a["alpha"])])


@converts("div.Tensor", "div.Scalar", "div.Tensor_mode", "div.Scalar_mode")
def _div(cx, a):
    rounding = a.get("rounding_mode")
    attrs = {} if rounding is None else {"rounding_mode": rounding}
    return cx.emit("div", cx.operands(a["self"], a["other"]), **attrs)


@converts("floor_divide.default", "floor_divide.Scalar")
def _floor_divide(cx, a):
    return cx.emit("div", cx.operands(a["self"], a["other"]), rounding_mode="floor")


@converts("pow.Tensor_Tensor", "pow.Tensor_Scalar", "pow.Scalar")
def _pow(cx, a):
    return cx.emit("pow", cx.operands(a["self"], a["exponent"]))


@converts("where.self", "where.ScalarSelf", "where.ScalarOther", "where.Scalar")
def _where(cx, a):
    cond = cx.tensor(a["condition"])
    x, y = cx.operands(a["self"], a["other"])
    return cx.emit("where", [cond, x, y])


@converts("isinf.default")
def _isinf(cx, a):
    return cx.emit("isinf", [cx.tensor(a["self"])])


@converts("gelu.default")
def _gelu(cx, a):
    return cx.emit("gelu", [cx.tensor(a["self"])], approximate=a["approximate"])


@converts("leaky_relu.default")
def _leaky_relu(cx, a):
    return cx.emit("leaky_relu", [cx.tensor(a["self"])], negative_slope=cx.number(a["negative_slope"]))


@converts("elu.default")
def _elu(cx, a):
    _expect(a["scale"] == 1 and a["input_scale"] == 1)
    return cx.emit("elu", [cx.tensor(a["self"])], alpha=cx.number(a["alpha"]))


@converts("celu.default")
def _celu(cx, a):
    return cx.emit("celu", [cx.tensor(a["self"])], alpha=cx.number(a["alpha"]))


@converts("softplus.default")
def _softplus(cx, a):
    return cx.emit("softplus", [cx.tensor(a["self"])], beta=cx.number(a["beta"]),
                   threshold=cx.number(a["threshold"]))


@converts("hardsigmoid.default")
def _hardsigmoid(cx, a):
    return cx.emit("hardsigmoid", [cx.tensor(a["self"])])


@converts("clamp.default", "clamp_min.default", "clamp_max.default", "hardtanh.default", "relu6.default")
def _clamp(cx, a):
    low = a.get("min", a.get("min_val", 0 if cx.target_name == "relu6" else None))
    high = a.get("max", a.get("max_val", 6 if cx.target_name == "relu6" else None))
    attrs = {k: cx.number(v) for k, v in (("min", low), ("max", high)) if v is not None}
    return cx.emit("clamp", [cx.tensor(a["self"])], **attrs)


@converts("_to_copy.default")
def _to_copy(cx, a):
    x = cx.tensor(a["self"])
    _expect(a.get("device") is None or torch.device(a["device"]) == cx.device_of(a["self"]))
    _expect(a.get("layout") in (None, torch.strided))
    if a.get("dtype") is None or a["dtype"] == x.type.dtype:
        return cx.emit("identity", [x])
    return cx.emit("cast", [x], dtype=a["dtype"])


@converts("clone.default", "alias.default", "lift_fresh_copy.default", "contiguous.default")
def _identity(cx, a):
    return cx.emit("identity", [cx.tensor(a["self"])])


@converts("dropout.default")
def _dropout(cx, a):
    return cx.emit("dropout", [cx.tensor(a["input"])], p=cx.number(a["p"]), training=bool(a["train"]))


# --------------------------------------------------------------------- linalg
@converts("mm.default", "bmm.default", "matmul.default")
def _matmul(cx, a):
    x, y = cx.tensor(a["self"]), cx.tensor(a["mat2"] if "mat2" in a else a["other"])
    weight = _transposed_weight(cx, y) if cx.target_name == "mm" else None
    if weight is not None:
        return cx.emit("linear", [x, weight, None])
    return cx.emit("matmul", [x, y])


def _transposed_weight(cx, value):
    """``W`` when ``value`` is ``W.t()`` of a 2-D weight (a constant or graph input): an nn.Linear."""
    node = cx.producer_of(value)
    if node is None or node.op != "permute" or list(node.attrs["dims"]) != [1, 0]:
        return None
    weight = node.inputs[0]
    return weight if weight.producer is None else None


@converts("addmm.default")
def _addmm(cx, a):
    bias, x, y = cx.tensor(a["self"]), cx.tensor(a["mat1"]), cx.tensor(a["mat2"])
    alpha, beta = cx.number(a["alpha"]), cx.number(a["beta"])
    weight = _transposed_weight(cx, y)
    if weight is not None and alpha == 1 and beta == 1 and bias.type.rank == 1:
        return cx.emit("linear", [x, weight, bias])
    return cx.emit("gemm", [x, y, bias], alpha=alpha, beta=beta)


@converts("linear.default")
def _linear(cx, a):
    return cx.emit("linear", [cx.tensor(a["input"]), cx.tensor(a["weight"]), cx.optional(a["bias"])])


@converts("convolution.default")
def _convolution(cx, a):
    x, w = cx.tensor(a["input"]), cx.tensor(a["weight"])
    n = w.type.rank - 2
    return cx.emit("conv", [x, w, cx.optional(a["bias"])], stride=_per_dim(a["stride"], n),
                   padding=_per_dim(a["padding"], n), dilation=_per_dim(a["dilation"], n), groups=a["groups"],
                   transposed=bool(a["transposed"]), output_padding=_per_dim(a["output_padding"], n))


@converts("conv1d.default", "conv2d.default", "conv3d.default", "conv_transpose1d.default",
          "conv_transpose2d.input", "conv_transpose3d.input")
def _convnd(cx, a):
    x, w = cx.tensor(a["input"]), cx.tensor(a["weight"])
    n = w.type.rank - 2
    transposed = cx.target_name.startswith("conv_transpose")
    return cx.emit("conv", [x, w, cx.optional(a["bias"])], stride=_per_dim(a["stride"], n),
                   padding=_per_dim(a["padding"], n), dilation=_per_dim(a["dilation"], n), groups=a["groups"],
                   transposed=transposed, output_padding=_per_dim(a.get("output_padding", [0]), n))


@converts("einsum.default")
def _einsum(cx, a):
    return cx.emit("einsum", cx.tensors(a["tensors"]), equation=a["equation"])


def _sdpa(cx, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa=False):
    _expect(dropout_p == 0)
    cx.only_first_output()
    attrs = {"is_causal": bool(is_causal), "scale": None if scale is None else cx.number(scale)}
    q, k, v = cx.tensor(q), cx.tensor(k), cx.tensor(v)
    if enable_gqa or grouped_heads(q.type.shape, k.type.shape):
        attrs["enable_gqa"] = True
    return cx.emit("sdpa", [q, k, v, cx.optional(mask)], **attrs)


@converts("scaled_dot_product_attention.default")
def _sdpa_composite(cx, a):
    return _sdpa(cx, a["query"], a["key"], a["value"], a["attn_mask"], a["dropout_p"], a["is_causal"],
                 a["scale"], a["enable_gqa"])


@converts("_scaled_dot_product_flash_attention_for_cpu.default", "_scaled_dot_product_flash_attention.default",
          "_scaled_dot_product_attention_math.default")
def _sdpa_flash(cx, a):
    mask = a.get("attn_mask")
    _expect(a.get("dropout_mask") is None)
    return _sdpa(cx, a["query"], a["key"], a["value"], mask, a["dropout_p"], a["is_causal"], a["scale"],
                 a.get("enable_gqa", False))


@converts("_scaled_dot_product_efficient_attention.default", "_scaled_dot_product_cudnn_attention.default")
def _sdpa_with_bias(cx, a):
    return _sdpa(cx, a["query"], a["key"], a["value"], a["attn_bias"], a["dropout_p"], a["is_causal"],
                 a["scale"])


# ----------------------------------------------------------------------- norm
def _batch_norm(cx, a):
    if a.get("running_mean") is None and a.get("running_var") is None:
        return _batch_statistics_norm(cx, a)
    _expect(not a.get("training", False) and a["running_mean"] is not None and a["running_var"] is not None)
    cx.only_first_output()
    inputs = [cx.tensor(a["input"]), cx.optional(a["weight"]), cx.optional(a["bias"]),
              cx.tensor(a["running_mean"]), cx.tensor(a["running_var"])]
    return cx.emit("batch_norm", inputs, eps=cx.number(a["eps"]))


def _batch_statistics_norm(cx, a):
    """Batch norm with no running statistics normalises with the batch's own (biased) ones.

    timm's weight standardisation (NFNets' ``ScaledStdConv2d``) applies it to a conv weight
    reshaped to ``[1, out, -1]``; in primitive ops its statistics are plain reductions.
    """
    cx.only_first_output()
    x = cx.tensor(a["input"])
    _expect(x.type.rank >= 2 and x.type.dtype.is_floating_point)
    dims = [d for d in range(x.type.rank) if d != 1]
    channel = [-1] + [1] * (x.type.rank - 2)
    mean = cx.inner("mean", [x], dims=dims, keepdim=True)
    var = cx.inner("var", [x], dims=dims, correction=0, keepdim=True)
    eps = cx.scalar(cx.number(a["eps"]), dtype=x.type.dtype)
    y = cx.inner("mul", [cx.inner("sub", [x, mean]), cx.inner("rsqrt", [cx.inner("add", [var, eps])])])
    weight, bias = cx.optional(a["weight"]), cx.optional(a["bias"])
    if weight is not None:
        y = cx.inner("mul", [y, cx.inner("reshape", [weight], shape=channel)])
    if bias is not None:
        y = cx.inner("add", [y, cx.inner("reshape", [bias], shape=channel)])
    return cx.emit("identity", [y])


converts("_native_batch_norm_legit_no_training.default", "_native_batch_norm_legit.default",
         "_native_batch_norm_legit.no_stats", "native_batch_norm.default", "batch_norm.default")(_batch_norm)


@converts("native_layer_norm.default", "layer_norm.default")
def _layer_norm(cx, a):
    cx.only_first_output()
    return cx.emit("layer_norm", [cx.tensor(a["input"]), cx.optional(a["weight"]), cx.optional(a["bias"])],
                   normalized_shape=cx.ints(a["normalized_shape"]), eps=cx.number(a["eps"]))


@converts("native_group_norm.default", "group_norm.default")
def _group_norm(cx, a):
    cx.only_first_output()
    groups = a["group"] if "group" in a else a["num_groups"]
    return cx.emit("group_norm", [cx.tensor(a["input"]), cx.optional(a["weight"]), cx.optional(a["bias"])],
                   num_groups=groups, eps=cx.number(a["eps"]))


@converts("rms_norm.default")
def _rms_norm(cx, a):
    eps = a["eps"]
    return cx.emit("rms_norm", [cx.tensor(a["input"]), cx.optional(a["weight"])],
                   normalized_shape=cx.ints(a["normalized_shape"]), eps=None if eps is None else cx.number(eps))


def _softmax(op: str) -> Handler:
    def convert(cx, a):
        x = cx.tensor(a["self"])
        _expect(not a.get("half_to_float", False))
        if a.get("dtype") is not None:
            x = cx.inner("cast", [x], dtype=a["dtype"])
        return cx.emit(op, [x], dim=a["dim"])

    return convert


converts("_softmax.default", "softmax.int")(_softmax("softmax"))
converts("_log_softmax.default", "log_softmax.int")(_softmax("log_softmax"))


# ----------------------------------------------------------------- reductions
def _with_dtype(cx, a):
    """The reduced tensor, cast first when the op accumulates in a requested dtype."""
    x = cx.tensor(a["self"])
    dtype = a.get("dtype")
    return x if dtype is None or dtype == x.type.dtype else cx.inner("cast", [x], dtype=dtype)


def _reduction(op: str) -> Handler:
    def convert(cx, a):
        attrs = {"dims": _dims(a.get("dim")), "keepdim": bool(a.get("keepdim", False))}
        dtype = a.get("dtype")
        if op in ("sum", "prod") and dtype is not None and not dtype.is_floating_point and dtype != torch.int64:
            # the IR's sum/prod accumulate integers in int64, as torch's do unless told a dtype
            return cx.emit("cast", [cx.inner(op, [_with_dtype(cx, a)], **attrs)], dtype=dtype)
        return cx.emit(op, [_with_dtype(cx, a)], **attrs)

    return convert


for _op, _names in {
    "sum": ["sum.dim_IntList", "sum.default"], "mean": ["mean.dim", "mean.default"],
    "amax": ["amax.default"], "amin": ["amin.default"], "prod": ["prod.dim_int", "prod.default"],
    "any": ["any.dim", "any.dims", "any.default"], "all": ["all.dim", "all.dims", "all.default"],
}.items():
    converts(*_names)(_reduction(_op))


@converts("var.correction", "var.dim", "var.default")
def _var(cx, a):
    if "correction" in a:
        correction = 1 if a["correction"] is None else cx.number(a["correction"])
    else:
        correction = 1 if a.get("unbiased", True) else 0
    return cx.emit("var", [cx.tensor(a["self"])], dims=_dims(a.get("dim")), correction=correction,
                   keepdim=bool(a.get("keepdim", False)))


@converts("argmax.default", "argmin.default")
def _arg_reduction(cx, a):
    _expect(isinstance(a["dim"], int))
    return cx.emit(cx.target_name, [cx.tensor(a["self"])], dim=a["dim"], keepdim=bool(a["keepdim"]))


@converts("cumsum.default")
def _cumsum(cx, a):
    return cx.emit("cumsum", [_with_dtype(cx, a)], dim=a["dim"])


@converts("topk.default")
def _topk(cx, a):
    return cx.emit("topk", [cx.tensor(a["self"])], k=cx.number(a["k"]), dim=a["dim"], largest=bool(a["largest"]),
                   sorted=bool(a["sorted"]))


# ---------------------------------------------------------------------- shape
@converts("view.default", "_unsafe_view.default", "reshape.default")
def _reshape(cx, a):
    return cx.emit("reshape", [cx.tensor(a["self"])], shape=cx.shape(a["size"] if "size" in a else a["shape"]))


@converts("as_strided.default")
def _as_strided(cx, a):
    """Only the form that is a reshape: AOTAutograd replays some views (an output aliasing an input)
    as ``as_strided`` with the contiguous strides of the new size over a contiguous input."""
    source, size, stride = a["self"], list(a["size"]), list(a["stride"])
    value = source.meta.get("val") if hasattr(source, "meta") else None
    _expect(isinstance(value, torch.Tensor) and all(isinstance(d, int) for d in (*size, *stride)))
    offset = a["storage_offset"] if a["storage_offset"] is not None else value.storage_offset()
    _expect(value.is_contiguous() and offset == value.storage_offset() and value.numel() == math.prod(size))
    _expect(all(st == math.prod(size[k + 1:]) for k, (d, st) in enumerate(zip(size, stride)) if d != 1))
    return cx.emit("reshape", [cx.tensor(source)], shape=size)


@converts("permute.default")
def _permute(cx, a):
    return cx.emit("permute", [cx.tensor(a["self"])], dims=cx.ints(a["dims"]))


@converts("t.default")
def _t(cx, a):
    x = cx.tensor(a["self"])
    if x.type.rank < 2:
        return cx.emit("identity", [x])
    return cx.emit("permute", [x], dims=[1, 0])


@converts("transpose.int")
def _transpose(cx, a):
    x = cx.tensor(a["self"])
    rank = x.type.rank
    dims = list(range(rank))
    i, j = a["dim0"] % rank, a["dim1"] % rank
    dims[i], dims[j] = dims[j], dims[i]
    return cx.emit("permute", [x], dims=dims)


@converts("expand.default")
def _expand(cx, a):
    x = cx.tensor(a["self"])
    return cx.emit("expand", [x], shape=cx.expand_shape(x, a["size"]))


@converts("squeeze.dim", "squeeze.dims", "squeeze.default")
def _squeeze(cx, a):
    return cx.emit("squeeze", [cx.tensor(a["self"])], dims=_dims(a.get("dim")))


@converts("unsqueeze.default")
def _unsqueeze(cx, a):
    return cx.emit("unsqueeze", [cx.tensor(a["self"])], dims=[a["dim"]])


@converts("flatten.using_ints")
def _flatten(cx, a):
    return cx.emit("flatten", [cx.tensor(a["self"])], start_dim=a["start_dim"], end_dim=a["end_dim"])


@converts("slice.Tensor")
def _slice(cx, a):
    x = cx.tensor(a["self"])
    dim = a["dim"] % x.type.rank
    start = 0 if a["start"] is None else a["start"]
    _expect(isinstance(start, int) and isinstance(a["step"], int))
    return cx.emit("slice", [x], dim=dim, start=start, end=cx.end_index(x, dim, a["end"]), step=a["step"])


@converts("slice_scatter.default")
def _slice_scatter(cx, a):
    """``x[start:end:step] = src`` along ``dim`` (static size), in canonical ops.

    Step 1 is x's slices around ``src``, concatenated. A larger step that writes one
    element of every group of ``step`` (Wan's and HunyuanVideo's rotary embeddings
    interleave two halves so) is the same on x with ``dim`` split into groups: one
    concat, whose x-slices cleanup folds away when the next write fills them
    (``_interleaved``). Any other step spreads ``src`` over the dim and picks it with a
    constant mask; Swin writes its shifted-window mask this way, and in canonical ops
    the mask folds to a constant.
    """
    x, src = cx.tensor(a["self"]), cx.tensor(a["src"])
    dim = a["dim"] % x.type.rank
    n = x.type.shape[dim]
    start, end, step = 0 if a["start"] is None else a["start"], a["end"], a["step"]
    _expect(isinstance(n, int) and isinstance(step, int) and step > 0 and isinstance(start, int)
            and (end is None or isinstance(end, int)) and src.type.dtype == x.type.dtype)
    positions = range(n)[start:end:step]
    if not positions:
        return cx.emit("identity", [x])
    if step == 1:
        parts = [cx.inner("slice", [x], dim=dim, start=0, end=positions.start, step=1)] if positions.start else []
        parts.append(src)
        if positions.stop < n:
            parts.append(cx.inner("slice", [x], dim=dim, start=positions.stop, end=n, step=1))
        return cx.emit("concat", parts, dim=dim) if len(parts) > 1 else cx.emit("identity", [src])
    if positions.start < step and len(positions) * step == n and sum(not isinstance(d, int) for d in x.type.shape) <= 1:
        return _interleaved(cx, x, src, dim, positions.start, step)
    written = torch.zeros(n, dtype=torch.bool)
    written[positions.start:positions.stop:step] = True
    spread = ((torch.arange(n) - positions.start) // step).clamp(0, len(positions) - 1)
    view = [n if d == dim else 1 for d in range(x.type.rank)]
    mask = cx.graph.add_constant(written.reshape(view), f"{cx.node.name}_written")
    return cx.emit("where", [mask, _spread(cx, x, src, dim, positions, spread), x])


def _interleaved(cx, x, src, dim: int, start: int, step: int):
    """``x`` with ``dim`` split into (groups, ``step``), ``src`` as member ``start`` of every group: one concat
    of x's other members around ``src``. The where-over-a-spread form it replaces read x, ``src`` repeated and
    the mask for every write, and cost Wan's captured transformer a quarter of its time."""
    shape = [d if isinstance(d, int) else -1 for d in x.type.shape]
    grouped = cx.inner("reshape", [x], shape=[*shape[:dim], shape[dim] // step, step, *shape[dim + 1:]])
    parts = [cx.inner("slice", [grouped], dim=dim + 1, start=0, end=start, step=1)] if start else []
    parts.append(cx.inner("unsqueeze", [src], dims=[dim + 1]))
    if start + 1 < step:
        parts.append(cx.inner("slice", [grouped], dim=dim + 1, start=start + 1, end=step, step=1))
    return cx.emit("reshape", [cx.inner("concat", parts, dim=dim + 1)], shape=shape)


def _spread(cx, x, src, dim: int, positions: range, spread: torch.Tensor):
    """``src`` along ``dim`` at x's size, element ``k`` at least at ``positions[k]`` (the rest is masked)."""
    m, step, n = len(positions), positions.step, x.type.shape[dim]
    shape = [m * step if d == dim else size for d, size in enumerate(src.type.shape)]
    if positions.start >= step or sum(not isinstance(size, int) for size in shape) > 1:
        return cx.inner("index_select", [src, cx.graph.add_constant(spread, f"{cx.node.name}_spread")], dim=dim)
    repeated = cx.inner("unsqueeze", [src], dims=[dim + 1])
    repeated = cx.inner("concat", [repeated] * step, dim=dim + 1)
    repeated = cx.inner("reshape", [repeated], shape=[size if isinstance(size, int) else -1 for size in shape])
    if m * step > n:
        return cx.inner("slice", [repeated], dim=dim, start=0, end=n, step=1)
    if m * step < n:
        filler = cx.inner("slice", [x], dim=dim, start=m * step, end=n, step=1)
        return cx.inner("concat", [repeated, filler], dim=dim)
    return repeated


@converts("copy.default")
def _copy(cx, a):
    """The value ``x.copy_(src)`` leaves: ``src`` in x's dtype, as is when it has x's shape (symbolic sizes
    too), else broadcast to x's static shape."""
    x, src = cx.tensor(a["self"]), cx.tensor(a["src"])
    _expect(cx.device_of(a["src"]) == cx.device_of(a["self"]))
    if src.type.dtype != x.type.dtype:
        src = cx.inner("cast", [src], dtype=x.type.dtype)
    if tuple(src.type.shape) == tuple(x.type.shape):
        return cx.emit("identity", [src])
    _expect(x.type.is_static)
    return cx.emit("expand", [src], shape=list(x.type.shape))


@converts("select.int")
def _select(cx, a):
    _expect(isinstance(a["index"], int))
    return cx.emit("select", [cx.tensor(a["self"])], dim=a["dim"], index=a["index"])


@converts("index_select.default")
def _index_select(cx, a):
    return cx.emit("index_select", [cx.tensor(a["self"]), cx.tensor(a["index"])], dim=a["dim"])


@converts("gather.default")
def _gather(cx, a):
    return cx.emit("gather", [cx.tensor(a["self"]), cx.tensor(a["index"])], dim=a["dim"])


@converts("index.Tensor")
def _index(cx, a):
    """``x[:, idx]`` with one integer index tensor is a ``take`` along that axis; several are an ``index``.

    Bool masks stay opaque: their result shape depends on the data.
    """
    dims = [k for k, i in enumerate(a["indices"]) if i is not None]
    indices = [cx.tensor(a["indices"][k]) for k in dims]
    _expect(bool(dims) and all(i.type.dtype in (torch.int64, torch.int32) for i in indices))
    if len(dims) == 1:
        return cx.emit("take", [cx.tensor(a["self"]), indices[0]], axis=dims[0])
    return cx.emit("index", [cx.tensor(a["self"]), *indices], dims=dims)


@converts("embedding.default")
def _embedding(cx, a):
    return cx.emit("embedding", [cx.tensor(a["weight"]), cx.tensor(a["indices"])])


@converts("cat.default")
def _cat(cx, a):
    return cx.emit("concat", cx.tensors(a["tensors"]), dim=a["dim"])


@converts("stack.default")
def _stack(cx, a):
    return cx.emit("stack", cx.tensors(a["tensors"]), dim=a["dim"])


@converts("split_with_sizes.default", "split.Tensor")
def _split(cx, a):
    x = cx.tensor(a["self"])
    dim = a["dim"] % x.type.rank
    if "split_sizes" in a:
        sizes = cx.ints(a["split_sizes"])
    else:
        total, step = x.type.shape[dim], a["split_size"]
        _expect(isinstance(total, int) and isinstance(step, int) and step > 0)
        sizes = [min(step, total - start) for start in range(0, total, step)] or [0]
    return cx.emit("split", [x], dim=dim, sizes=sizes)


@converts("constant_pad_nd.default")
def _constant_pad(cx, a):
    return cx.emit("pad", [cx.tensor(a["self"])], pads=cx.ints(a["pad"]), mode="constant",
                   value=cx.number(a["value"]))


@converts("repeat.default")
def _repeat(cx, a):
    return cx.emit("repeat", [cx.tensor(a["self"])], repeats=cx.ints(a["repeats"]))


@converts("flip.default")
def _flip(cx, a):
    return cx.emit("flip", [cx.tensor(a["self"])], dims=cx.ints(a["dims"]))


@converts("roll.default")
def _roll(cx, a):
    _expect(len(a["dims"]) > 0)
    return cx.emit("roll", [cx.tensor(a["self"])], shifts=cx.ints(a["shifts"]), dims=cx.ints(a["dims"]))


@converts("tril.default", "triu.default")
def _triangle(cx, a):
    return cx.emit(cx.target_name, [cx.tensor(a["self"])], diagonal=a["diagonal"])


# ------------------------------------------------------------------------- nn
def _spatial_rank(cx) -> int:
    """1, 2 or 3: the digit of ``max_pool2d_with_indices`` and friends."""
    return int(re.search(r"(\d)d", cx.target_name).group(1))


@converts("max_pool1d.default", "max_pool2d.default", "max_pool3d.default", "max_pool2d_with_indices.default",
          "max_pool3d_with_indices.default")
def _max_pool(cx, a):
    cx.only_first_output()
    n = _spatial_rank(cx)
    kernel = _per_dim(a["kernel_size"], n)
    stride = _per_dim(a["stride"], n) if len(a["stride"]) else kernel
    return cx.emit("max_pool", [cx.tensor(a["self"])], kernel_size=kernel, stride=stride,
                   padding=_per_dim(a["padding"], n), dilation=_per_dim(a["dilation"], n),
                   ceil_mode=bool(a["ceil_mode"]))


@converts("avg_pool1d.default", "avg_pool2d.default", "avg_pool3d.default")
def _avg_pool(cx, a):
    n = _spatial_rank(cx)
    kernel = _per_dim(a["kernel_size"], n)
    stride = _per_dim(a["stride"], n) if len(a["stride"]) else kernel
    return cx.emit("avg_pool", [cx.tensor(a["self"])], kernel_size=kernel, stride=stride,
                   padding=_per_dim(a["padding"], n), ceil_mode=bool(a["ceil_mode"]),
                   count_include_pad=bool(a["count_include_pad"]), divisor_override=a.get("divisor_override"))


@converts("_adaptive_avg_pool2d.default", "adaptive_avg_pool2d.default", "_adaptive_avg_pool3d.default",
          "adaptive_avg_pool3d.default", "adaptive_avg_pool1d.default")
def _adaptive_avg_pool(cx, a):
    return cx.emit("adaptive_avg_pool", [cx.tensor(a["self"])], output_size=cx.ints(a["output_size"]))


_UPSAMPLE_MODES = {
    "upsample_nearest1d": "nearest", "upsample_nearest2d": "nearest", "upsample_nearest3d": "nearest",
    "_upsample_nearest_exact1d": "nearest-exact", "_upsample_nearest_exact2d": "nearest-exact",
    "_upsample_nearest_exact3d": "nearest-exact", "upsample_linear1d": "linear",
    "upsample_bilinear2d": "bilinear", "upsample_trilinear3d": "trilinear", "upsample_bicubic2d": "bicubic",
}


def _upsample(cx, a):
    """The ``.vec`` overloads are F.interpolate's own call: a size or scale factors, not both."""
    size, scales = a["output_size"], a.get("scale_factors")
    if cx.overload_name != "vec":
        _expect(all(a.get(k) is None for k in ("scales", "scales_d", "scales_h", "scales_w")))
        scales = None
    attrs = {"size": None if size is None else cx.ints(size),
             "scale_factor": None if scales is None else [float(cx.number(s)) for s in scales],
             "mode": _UPSAMPLE_MODES[cx.target_name]}
    if "align_corners" in a:
        attrs["align_corners"] = bool(a["align_corners"])
    return cx.emit("interpolate", [cx.tensor(a["input"] if "input" in a else a["self"])], **attrs)


for _packet in _UPSAMPLE_MODES:
    converts(f"{_packet}.vec", f"{_packet}.default")(_upsample)


# ------------------------------------------------------------------- creation
def _creation_dtype(cx, a):
    _expect(cx.on_cpu)
    return cx.out_dtype


@converts("full.default", "zeros.default", "ones.default", "scalar_tensor.default")
def _full(cx, a):
    value = {"zeros": 0, "ones": 1}.get(cx.target_name, a.get("fill_value", a.get("s")))
    shape = cx.ints(a["size"]) if "size" in a else []
    return cx.emit("full", [], shape=shape, value=cx.number(value), dtype=_creation_dtype(cx, a))


@converts("new_full.default", "new_zeros.default", "new_ones.default")
def _new_full(cx, a):
    value = {"new_zeros": 0, "new_ones": 1}.get(cx.target_name, a.get("fill_value"))
    return cx.emit("full", [], shape=cx.ints(a["size"]), value=cx.number(value), dtype=_creation_dtype(cx, a))


@converts("full_like.default", "zeros_like.default", "ones_like.default")
def _full_like(cx, a):
    value = {"zeros_like": 0, "ones_like": 1}.get(cx.target_name, a.get("fill_value"))
    dtype = _creation_dtype(cx, a)
    return cx.emit("full_like", [cx.tensor(a["self"])], value=cx.number(value), dtype=dtype)


@converts("arange.default", "arange.start", "arange.start_step")
def _arange(cx, a):
    start, step = a.get("start", 0), a.get("step", 1)
    return cx.emit("arange", [], start=cx.number(start), end=cx.number(a["end"]), step=cx.number(step),
                   dtype=_creation_dtype(cx, a))


NOT_IMPORTED: dict[str, str] = {
    "broadcast_to": "ONNX Expand's runtime shape tensor; ATen's expand has its sizes and becomes expand",
    "contiguous": "fx graphs carry no memory format: clone and contiguous become identity (the layout passes add it)",
    "shape": "ATen sizes are SymInts of the fx graph, never a shape tensor",
}
"""Canonical ops no ATen overload converts to, and why (the registry coverage test reads this)."""
