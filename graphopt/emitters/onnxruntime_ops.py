"""Lowerings onto onnxruntime's contrib ops (domain ``com.microsoft``), for ``target="onnxruntime"``.

Standard ONNX has no op for a convolution with its epilogue, a residual add
fused into a LayerNorm, or a matmul that transposes and scales its operand;
onnxruntime does, and its own offline optimiser (``ORT_ENABLE_EXTENDED``)
rewrites into them. A model emitted for onnxruntime gets these ops straight
from the IR, so it runs fused even when the session's own graph optimisations
are off. The ops used, with the IR pattern each one replaces:

- ``FusedConv``: conv → [add of a same-shaped tensor] → [relu, sigmoid, tanh,
  leaky_relu, hardsigmoid, clamp]; computes ``act(conv(x) + b + z)``.
- ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``: add →
  layer_norm / rms_norm over the last dim of a 3-D tensor; the fourth output
  is the sum, so a residual stream that reads the sum keeps it. Not on CPU
  when the sum is read elsewhere (pre-LN blocks): there onnxruntime 1.32's
  kernel with the sum output was slower than Add + LayerNormalization (timm
  ViT-Ti, 2 threads: 13.8 ms against 12.2 ms at batch 8).
- ``SimplifiedLayerNormalization`` (registered by onnxruntime in the default
  domain): rms_norm over the last dim, below opset 23's RMSNormalization.
- ``QuickGelu`` (``x * sigmoid(alpha x)``, alpha 1): silu.
- ``Gelu`` / ``FastGelu``: gelu below opset 20, where standard ONNX has none.
- ``FusedMatMul``: the ``q kᵀ · scale`` of attention, transposing and scaling
  inside the matmul.

Only float32 tensors are fused: onnxruntime's CPU kernels for these ops are
float32 (others exist for CUDA only). A planned group never hides a value
that something outside the group reads.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from graphopt.ir import Graph, Node, TensorType, Value

from .onnx import _Emitter

DOMAIN = "com.microsoft"
CONV_ACTIVATIONS: dict[str, Callable[[Node], tuple[str, list[float]] | None]] = {
    "relu": lambda n: ("Relu", []),
    "sigmoid": lambda n: ("Sigmoid", []),
    "tanh": lambda n: ("Tanh", []),
    "leaky_relu": lambda n: ("LeakyRelu", [float(n.attrs.get("negative_slope", 0.01))]),
    "hardsigmoid": lambda n: ("HardSigmoid", [float(n.attrs.get("alpha", 1 / 6)), float(n.attrs.get("beta", 0.5))]),
    "clamp": lambda n: (None if n.attrs.get("min") is None or n.attrs.get("max") is None
                        else ("Clip", [float(n.attrs["min"]), float(n.attrs["max"])])),
}
"""IR activations FusedConv can apply, each giving its onnxruntime name and parameters (None: not this node)."""


@dataclass
class ContribPlan:
    """Which IR nodes lower to which contrib op, decided before emission.

    ``emitters`` maps the node at which a fused op is written to the function
    writing it; ``absorbed`` holds the nodes that op replaces, emitted as nothing.
    """

    emitters: dict[int, Callable[[_Emitter], None]] = field(default_factory=dict)
    absorbed: set[int] = field(default_factory=set)

    def emit(self, e: _Emitter, node: Node) -> bool:
        """Write ``node``'s share of the plan; False when the plan leaves the node to the standard lowering."""
        if id(node) in self.absorbed:
            return True
        write = self.emitters.get(id(node))
        if write is None:
            return False
        e.extra_opsets[DOMAIN] = 1
        write(e)
        return True

    def claim(self, at: Node, nodes: list[Node], write: Callable[[_Emitter], None]) -> None:
        self.emitters[id(at)] = write
        self.absorbed.update(id(n) for n in nodes if n is not at)

    def free(self, *nodes: Node) -> bool:
        return not any(id(n) in self.absorbed or id(n) in self.emitters for n in nodes)


def plan_contrib_ops(graph: Graph, opset: int, nchwc_block: int | None = None, cpu: bool = False) -> ContribPlan:
    """Plan the contrib-op lowerings; with ``nchwc_block``, blocked-layout regions first (``onnxruntime_nchwc``);
    ``cpu``: the model is for onnxruntime's CPU kernels only."""
    plan = ContribPlan()
    if nchwc_block is not None:
        from .onnxruntime_nchwc import plan_nchwc

        plan_nchwc(graph, nchwc_block, plan)
    for node in graph.nodes:
        if not plan.free(node):
            continue
        if node.op == "conv":
            _plan_fused_conv(plan, node)
        elif node.op in ("layer_norm", "rms_norm"):
            _plan_skip_norm(plan, node, cpu)
            if node.op == "rms_norm" and opset < 23 and plan.free(node):
                _plan_rms_norm(plan, node)
        elif node.op == "silu" and _is_f32(node.output):
            plan.claim(node, [node], _unary(node, "QuickGelu", alpha=1.0))
        elif node.op == "gelu" and opset < 20 and _is_f32(node.output):
            fast = node.attrs.get("approximate", "none") == "tanh"
            plan.claim(node, [node], _unary(node, "FastGelu" if fast else "Gelu"))
        elif node.op == "sdpa" and opset < 23:
            _plan_scaled_scores(plan, node)
    return plan


