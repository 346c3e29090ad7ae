"""Rewrites onto onnxruntime's contrib ops (domain ``com.microsoft``): the ``onnxruntime`` target's pipeline.

Standard ONNX has no op for a convolution with its epilogue, a residual add
fused into a LayerNorm, or a matmul that transposes and scales its operand;
onnxruntime does, and its own offline optimiser (``ORT_ENABLE_EXTENDED``)
rewrites into them. ``fuse_onnxruntime_contrib`` puts them in the IR, so a
model emitted for onnxruntime runs fused even when the session's own graph
optimisations are off, and the report says what fired. Each op is an IR op
(``ort.*``) with a torch reference, so the rewritten graph still runs and
verifies in torch; ``graphopt.emitters.onnxruntime_ops`` writes them. The
rewrites, with the IR pattern each one replaces:

- ``ort.fused_conv`` (FusedConv): conv → [add of a same-shaped tensor] →
  [relu, sigmoid, tanh, leaky_relu, hardsigmoid, clamp]; ``act(conv(x) + b + z)``.
- ``ort.skip_norm`` (SkipLayerNormalization / SkipSimplifiedLayerNormalization):
  add → layer_norm / rms_norm over the last dim of a 3-D tensor; its second
  output is the sum, so a residual stream that reads the sum keeps it. Not on
  CPU when the sum is read elsewhere (pre-LN blocks): there onnxruntime 1.32's
  kernel with the sum output was slower than Add + LayerNormalization (timm
  ViT-Ti, 2 threads: 13.8 ms against 12.2 ms at batch 8).
- ``ort.simplified_layer_norm`` (SimplifiedLayerNormalization, registered by
  onnxruntime in the default domain): rms_norm over the last dim, below opset
  23's RMSNormalization.
- ``ort.quick_gelu`` (QuickGelu, ``x * sigmoid(alpha x)``, alpha 1): silu.
- ``ort.gelu`` (Gelu / FastGelu): gelu below opset 20, where standard ONNX has none.
- ``ort.attention_fused_matmul`` (FusedMatMul → [mask] → Softmax → MatMul):
  sdpa below opset 23, the ``q kᵀ · scale`` transposed and scaled inside the matmul.

Only float32 tensors are rewritten: onnxruntime's CPU kernels for these ops are
float32 (others exist for CUDA only). A fused group never hides a value that
something outside the group reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphopt.emitters.onnx import DEFAULT_OPSET
from graphopt.emitters.onnxruntime_ops import CONV_ACTIVATIONS
from graphopt.ir import Graph, Node, OpDef, TensorType, Value, get_op, register_op
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass

from .fusion import sole_reader


# ------------------------------------------------------------------ the ops
def fused_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, z: torch.Tensor | None = None,
               stride=(1,), padding=(0,), dilation=(1,), groups: int = 1, activation: str | None = None,
               activation_attrs: dict | None = None) -> torch.Tensor:
    """``activation(conv(x, w, b) + z)``; ``activation`` names an IR op, called with ``activation_attrs``."""
    y = get_op("conv").torch_impl(x, w, b, stride, padding, dilation, groups)
    if z is not None:
        y = y + z
    return y if activation is None else get_op(activation).torch_impl(y, **(activation_attrs or {}))


def _skip_norm(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               norm: str, normalized_shape=(), eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(a + b), a + b)``: the normalised residual stream and the stream itself (``norm``: layer_norm or
    rms_norm, which has no bias)."""
    s = a + b
    params = (weight, bias) if norm == "layer_norm" else (weight,)
    return get_op(norm).torch_impl(s, *params, normalized_shape=normalized_shape, eps=eps), s


