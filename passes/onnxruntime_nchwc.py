"""onnxruntime's NCHWc blocked layout, for the ``onnxruntime-cpu`` target: the ONNX form of channels-last.

onnxruntime's CPU convolutions (MLAS) are fastest on a blocked layout:
channels split into blocks of ``B`` stored innermost, ``[N, C/B, H, W, B]``,
so one SIMD register holds one pixel of ``B`` channels (Liu et al. 2019,
"Optimizing CNN model inference on CPUs", §3.1; ``B`` is 8 with AVX2, 16 with
AVX-512). Standard ONNX has no layout attribute, so the layout is written
with onnxruntime's ``com.microsoft.nchwc`` ops: ``ReorderInput`` /
``ReorderOutput`` convert, and ``Conv``, ``MaxPool``, ``AveragePool`` and
``GlobalAveragePool`` of that domain read and write blocked tensors with
pre-reordered filters. Channel concats, splits and the registry's
``layout_blind`` ops of same-shaped tensors run on blocked tensors unchanged.

``plan_nchwc_regions`` plans the regions as the IR's ``channels_last`` pass
does: blocked form spreads from convs through the ops that keep it, each
connected region gets one reorder per value crossing its boundary, and a
region is kept only when its conv FLOPs outweigh that reorder traffic
(``min_flops_per_byte``). It then rewrites each region into ``ort.nchwc.*``
IR ops. In the IR a blocked value is the NCHW tensor with its channels
zero-padded to a multiple of ``B`` (the shape onnxruntime gives it); the
block order in memory is the emitter's business
(``graphopt.emitters.onnxruntime_nchwc``), as are the filters' blocked
layouts. Padded filter rows and columns are zero, so the padding never reaches
a real channel, and only ops that keep it finite run on it.

The block size belongs to the machine, not the model: by default the pass asks
the installed onnxruntime (``nchwc_block_size``), and the emitted model is
valid only on CPUs with that block size (recorded in its metadata), exactly
like a model saved by onnxruntime's own ``ORT_ENABLE_ALL`` optimiser.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from graphopt.emitters.onnxruntime_ops import CONV_ACTIVATIONS
from graphopt.ir import Graph, Node, OpDef, TensorType, Value, get_op, node_flops, register_op
from graphopt.ir.analysis import regions
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass

from .fusion import bn_scale_and_shift, drop_unread, sole_reader
from .onnxruntime_contrib import fused_conv

CHANNEL_ALIGNMENT = 4
"""onnxruntime's ReorderInput wants channel counts that are multiples of 4."""
MIN_FLOPS_PER_BYTE = 4.0
"""Conv FLOPs a region needs per byte of reorder traffic. onnxruntime's NCHW convs (im2col + GEMM, a slow
depthwise path) lose so much to its NCHWc ones that measured regions of 8-15 FLOP/B still gain (efficientnet_b0);
only squeeze-excitation 1x1 convs on pooled 1x1 maps (1-2 FLOP/B) do not."""


@functools.cache
def nchwc_block_size() -> int | None:
    """The NCHWc block size of this machine's onnxruntime, or None where it has no NCHWc kernels.

    Asked of onnxruntime itself: ReorderInput pads 4 channels up to one block.
    """
    import numpy as np
    import onnx

    from graphopt.backends._onnxruntime import inference_session

    node = onnx.helper.make_node("ReorderInput", ["x"], ["y"], domain="com.microsoft.nchwc")
    graph = onnx.helper.make_graph([node], "probe", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                           [1, 4, 1, 1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid("com.microsoft.nchwc", 1)])
    try:
        session = inference_session(model, optimization="none")
        block = session.run(None, {"x": np.ones((1, 4, 1, 1), np.float32)})[0].shape[1]
    except Exception:  # an onnxruntime build without the NCHWc kernels
        return None
    return block if block > 1 else None


# ------------------------------------------------------------------ the ops
def _pad_to(n: int, block: int) -> int:
    return -(-n // block) * block


def _reorder_input(x: torch.Tensor, block: int = 8) -> torch.Tensor:
    """NCHW → blocked: channels zero-padded to a multiple of ``block``."""
    return F.pad(x, (0, 0, 0, 0, 0, _pad_to(x.shape[1], block) - x.shape[1]))


def _reorder_output(x: torch.Tensor, channels: int = 1) -> torch.Tensor:
    """Blocked → NCHW: the first ``channels`` channels."""
    return x[:, :channels].contiguous()


def _global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3), keepdim=True)


