"""Pointwise ops: unary, binary with numpy/torch broadcasting, where, casts.

Binary ops follow torch type promotion; front ends turn scalar operands into
0-d constants so every operand is a graph value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import OpDef, register_op


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


_LAYOUT_BLIND = frozenset({"relu", "sigmoid", "tanh", "silu", "hardswish", "hardsigmoid", "gelu", "leaky_relu",
                           "clamp", "elu", "mish", "add", "sub", "mul", "maximum", "minimum", "identity"})
"""Pointwise ops that keep zero padding finite, so they run on blocked (NCHWc) tensors as they are."""


def _unary(name: str, fn, doc: str = "") -> None:
    # ``fn`` itself is the impl: a named, importable function, so emitted fx code reads ``torch.relu(x)``;
    # its own keyword arguments (``inplace``) are not IR attributes.
    register_op(OpDef(name, fn, category="elementwise", doc=doc, attrs=(), layout_blind=name in _LAYOUT_BLIND,
                      moves_entries=name == "identity", view=name == "identity"))


for _name, _fn in {
    "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp, "log": torch.log,
    "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "neg": torch.neg, "abs": torch.abs, "erf": torch.erf,
    "sin": torch.sin, "cos": torch.cos, "tan": torch.tan, "asin": torch.asin, "acos": torch.acos,
    "atan": torch.atan, "sinh": torch.sinh, "cosh": torch.cosh, "asinh": torch.asinh, "acosh": torch.acosh,
    "atanh": torch.atanh, "reciprocal": torch.reciprocal, "floor": torch.floor, "ceil": torch.ceil,
    "round": torch.round, "sign": torch.sign, "logical_not": torch.logical_not,
    "bitwise_not": torch.bitwise_not, "isnan": torch.isnan, "silu": F.silu, "mish": F.mish,
    "selu": torch.selu, "hardswish": F.hardswish, "identity": identity,
}.items():
    _unary(_name, _fn)


_COMMUTATIVE = frozenset({"add", "mul", "maximum", "minimum", "eq", "ne", "logical_and", "logical_or",
                          "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor"})
_IDENTITY_ELEMENT = {"add": 0.0, "sub": 0.0, "mul": 1.0}


def _binary(name: str, fn) -> None:
    register_op(OpDef(name, fn, category="elementwise", attrs=(), commutative=name in _COMMUTATIVE,
                      identity_element=_IDENTITY_ELEMENT.get(name), layout_blind=name in _LAYOUT_BLIND))


for _name, _fn in {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum, "fmod": torch.fmod, "remainder": torch.remainder,
    "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
    "logical_and": torch.logical_and, "logical_or": torch.logical_or, "logical_xor": torch.logical_xor,
    "bitwise_and": torch.bitwise_and, "bitwise_or": torch.bitwise_or, "bitwise_xor": torch.bitwise_xor,
    "atan2": torch.atan2,
}.items():
    _binary(_name, _fn)


def div(a: torch.Tensor, b: torch.Tensor, rounding_mode: str | None = None) -> torch.Tensor:
    """True division, or ``"trunc"``/``"floor"`` rounding (integer division)."""
    return torch.div(a, b, rounding_mode=rounding_mode)


def where(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(cond, a, b)


def isinf(x: torch.Tensor, detect_positive: bool = True, detect_negative: bool = True) -> torch.Tensor:
    if detect_positive and detect_negative:
        return torch.isinf(x)
    if detect_positive:
        return torch.isposinf(x)
    if detect_negative:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Gaussian error linear unit, exact (erf) or ``"tanh"`` approximation."""
    return F.gelu(x, approximate=approximate)


def leaky_relu(x: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    return F.leaky_relu(x, negative_slope)


def elu(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    return F.elu(x, alpha)


def celu(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    return F.celu(x, alpha)


def softplus(x: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    return F.softplus(x, beta, threshold)


def hardsigmoid(x: torch.Tensor, alpha: float = 1 / 6, beta: float = 0.5) -> torch.Tensor:
    """``clamp(alpha * x + beta, 0, 1)``: torch's form is alpha=1/6, ONNX's default alpha=0.2."""
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


def clamp(x: torch.Tensor, min: float | None = None, max: float | None = None) -> torch.Tensor:
    """Clamp by constant bounds (tensor bounds are ``maximum``/``minimum``)."""
    return torch.clamp(x, min, max)


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype)


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = False) -> torch.Tensor:
    """Dropout; the identity in inference (``training=False``), which cleanup removes."""
    return F.dropout(x, p, training)


def _dropout_is_pure(node) -> bool:
    """Training-mode dropout draws random numbers; in inference mode, or with ``p=0``, it is deterministic."""
    return not node.attrs["training"] or node.attrs["p"] == 0


for _fn, _cat in [(div, "elementwise"), (where, "elementwise"), (isinf, "elementwise"), (gelu, "elementwise"),
                  (leaky_relu, "elementwise"), (elu, "elementwise"), (celu, "elementwise"),
                  (softplus, "elementwise"), (hardsigmoid, "elementwise"), (clamp, "elementwise"),
                  (cast, "elementwise"), (dropout, "elementwise")]:
    register_op(OpDef(_fn.__name__, _fn, category=_cat, doc=(_fn.__doc__ or "").strip(),
                      pure=_fn is not dropout, pure_when=_dropout_is_pure if _fn is dropout else None,
                      identity_element=1.0 if _fn is div else None,
                      layout_blind=_fn.__name__ in _LAYOUT_BLIND))