# ---------------------------------------------------------------- patterns
def _plan_fused_conv(plan: ContribPlan, conv: Node) -> None:
    if conv.attrs.get("transposed") or not _is_f32(conv.output):
        return
    group, z, activation = [conv], None, None
    add = sole_user(conv.output)
    if add is not None and add.op == "add" and not add.attrs and plan.free(add):
        other = add.inputs[1] if add.inputs[0] is conv.output else add.inputs[0]
        if other is not conv.output and other.type == conv.output.type:
            group.append(add)
            z = other
    act_node = sole_user(group[-1].output)
    if act_node is not None and act_node.op in CONV_ACTIVATIONS and plan.free(act_node):
        activation = CONV_ACTIVATIONS[act_node.op](act_node)
        if activation is not None:
            group.append(act_node)
    if len(group) == 1:
        return
    tail = group[-1]

    def write(e: _Emitter) -> None:
        from .onnx_table import conv_attributes

        ins = [e.name(v) for v in conv.inputs] + [""] * (3 - len(conv.inputs))
        attrs = conv_attributes(conv)
        if activation is not None:
            attrs["activation"] = activation[0]
            attrs["activation_params"] = activation[1] or None
        e.add("FusedConv", [*ins, e.name(z)] if z is not None else ins, [e.name(tail.output)], domain=DOMAIN,
              **attrs)

    plan.claim(tail, group, write)


def _plan_skip_norm(plan: ContribPlan, norm: Node, cpu: bool) -> None:
    """add(a, b) → layer/rms norm, written where the add was, so every reader of the sum still sees it in time."""
    x = norm.inputs[0]
    add = x.producer
    weight = norm.inputs[1] if len(norm.inputs) > 1 else None
    bias = norm.inputs[2] if len(norm.inputs) > 2 else None
    if add is None or add.op != "add" or add.attrs or not plan.free(add) or weight is None:
        return
    if len(norm.attrs["normalized_shape"]) != 1 or not _is_f32(x) or len(x.type.shape) != 3 or not x.type.is_static:
        return
    a, b = add.inputs
    if not (a.type == x.type and b.type == x.type):
        return
    sum_read_elsewhere = any(u is not norm for u in x.users()) or is_output(x)
    if sum_read_elsewhere and cpu:
        return
    op_type = "SkipLayerNormalization" if norm.op == "layer_norm" else "SkipSimplifiedLayerNormalization"

    def write(e: _Emitter) -> None:
        outs = [e.name(norm.output), "", "", e.name(x) if sum_read_elsewhere else ""]
        while outs[-1] == "":
            outs.pop()
        ins = [e.name(a), e.name(b), e.name(weight)] + ([e.name(bias)] if bias is not None else [])
        e.add(op_type, ins, outs, domain=DOMAIN, epsilon=_epsilon(norm))

    plan.claim(add, [add, norm], write)


def _plan_rms_norm(plan: ContribPlan, norm: Node) -> None:
    x = norm.inputs[0]
    if len(norm.attrs["normalized_shape"]) != 1 or not _is_f32(x) or not isinstance(x.type.shape[-1], int):
        return
    weight = norm.inputs[1] if len(norm.inputs) > 1 else None

    def write(e: _Emitter) -> None:
        scale = e.name(weight) if weight is not None else e.const(torch.ones(x.type.shape[-1]), hint="rms_weight")
        e.add("SimplifiedLayerNormalization", [e.name(x), scale], [e.name(norm.output)], axis=-1,
              epsilon=_epsilon(norm))

    plan.claim(norm, [norm], write)


def _epsilon(norm: Node) -> float:
    eps = norm.attrs.get("eps")
    return float(torch.finfo(norm.output.type.dtype).eps if eps is None else eps)


def _plan_scaled_scores(plan: ContribPlan, sdpa: Node) -> None:
    """sdpa as FusedMatMul(q, k, transB, alpha=scale) → [mask] → Softmax → MatMul.

    Below opset 23 only: from there on the standard ``Attention`` op does it all in one node.
    """
    q, k, v = sdpa.inputs[:3]
    if sdpa.attrs.get("enable_gqa") or sdpa.attrs.get("is_causal") or not _is_f32(sdpa.output):
        return
    scale = sdpa.attrs.get("scale")
    if scale is None:
        head = q.type.shape[-1]
        if not isinstance(head, int):
            return
        scale = 1 / math.sqrt(head)
    mask = sdpa.inputs[3] if len(sdpa.inputs) > 3 else None

    def write(e: _Emitter) -> None:
        from .onnx_table import attention_probabilities

        scores = e.add("FusedMatMul", [e.name(q), e.name(k)], 1, domain=DOMAIN, transB=1, alpha=float(scale))[0]
        if mask is not None:
            dtype = sdpa.output.type.dtype
            if mask.type.dtype == torch.bool:
                scores = e.add1("Where", [e.name(mask), scores, e.const(float("-inf"), dtype)])
            else:
                scores = e.add1("Add", [scores, e.cast(e.name(mask), mask.type.dtype, dtype)])
        probs = attention_probabilities(e, scores, mask is not None, sdpa.output.type.dtype)
        e.add("MatMul", [probs, e.name(v)], [e.name(sdpa.output)])

    plan.claim(sdpa, [sdpa], write)


# ---------------------------------------------------------------- helpers
def _unary(node: Node, op_type: str, **attrs) -> Callable[[_Emitter], None]:
    def write(e: _Emitter) -> None:
        e.add(op_type, [e.name(node.inputs[0])], [e.name(node.output)], domain=DOMAIN, **attrs)

    return write


def sole_user(v: Value) -> Node | None:
    users = v.users()
    if len(users) != 1 or is_output(v) or sum(1 for x in users[0].inputs if x is v) != 1:
        return None
    return users[0]


def is_output(v: Value) -> bool:
    return v.graph is not None and any(o is v for o in v.graph.outputs)


def _is_f32(v: Value | None) -> bool:
    return v is not None and isinstance(v.type, TensorType) and v.type.dtype == torch.float32 and v.type.shape is not None