def _channel_scale(x: torch.Tensor, s: torch.Tensor, binary: str = "mul", block: int = 8) -> torch.Tensor:
    """``x * s`` or ``x + s``, ``s`` one value per (sample and) channel; written as rows of ``W·block``."""
    return x * s if binary == "mul" else x + s


def _nchwc_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, z: torch.Tensor | None = None,
                stride=(1,), padding=(0,), dilation=(1,), groups: int = 1, activation: str | None = None,
                activation_attrs: dict | None = None, block: int = 8) -> torch.Tensor:
    """``ort.fused_conv`` on blocked tensors; ``w`` is OIHW, its channels padded as the blocked tensors'."""
    return fused_conv(x, w, b, z, stride, padding, dilation, groups, activation, activation_attrs)


def _register_nchwc_ops() -> None:
    max_pool, avg_pool = get_op("max_pool"), get_op("avg_pool")
    for opdef in [
        OpDef("ort.nchwc.reorder_input", _reorder_input, category="data", doc=_reorder_input.__doc__),
        OpDef("ort.nchwc.reorder_output", _reorder_output, category="data", doc=_reorder_output.__doc__),
        OpDef("ort.nchwc.conv", _nchwc_conv, category="conv", flops=get_op("conv").flops, doc=_nchwc_conv.__doc__),
        OpDef("ort.nchwc.max_pool", max_pool.torch_impl, category="pool", doc="max_pool on blocked tensors"),
        OpDef("ort.nchwc.avg_pool", avg_pool.torch_impl, category="pool", doc="avg_pool on blocked tensors"),
        OpDef("ort.nchwc.global_avg_pool", _global_avg_pool, category="pool", doc="mean over H and W, blocked"),
        OpDef("ort.nchwc.channel_scale", _channel_scale, doc=_channel_scale.__doc__),
    ]:
        register_op(opdef)


_register_nchwc_ops()


# ------------------------------------------------------------------ the pass
@register_pass
@dataclass
class PlanNchwcRegions(Pass):
    """Run the conv regions that pay for their reorders in onnxruntime's NCHWc layout (``onnxruntime-cpu``).

    ``block``: the NCHWc block size (default: this machine's onnxruntime's; none, and the pass does
    nothing); ``min_flops_per_byte``: the conv FLOPs a region needs per byte of reorder traffic.
    """

    name = "plan_nchwc_regions"
    kind = PassKind.EXACT

    block: int | None = None
    min_flops_per_byte: float = MIN_FLOPS_PER_BYTE

    def call(self, graph: Graph) -> PassResult:
        block = self.block or nchwc_block_size()
        if block is None:
            return PassResult(graph, False, {})
        plan = _plan(graph, block, self.min_flops_per_byte)
        stats = _rewrite(graph, plan)
        return PassResult(graph, bool(stats["blocked_nodes"]), stats)


# ------------------------------------------------------------------ planning
@dataclass
class _Conv:
    """How one conv (or inference batch norm, as a depthwise 1x1 conv) runs blocked, with its fused epilogue."""

    node: Node
    reads_blocked: bool
    groups: int
    add: Node | None = None
    z: Value | None = None
    activation: Node | None = None
    tail: Node | None = None


@dataclass
class NchwcPlan:
    """The nodes that run blocked, and how."""

    block: int
    kinds: dict[int, str] = field(default_factory=dict)
    """node id → conv, pool, global_pool, concat, split, elementwise or scale."""
    convs: dict[int, _Conv] = field(default_factory=dict)

    def is_blocked(self, v: Value | None) -> bool:
        """Whether ``v`` is produced in blocked form."""
        return v is not None and v.producer is not None and id(v.producer) in self.kinds

    def reads_blocked(self, node: Node, v: Value) -> bool:
        """Whether ``node`` reads its input ``v`` in blocked form."""
        kind = self.kinds.get(id(node))
        if kind == "conv":
            return v is node.inputs[0] and self.convs[id(node)].reads_blocked
        if kind == "elementwise":
            return self.is_blocked(v)
        return kind is not None and not v.is_constant


def _plan(graph: Graph, block: int, min_flops_per_byte: float) -> NchwcPlan:
    """Every blocked region that pays for its reorders, with the conv epilogues fused."""
    plan = NchwcPlan(block)
    for node in graph.nodes:
        kind = _kind(plan, node)
        if kind is not None:
            plan.kinds[id(node)] = kind
    for region in _regions(graph, plan):
        convs = [n for n in region if id(n) in plan.convs]
        if not convs or sum(map(node_flops, convs)) < min_flops_per_byte * _reorder_bytes(plan, region):
            for n in region:
                plan.kinds.pop(id(n))
                plan.convs.pop(id(n), None)
    _fuse_epilogues(plan)
    return plan