def _quick_gelu(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    return x * torch.sigmoid(alpha * x)


def _register_contrib_ops() -> None:
    conv, sdpa = get_op("conv"), get_op("sdpa")
    for opdef in [
        OpDef("ort.fused_conv", fused_conv, category="conv", flops=conv.flops, doc=fused_conv.__doc__),
        OpDef("ort.skip_norm", _skip_norm, category="norm", num_outputs=2, doc=_skip_norm.__doc__),
        OpDef("ort.simplified_layer_norm", get_op("rms_norm").torch_impl, category="norm",
              doc="rms_norm over the last dim, as onnxruntime's SimplifiedLayerNormalization"),
        OpDef("ort.quick_gelu", _quick_gelu, doc="x * sigmoid(alpha x)"),
        OpDef("ort.gelu", get_op("gelu").torch_impl, doc="gelu, as onnxruntime's Gelu or FastGelu (tanh)"),
        OpDef("ort.attention_fused_matmul", sdpa.torch_impl, category="attention", flops=sdpa.flops,
              doc="sdpa with an explicit scale, as FusedMatMul(q, k, transB, alpha) → [mask] → Softmax → MatMul"),
    ]:
        register_op(opdef)


_register_contrib_ops()


# ------------------------------------------------------------------ the pass
@register_pass
@dataclass
class FuseOnnxruntimeContrib(Pass):
    """Rewrite fusable groups into onnxruntime's contrib ops (the ``onnxruntime`` target).

    ``opset``: the ONNX opset the model will be written for (default: the loaded
    model's, else graphopt's default); gelu, rms_norm and sdpa have standard ops
    from opsets 20 and 23 on, and are left to them there. ``cpu``: the model
    runs on onnxruntime's CPU kernels only (see the module docstring).
    """

    name = "fuse_onnxruntime_contrib"
    kind = PassKind.EXACT

    opset: int | None = None
    cpu: bool = False

    def call(self, graph: Graph) -> PassResult:
        opset = self.opset or graph.meta.get("onnx", {}).get("opset_imports", {}).get("", DEFAULT_OPSET)
        stats = {"fused_conv": 0, "skip_norm": 0, "simplified_layer_norm": 0, "quick_gelu": 0, "gelu": 0,
                 "attention_fused_matmul": 0}
        for node in graph.nodes:
            if node.graph is not graph:  # absorbed by an earlier rewrite
                continue
            fired = None
            if node.op == "conv":
                fired = _fuse_conv(graph, node)
            elif node.op in ("layer_norm", "rms_norm"):
                fired = _fuse_skip_norm(graph, node, self.cpu)
                if fired is None and node.op == "rms_norm" and opset < 23:
                    fired = _simplified_layer_norm(graph, node)
            elif node.op == "silu" and _is_f32(node.output):
                fired = _respell(graph, node, "ort.quick_gelu", {"alpha": 1.0})
            elif node.op == "gelu" and opset < 20 and _is_f32(node.output):
                fired = _respell(graph, node, "ort.gelu", dict(node.attrs))
            elif node.op == "sdpa" and opset < 23:
                fired = _attention_fused_matmul(graph, node)
            if fired is not None:
                stats[fired.removeprefix("ort.")] += 1
        modified = any(stats.values())
        if modified:
            graph.sort()  # a skip norm sits where its add was: weights computed later move it down
        return PassResult(graph, modified, stats)


@register_pass
@dataclass
class FuseOnnxruntimeCpuContrib(FuseOnnxruntimeContrib):
    """``fuse_onnxruntime_contrib`` for onnxruntime's CPU kernels (the ``onnxruntime-cpu`` target)."""

    name = "fuse_onnxruntime_cpu_contrib"

    cpu: bool = True


# ---------------------------------------------------------------- patterns
def _fuse_conv(graph: Graph, conv: Node) -> str | None:
    if conv.attrs["transposed"] or not _is_f32(conv.output):
        return None
    group, z, activation = [conv], None, None
    add = sole_reader(conv.output)
    if add is not None and add.op == "add" and not add.attrs:
        other = add.inputs[1] if add.inputs[0] is conv.output else add.inputs[0]
        if other is not conv.output and other.type == conv.output.type:
            group.append(add)
            z = other
    act = sole_reader(group[-1].output)
    if act is not None and act.op in CONV_ACTIVATIONS and CONV_ACTIVATIONS[act.op](act.attrs) is not None:
        group.append(act)
        activation = act
    if len(group) == 1:
        return None
    x, w, *b = conv.inputs
    attrs = {k: conv.attrs[k] for k in ("stride", "padding", "dilation", "groups") if k in conv.attrs}
    if activation is not None:
        attrs.update(activation=activation.op, activation_attrs=dict(activation.attrs))
    # after the tail's position: z may be produced between the conv and the add
    fused = graph.add_node("ort.fused_conv", [x, w, b[0] if b else None, z], attrs,
                           output_types=[group[-1].output.type], after=group[-1])
    _replace_group(graph, group, [(group[-1].output, fused.output)])
    return fused.op


def _fuse_skip_norm(graph: Graph, norm: Node, cpu: bool) -> str | None:
    """add(a, b) → layer/rms norm, placed where the add was, so every reader of the sum still sees it in time."""
    x = norm.inputs[0]
    add = x.producer
    if add is None or add.op != "add" or add.attrs or len(norm.inputs) < 2 or norm.inputs[1] is None:
        return None
    if len(norm.attrs["normalized_shape"]) != 1 or not _is_f32(x) or len(x.type.shape) != 3 or not x.type.is_static:
        return None
    a, b = add.inputs
    if not (a.type == x.type and b.type == x.type):
        return None
    if cpu and (any(u is not norm for u in x.users()) or x.is_graph_output):
        return None
    fused = graph.add_node("ort.skip_norm", [a, b, *norm.inputs[1:]], {"norm": norm.op, **norm.attrs},
                           output_types=[norm.output.type, x.type], before=add)
    _replace_group(graph, [add, norm], [(norm.output, fused.outputs[0]), (x, fused.outputs[1])])
    return fused.op


def _simplified_layer_norm(graph: Graph, norm: Node) -> str | None:
    x = norm.inputs[0]
    if len(norm.attrs["normalized_shape"]) != 1 or not _is_f32(x) or not isinstance(x.type.shape[-1], int):
        return None
    return _respell(graph, norm, "ort.simplified_layer_norm", dict(norm.attrs))


def _attention_fused_matmul(graph: Graph, sdpa: Node) -> str | None:
    """Below opset 23 only: from there on the standard ``Attention`` op does it all in one node."""
    q = sdpa.inputs[0]
    if sdpa.attrs["enable_gqa"] or sdpa.attrs["is_causal"] or not _is_f32(sdpa.output):
        return None
    scale = sdpa.attrs["scale"]
    if scale is None:
        head = q.type.shape[-1]
        if not isinstance(head, int):
            return None
        scale = 1 / math.sqrt(head)
    return _respell(graph, sdpa, "ort.attention_fused_matmul", {**sdpa.attrs, "scale": float(scale)})


# ---------------------------------------------------------------- helpers
def _respell(graph: Graph, node: Node, op: str, attrs: dict) -> str:
    """Replace ``node`` by one ``op`` node on the same inputs (the same function, another lowering)."""
    new = graph.add_node(op, list(node.inputs), attrs, output_types=[o.type for o in node.outputs], after=node)
    _replace_group(graph, [node], list(zip(node.outputs, new.outputs)))
    return op


def _replace_group(graph: Graph, group: list[Node], replaced: list[tuple[Value, Value]]) -> None:
    """Let the new values stand for the group's results read outside it, then remove the group."""
    for old, new in replaced:
        old.replace_by(new)
    for node in reversed(group):
        graph.remove_node(node)


def _is_f32(v: Value | None) -> bool:
    t = v.type if v is not None else None
    return isinstance(t, TensorType) and t.dtype == torch.float32 and t.shape is not None
