"""ONNX rows for onnxruntime's contrib ops (domain ``com.microsoft``): the ``ort.*`` IR ops, written as they are.

Which groups become these ops is decided by the ``fuse_onnxruntime_contrib``
pass (``graphopt.passes.onnxruntime_contrib``), which also holds their torch
references; this module only spells them in ONNX.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from graphopt.ir import Node

from .onnx import OnnxEmitter

DOMAIN = "com.microsoft"
CONV_ACTIVATIONS: dict[str, Callable[[dict], tuple[str, list[float]] | None]] = {
    "relu": lambda a: ("Relu", []),
    "sigmoid": lambda a: ("Sigmoid", []),
    "tanh": lambda a: ("Tanh", []),
    "leaky_relu": lambda a: ("LeakyRelu", [float(a.get("negative_slope", 0.01))]),
    "hardsigmoid": lambda a: ("HardSigmoid", [float(a.get("alpha", 1 / 6)), float(a.get("beta", 0.5))]),
    "clamp": lambda a: (None if a.get("min") is None or a.get("max") is None
                        else ("Clip", [float(a["min"]), float(a["max"])])),
}
"""IR activations onnxruntime's fused convolutions can apply: from the activation's attributes, its onnxruntime
name and parameters (None: not with these attributes)."""


def add_contrib(e: OnnxEmitter, op_type: str, ins: list, outs: list | int, **attrs) -> list[str]:
    """One node of onnxruntime's ``com.microsoft`` domain, imported into the model."""
    e.extra_opsets[DOMAIN] = 1
    return e.add(op_type, ins, outs, domain=DOMAIN, **attrs)


def activation_attributes(node: Node) -> dict:
    """The ``activation`` and ``activation_params`` attributes of a fused convolution (``ort.fused_conv``, and
    ``ort.nchwc.conv``), from the IR activation it names."""
    name = node.attrs["activation"]
    if name is None:
        return {}
    op_type, params = CONV_ACTIVATIONS[name](node.attrs["activation_attrs"] or {})
    return {"activation": op_type, "activation_params": params or None}


def _fused_conv(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    from .onnx_table import conv_attributes

    x, w, b, z = (ins + [""] * 4)[:4]
    add_contrib(e, "FusedConv", [x, w, b, z] if z else [x, w, b], outs, **conv_attributes(n),
                **activation_attributes(n))


def _skip_norm(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    """The sum is the fourth output, written only when something reads it."""
    op_type = "SkipLayerNormalization" if n.attrs["norm"] == "layer_norm" else "SkipSimplifiedLayerNormalization"
    y, total = outs
    total_read = n.outputs[1].uses() or n.outputs[1].is_graph_output
    add_contrib(e, op_type, [i for i in ins if i], [y, "", "", total] if total_read else [y], epsilon=_epsilon(n))


def _simplified_layer_norm(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    x = n.inputs[0]
    scale = ins[1] if len(ins) > 1 and ins[1] else e.const(torch.ones(x.type.shape[-1]), hint="rms_weight")
    e.add("SimplifiedLayerNormalization", [ins[0], scale], outs, axis=-1, epsilon=_epsilon(n))


def _epsilon(norm: Node) -> float:
    eps = norm.attrs["eps"]
    return float(torch.finfo(norm.outputs[0].type.dtype).eps if eps is None else eps)


def _quick_gelu(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    add_contrib(e, "QuickGelu", ins, outs, alpha=float(n.attrs["alpha"]))


def _gelu(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    add_contrib(e, "FastGelu" if n.attrs["approximate"] == "tanh" else "Gelu", ins, outs)


def _attention_fused_matmul(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    from .onnx_table import attention_probabilities

    q, k, v, *rest = ins
    mask = n.inputs[3] if len(n.inputs) > 3 and n.inputs[3] is not None else None
    dtype = n.output.type.dtype
    scores = add_contrib(e, "FusedMatMul", [q, k], 1, transB=1, alpha=float(n.attrs["scale"]))[0]
    if mask is not None:
        if mask.type.dtype == torch.bool:
            scores = e.add1("Where", [rest[0], scores, e.const(float("-inf"), dtype)])
        else:
            scores = e.add1("Add", [scores, e.cast(rest[0], mask.type.dtype, dtype)])
    probs = attention_probabilities(e, scores, mask is not None, dtype)
    e.add("MatMul", [probs, v], outs)


ROWS = {
    "ort.fused_conv": _fused_conv,
    "ort.skip_norm": _skip_norm,
    "ort.simplified_layer_norm": _simplified_layer_norm,
    "ort.quick_gelu": _quick_gelu,
    "ort.gelu": _gelu,
    "ort.attention_fused_matmul": _attention_fused_matmul,
}
"""The emitter table's rows for the contrib ops; every one but SimplifiedLayerNormalization is in ``DOMAIN``."""