def _kind(plan: NchwcPlan, node: Node) -> str | None:
    if not node.outputs or not all(_blockable(o) for o in node.outputs):
        return None
    x = node.inputs[0] if node.inputs else None
    if node.op == "split":
        aligned = all(int(size) % plan.block == 0 for size in node.attrs["sizes"])
        return "split" if node.attrs["dim"] % 4 == 1 and plan.is_blocked(x) and aligned else None
    if len(node.outputs) != 1:
        return None
    if node.op == "conv":
        conv = _conv_form(node, plan.block)
        if conv is None:
            return None
        plan.convs[id(node)] = conv
        return "conv"
    if node.op == "batch_norm" and plan.is_blocked(x) and x.type.shape[1] % CHANNEL_ALIGNMENT == 0 and all(
            v is None or (v.is_constant and v.data is not None) for v in node.inputs[1:]) and all(node.inputs[3:5]):
        plan.convs[id(node)] = _Conv(node, reads_blocked=True, groups=_pad_to(x.type.shape[1], plan.block))
        return "conv"
    if node.op in ("max_pool", "avg_pool") and plan.is_blocked(x) and x.type.shape[1] % plan.block == 0:
        if node.op == "avg_pool" and node.attrs["divisor_override"] or len(node.attrs["kernel_size"]) != 2:
            return None
        return "pool"
    if plan.is_blocked(x) and _global_average(node):
        return "global_pool"
    if node.op == "concat" and node.attrs["dim"] % 4 == 1 and all(
            plan.is_blocked(v) and v.type.shape[1] % plan.block == 0 for v in node.inputs):
        return "concat"
    if not get_op(node.op).layout_blind or not any(plan.is_blocked(v) for v in node.inputs):
        return None
    if all(v is not None and (plan.is_blocked(v) and v.type == node.output.type or _is_scalar(v))
           for v in node.inputs):
        return "elementwise"
    return "scale" if _channel_scale_operands(plan, node) is not None else None


def _channel_scale_operands(plan: NchwcPlan, node: Node) -> tuple[Value, Value] | None:
    """``x * s`` or ``x + s`` with ``s`` one value per (batch and) channel, as in squeeze-excitation: (x, s)."""
    if node.op not in ("mul", "add") or len(node.inputs) != 2:
        return None
    for x, s in (node.inputs, node.inputs[::-1]):
        shape = s.type.shape if isinstance(s.type, TensorType) else None
        if not plan.is_blocked(x) or x.type != node.output.type or shape is None or len(shape) != 4:
            continue
        batch, channels = x.type.shape[:2]
        if shape[1] != channels or list(shape[2:]) != [1, 1] or shape[0] not in (1, batch):
            continue
        if s.is_constant:
            if s.data is not None and shape[0] == 1:
                return x, s
        elif plan.is_blocked(s) or (_blockable(s) and channels % CHANNEL_ALIGNMENT == 0):  # by a ReorderInput
            return x, s
    return None


def _blockable(v: Value) -> bool:
    t = v.type
    return (isinstance(t, TensorType) and t.dtype == torch.float32 and t.shape is not None and len(t.shape) == 4
            and isinstance(t.shape[1], int))


def _is_scalar(v: Value) -> bool:
    return v.is_constant and v.data is not None and v.data.numel() == 1


def _global_average(node: Node) -> bool:
    if node.op == "adaptive_avg_pool":
        return all(int(s) == 1 for s in node.attrs["output_size"])
    if node.op == "mean" and node.attrs["keepdim"]:
        dims = node.attrs["dims"]
        return dims is not None and sorted(d % 4 for d in dims) == [2, 3]
    return False


def _conv_form(node: Node, block: int) -> _Conv | None:
    """onnxruntime's rules for a blocked conv: whether the input is blocked, and the groups."""
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if node.attrs["transposed"] or not (w.is_constant and w.data is not None and w.data.dim() == 4):
        return None
    if w.type.dtype != torch.float32 or (b is not None and not (b.is_constant and b.data is not None)):
        return None
    if not _blockable(x):
        return None
    out_channels, in_per_group = w.data.shape[:2]
    groups = int(node.attrs["groups"])
    if groups == 1:
        if in_per_group < block:
            return _Conv(node, reads_blocked=False, groups=1)
        if in_per_group % CHANNEL_ALIGNMENT:
            return None
        return _Conv(node, reads_blocked=True, groups=1)
    if out_channels % CHANNEL_ALIGNMENT:
        return None
    if in_per_group == 1 and out_channels == groups:
        return _Conv(node, reads_blocked=True, groups=_pad_to(out_channels, block))
    if in_per_group % block or out_channels % groups or (out_channels // groups) % block:
        return None
    return _Conv(node, reads_blocked=True, groups=groups)


def _regions(graph: Graph, plan: NchwcPlan) -> list[list[Node]]:
    """Connected groups of blocked nodes, linked by the blocked values between them."""
    return regions((n for n in graph.nodes if id(n) in plan.kinds),
                   lambda node, v: plan.is_blocked(v) and plan.reads_blocked(node, v))


def _reorder_bytes(plan: NchwcPlan, region: list[Node]) -> int:
    """Bytes the region's reorders read and write: activations entering blocked, results leaving as NCHW."""
    entering = {id(v): v for n in region for v in n.inputs
                if v is not None and not v.is_constant and plan.reads_blocked(n, v) and not plan.is_blocked(v)}
    leaving = [o for n in region for o in n.outputs if _read_unblocked(plan, o)]
    return sum(2 * (v.type.nbytes or 0) for v in [*entering.values(), *leaving])


def _read_unblocked(plan: NchwcPlan, v: Value) -> bool:
    return v.is_graph_output or any(not plan.reads_blocked(n, v) for n in v.users())


def _fuse_epilogues(plan: NchwcPlan) -> None:
    """conv → [add of a blocked tensor] → [activation] becomes one blocked conv (inputs ``Sum`` and ``activation``)."""
    taken: set[int] = set()

    def free(node: Node | None) -> bool:
        return node is not None and plan.kinds.get(id(node)) == "elementwise" and id(node) not in taken

    for conv in plan.convs.values():
        tail = conv.node
        add = sole_reader(tail.output)
        if free(add) and add.op == "add" and not add.attrs:
            z = add.inputs[1] if add.inputs[0] is tail.output else add.inputs[0]
            if plan.is_blocked(z) and z is not tail.output and z.type == tail.output.type:
                conv.add, conv.z, tail = add, z, add
        act = sole_reader(tail.output)
        if free(act) and act.op in CONV_ACTIVATIONS and CONV_ACTIVATIONS[act.op](act.attrs) is not None:
            conv.activation = tail = act
        conv.tail = tail
        taken.update(id(n) for n in (conv.add, tail) if n is not None)


# ------------------------------------------------------------------ rewriting
@dataclass
class _Rewrite:
    """The IR rewrite of one plan: the blocked form of each value, made once."""

    graph: Graph
    plan: NchwcPlan
    blocked: dict[int, Value] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"blocked_nodes": 0, "reorder_inputs": 0,
                                                           "reorder_outputs": 0, "batch_norms_as_convs": 0})

    def blocked_form(self, v: Value, at: Node) -> Value:
        """``v`` blocked: its rewritten producer's output, or one ReorderInput shared by all blocked readers."""
        if id(v) not in self.blocked:
            self.blocked[id(v)] = self.graph.add_node("ort.nchwc.reorder_input", [v], {"block": self.plan.block},
                                                      before=at).output
            self.stats["reorder_inputs"] += 1
        return self.blocked[id(v)]

    def padded(self, v: Value, sizes: tuple[int, ...]) -> Value:
        """Constant ``v`` zero-padded along its first dims to ``sizes``; ``v`` itself when it fits."""
        if tuple(v.data.shape[:len(sizes)]) == sizes:
            return v
        return self.constant(_zero_padded(v.data, sizes), f"{v.name}_nchwc")

    def constant(self, data: torch.Tensor, hint: str) -> Value:
        return self.graph.add_constant(data, self.graph.unique_name(hint))


def _zero_padded(data: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    padded = data.new_zeros(*sizes, *data.shape[len(sizes):])
    padded[tuple(slice(0, n) for n in data.shape[:len(sizes)])] = data
    return padded


def _rewrite(graph: Graph, plan: NchwcPlan) -> dict[str, int]:
    """Replace the planned nodes by ``ort.nchwc.*`` nodes; results read in NCHW get one ReorderOutput each."""
    r = _Rewrite(graph, plan)
    absorbed = {id(n) for c in plan.convs.values() for n in (c.add, c.tail) if n is not None and n is not c.node}
    position = {id(n): k for k, n in enumerate(graph.nodes)}
    planned = [(n, plan.convs[id(n)].tail if id(n) in plan.convs else n) for n in graph.nodes
               if id(n) in plan.kinds and id(n) not in absorbed]
    results: list[Value] = []
    # in the order of the nodes each rewrite stands for last, which read every input of its group
    for node, at in sorted(planned, key=lambda pair: position[id(pair[1])]):
        for old, new in zip(at.outputs, _rewrite_node(r, node, at)):
            r.blocked[id(old)] = new
            results.append(old)
        r.stats["blocked_nodes"] += 1
    leaving = [v for v in results if _read_unblocked(plan, v)]
    for v in leaving:
        nchw = graph.add_node("ort.nchwc.reorder_output", [r.blocked[id(v)]], {"channels": v.type.shape[1]},
                              output_types=[v.type], after=r.blocked[id(v)].producer).output
        v.replace_by(nchw)
        r.stats["reorder_outputs"] += 1
    constants = []
    for node in reversed(graph.nodes):
        if id(node) in plan.kinds or id(node) in absorbed:
            constants += [v for v in node.inputs if v is not None and v.is_constant]
            graph.remove_node(node)
    drop_unread(graph, constants)
    return r.stats


def _rewrite_node(r: _Rewrite, node: Node, at: Node) -> list[Value]:
    """The blocked node(s) standing for ``node`` (and its fused epilogue ending at ``at``), placed before ``at``."""
    plan, graph, kind = r.plan, r.graph, r.plan.kinds[id(node)]
    if kind == "conv":
        return [_rewrite_conv(r, plan.convs[id(node)])]
    if kind == "scale":
        x, s = _channel_scale_operands(plan, node)
        if s.is_constant:
            s = r.padded(s, (1, _pad_to(s.type.shape[1], plan.block)))
        else:
            s = r.blocked_form(s, at)
        return [graph.add_node("ort.nchwc.channel_scale", [r.blocked_form(x, at), s],
                               {"binary": node.op, "block": plan.block}, before=at).output]
    ins = [r.blocked_form(v, at) if plan.reads_blocked(node, v) else v for v in node.inputs]
    if kind == "pool":
        return [graph.add_node(f"ort.nchwc.{node.op}", ins, dict(node.attrs), before=at).output]
    if kind == "global_pool":
        return [graph.add_node("ort.nchwc.global_avg_pool", ins[:1], before=at).output]
    return graph.add_node(node.op, ins, dict(node.attrs), before=at).outputs  # concat, split, elementwise


def _rewrite_conv(r: _Rewrite, conv: _Conv) -> Value:
    """One ``ort.nchwc.conv``: filters and biases zero-padded to whole blocks (a batch norm as a depthwise
    1x1 conv, its affine folded in float64 by ``fold_batch_norm``'s ``bn_scale_and_shift``)."""
    node, block, at = conv.node, r.plan.block, conv.tail
    x = r.blocked_form(node.inputs[0], at) if conv.reads_blocked else node.inputs[0]
    if node.op == "batch_norm":
        scale, shift = bn_scale_and_shift(node)
        channels = (_pad_to(scale.numel(), block),)
        w = r.constant(_zero_padded(scale.float().reshape(-1, 1, 1, 1), channels), f"{node.name}_scale")
        b = r.constant(_zero_padded(shift.float(), channels), f"{node.name}_shift")
        attrs = {"groups": conv.groups}
        r.stats["batch_norms_as_convs"] += 1
    else:
        w, b = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        out_channels = _pad_to(w.type.shape[0], block)
        if conv.reads_blocked and conv.groups == 1:
            w = r.padded(w, (out_channels, _pad_to(w.type.shape[1], block)))
        else:
            w = r.padded(w, (out_channels,))
        b = r.padded(b, (out_channels,)) if b is not None else None
        attrs = {k: node.attrs[k] for k in ("stride", "padding", "dilation") if k in node.attrs}
        attrs["groups"] = conv.groups
    z = r.blocked[id(conv.z)] if conv.z is not None else None
    if conv.activation is not None:
        attrs.update(activation=conv.activation.op, activation_attrs=dict(conv.activation.attrs))
    return r.graph.add_node("ort.nchwc.conv", [x, w, b, z], {**attrs, "block": block}, before=at).output
