"""Fusion passes: fold per-channel affine epilogues into the weights before them, and spell matmuls as linear.

A convolution, ``linear`` or ``gemm`` is linear in its input, so an epilogue
``y * s + t`` with one ``s`` and one ``t`` per output channel (an inference
batch norm, a multiply or add by a per-channel constant) can be moved into the
weights and bias once, ahead of time: ``(W x + b) s + t = (W s) x + (b s + t)``.
The rewritten graph computes the same function up to float rounding: the
folded weights are computed in float64 and rounded once to the weight's dtype.

Trainable weights (``is_trainable``: the floating-point parameters of a torch
capture) cannot be folded without losing them: the folded values are new
constants, not parameters. Each pass has the option ``fold_trainable``
(default True): the IR's ``batch_norm`` is already inference batch norm
(training-mode BN stays opaque), so a graph these passes apply to is an
inference graph, and folding it is what compilers do at deployment
(TensorRT, onnxruntime, ``torch.fx.experimental.optimization.fuse``). Set it
to False to keep a graph that will be fine-tuned trainable: a rewrite that
would replace a trainable value by a computed constant is then skipped (and
counted as ``skipped_trainable``); one that keeps it as it is still happens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.ir import Graph, Node, TensorType, Value
from graphopt.ir.pattern import Var, match, op
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass


WEIGHTED_OPS = frozenset({"conv", "linear", "gemm"})
"""Ops that are linear in their first input, with a constant weight (input 1) and an optional bias (input 2)."""


# ------------------------------------------------------------------ helpers
def sole_reader(v: Value) -> Node | None:
    """The one node reading ``v`` once, when nothing else (no other node, no graph output) sees it."""
    uses = v.uses()
    if len(uses) != 1 or v.is_graph_output:
        return None
    return uses[0][0]


def output_channels(node: Node) -> int:
    """How many output channels a conv / linear / gemm with a constant weight has."""
    w = node.inputs[1].data
    if node.op == "conv":
        return w.shape[1] * node.attrs["groups"] if node.attrs["transposed"] else w.shape[0]
    if node.op == "gemm":
        return w.shape[0] if node.attrs["trans_b"] else w.shape[1]
    return w.shape[0]


def channel_dim(node: Node) -> int:
    """The output dim that indexes channels: 1 for a convolution, the last one for linear and gemm."""
    return 1 if node.op == "conv" else node.output.type.rank - 1


def scale_weight(node: Node, scale: torch.Tensor) -> torch.Tensor:
    """The node's weight with output channel ``o`` multiplied by ``scale[o]``, in float64.

    Layouts: conv ``[out, in/groups, k...]``; transposed conv
    ``[in, out/groups, k...]`` (output channel ``g*out/groups + j`` lives in
    input group ``g``, column ``j``); linear ``[out, in]``; gemm ``B`` is
    ``[in, out]``, or ``[out, in]`` with ``trans_b``.
    """
    w = node.inputs[1].data.double()
    kernel_ones = [1] * (w.dim() - 2)
    if node.op == "conv" and node.attrs["transposed"]:
        groups = node.attrs["groups"]
        grouped = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
        return (grouped * scale.reshape(groups, 1, w.shape[1], *kernel_ones)).reshape(w.shape)
    if node.op == "gemm" and not node.attrs["trans_b"]:
        return w * scale
    return w * scale.reshape(-1, 1, *kernel_ones)


def per_channel(c: Value, out: Value, dim: int, channels: int) -> torch.Tensor | None:
    """Constant ``c`` as one value per channel (shape ``[channels]``), if broadcasting it against ``out`` means that.

    It must not add dims to ``out`` and may be other than 1 only along ``dim``:
    ``[C, 1, 1]`` and ``[1, C, 1, 1]`` against an NCHW conv output, ``[C]`` or
    ``[1, 1, C]`` against a linear output, and any one-element tensor.
    """
    rank = out.type.rank
    if c.data is None or c.data.dtype != out.type.dtype or c.data.dim() > rank:
        return None
    shape = (1,) * (rank - c.data.dim()) + tuple(c.data.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != dim) or shape[dim] not in (1, channels):
        return None
    return c.data.reshape(-1).expand(channels)


def constant_operand(node: Node, x: Value) -> Value | None:
    """The operand of binary ``node`` other than ``x``, when it is a constant."""
    a, b = node.inputs
    other = b if a is x else a
    return other if other is not x and other.is_constant else None


def folds_into(node: Node) -> bool:
    """Whether ``node`` is a conv / linear / gemm whose weights may be rewritten: constant weight and bias."""
    if node.op not in WEIGHTED_OPS or len(node.outputs) != 1:
        return False
    out = node.output
    if not isinstance(out.type, TensorType) or out.type.rank is None or not out.type.dtype.is_floating_point:
        return False
    weight, bias = node.inputs[1], bias_of(node)
    return weight.is_constant and weight.data.is_floating_point() and (bias is None or bias.is_constant)


def bias_of(node: Node) -> Value | None:
    return node.inputs[2] if len(node.inputs) > 2 else None


def fold_affine(node: Node, scale: torch.Tensor | None, shift: torch.Tensor | None, name: str) -> bool:
    """Rewrite ``node`` so that it computes ``node(x) * scale + shift`` (per output channel, either may be None).

    The old weight and bias go when nothing else reads them. Returns False,
    changing nothing, when the node cannot take the shift: a gemm whose
    ``C`` is scaled by ``beta != 1``.
    """
    bias = bias_of(node)
    beta = node.attrs["beta"] if node.op == "gemm" else 1.0
    if shift is not None and bias is not None and beta != 1.0:
        return False
    graph = node.graph
    weight = node.inputs[1]
    new_bias = None if bias is None else bias.data.double()
    if scale is not None:
        scale = scale.double()
        scaled = scale_weight(node, scale).to(weight.data.dtype)
        node.replace_input(1, graph.add_constant(scaled, f"{weight.name}_{name}"))
        new_bias = None if new_bias is None else new_bias * scale
    if shift is not None:
        new_bias = shift.double() if new_bias is None else new_bias + shift.double()
        if node.op == "gemm":
            node.attrs["beta"] = 1.0
    if new_bias is not None:
        hint = bias.name if bias is not None else f"{node.name}_bias"
        new_bias = graph.add_constant(new_bias.to(node.output.type.dtype).contiguous(), f"{hint}_{name}")
        node.set_inputs([*node.inputs[:2], new_bias])
    drop_unread(graph, [weight, bias])
    return True


def drop_unread(graph: Graph, constants: list[Value | None]) -> None:
    """Remove those of ``constants`` a rewrite left without readers."""
    for v in constants:
        if v is not None:
            graph.remove_constant(v)


def absorb(node: Node, epilogue: Node) -> None:
    """Let ``node``'s output stand for ``epilogue``'s and remove the epilogue with the constants it alone read."""
    graph = node.graph
    constants = [v for v in epilogue.inputs if v is not None and v.is_constant]
    epilogue.output.replace_by(node.output)
    graph.remove_node(epilogue)
    drop_unread(graph, constants)


# ------------------------------------------------------------ batch norm
@register_pass
@dataclass
class FoldBatchNorm(Pass):
    """Fold inference batch norms into the conv / linear / gemm before them.

    Batch-norm folding (Jacob et al. 2018, "Quantization and training of neural
    networks for efficient integer-arithmetic-only inference", §3.2;
    TensorRT's and onnxruntime's Conv+BN fusion): with
    ``s = gamma / sqrt(var + eps)``, ``BN(W x + b) = (W s) x + (b - mean) s + beta``.
    Batch norm normalises dim 1, so a linear or gemm qualifies only with a
    2-D output, where dim 1 is its features. The producer's output must have
    the batch norm as its only reader, and weight, bias and the batch norm's
    statistics and affine parameters must be constants. Trainable values are
    folded into new constants unless ``fold_trainable`` is False (see the
    module docstring).
    """

    name = "fold_batch_norm"
    kind = PassKind.EXACT
    requires = ("patterns_recognized",)  # the fusions read canonical ops

    fold_trainable: bool = True

    def call(self, graph: Graph) -> PassResult:
        stats = {"batch_norms_folded": 0, "skipped_trainable": 0}
        for bn in graph.find("batch_norm"):
            producer = self._foldable_producer(bn)
            if producer is None:
                continue
            replaced = [*producer.inputs[1:], *bn.inputs[1:]]
            if not self.fold_trainable and any(v is not None and v.is_trainable for v in replaced):
                stats["skipped_trainable"] += 1
                continue
            scale, shift = bn_scale_and_shift(bn)
            fold_affine(producer, scale, shift, "bn")
            absorb(producer, bn)
            stats["batch_norms_folded"] += 1
        return PassResult(graph, bool(stats["batch_norms_folded"]), stats)

    @staticmethod
    def _foldable_producer(bn: Node) -> Node | None:
        x = bn.inputs[0]
        producer = x.producer
        if producer is None or not folds_into(producer) or sole_reader(x) is not bn or not bn.output.same_type_as(x):
            return None
        if producer.op != "conv" and x.type.rank != 2:
            return None
        if producer.op == "gemm" and producer.attrs["beta"] != 1.0 and bias_of(producer) is not None:
            return None
        if not all(v is None or v.is_constant for v in bn.inputs[1:]) or None in bn.inputs[3:5]:
            return None
        return producer


def bn_scale_and_shift(bn: Node) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``, in float64."""
    gamma, beta, mean, var = (None if v is None else v.data.double() for v in bn.inputs[1:5])
    scale = torch.rsqrt(var + bn.attrs["eps"])
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta
    return scale, shift


# ------------------------------------------------- multiply and add by constants
_EPILOGUES = frozenset({"add", "sub", "mul"})


@register_pass
@dataclass
class FoldConvBias(Pass):
    """Fold a multiply or add by a per-channel constant into the conv / linear / gemm before it.

    The scale-and-shift half of batch-norm folding, for graphs where the
    affine epilogue is spelled out: ``(W x + b) * s = (W s) x + b s`` and
    ``(W x + b) + t = W x + (b + t)`` (``x - t`` too), where ``s`` and ``t``
    are constants holding one value per output channel (or one value in
    all). This is what a frozen batch norm (torchvision's
    ``FrozenBatchNorm2d``, used by its detection backbones) becomes after
    constant folding, and the ONNX Conv+Mul / Conv+Add fusion of onnxruntime
    and onnx-simplifier. The producer's output must have the epilogue as its
    only reader, and the epilogue must not change its type. See the module
    docstring for ``fold_trainable``.
    """

    name = "fold_bias"
    kind = PassKind.EXACT
    requires = ("patterns_recognized", "attention_fused")  # else it absorbs the exporters' attention scales
    ensures = ("biases_folded",)

    fold_trainable: bool = True

    def call(self, graph: Graph) -> PassResult:
        stats = {"adds_folded": 0, "muls_folded": 0, "skipped_trainable": 0}
        for node in graph.nodes:
            while folds_into(node) and self._fold_epilogue(node, stats):
                pass  # a folded mul may leave an add behind it: a frozen batch norm
        modified = bool(stats["adds_folded"] or stats["muls_folded"])
        return PassResult(graph, modified, stats)

    def _fold_epilogue(self, node: Node, stats: dict[str, int]) -> bool:
        """Fold the epilogue reading ``node``, if it qualifies; whether it was folded."""
        epilogue = sole_reader(node.output)
        if epilogue is None or epilogue.op not in _EPILOGUES or not epilogue.output.same_type_as(node.output):
            return False
        c = constant_operand(epilogue, node.output)
        if c is None or (epilogue.op == "sub" and epilogue.inputs[1] is not c):
            return False
        values = per_channel(c, node.output, channel_dim(node), output_channels(node))
        if values is None:
            return False
        replaced = [c, node.inputs[1], bias_of(node)] if epilogue.op == "mul" else [c, bias_of(node)]
        if not self.fold_trainable and any(v is not None and v.is_trainable for v in replaced):
            stats["skipped_trainable"] += 1
            return False
        if epilogue.op == "mul":
            folded = fold_affine(node, values, None, "scaled")
        else:
            folded = fold_affine(node, None, -values if epilogue.op == "sub" else values, "shifted")
        if folded:
            absorb(node, epilogue)
            stats["muls_folded" if epilogue.op == "mul" else "adds_folded"] += 1
        return folded


# ------------------------------------------------------- matmul to linear
@register_pass
@dataclass
class MatMulAddToLinear(Pass):
    """Turn ``matmul(x, W) + b`` and ``gemm(A, B, C)`` with constant weights into ``linear``.

    The reverse of what ONNX exporters do: the legacy exporter writes
    ``nn.Linear`` on a 3-D input as MatMul with a pre-transposed initializer
    followed by Add, and on a 2-D input as Gemm. ``linear(x, W, b)`` with
    ``W`` in ``[out, in]`` layout is the form later passes read (structured
    pruning, quantisation, attention fusion). A matmul fuses when its right
    operand is a 2-D constant (or the transpose of one: then that constant is
    the weight as it is); a following add fuses into the bias when its
    other operand is a constant with one value per output feature and the
    matmul has no other reader. A gemm fuses when ``alpha == 1``, it does not
    transpose ``A``, ``B`` is constant and ``C`` is absent or, with
    ``beta == 1``, a per-feature constant. Weights that need transposing and
    biases that need reshaping become new constants: see the module docstring
    for ``fold_trainable``.
    """

    name = "fuse_linear"
    kind = PassKind.EXACT
    requires = ("patterns_recognized",)  # the fusions read canonical ops
    ensures = ("matmuls_as_linear",)

    fold_trainable: bool = True

    def call(self, graph: Graph) -> PassResult:
        stats = {"matmuls_fused": 0, "biases_fused": 0, "gemms_fused": 0, "skipped_trainable": 0}
        for node in graph.nodes:
            if node.graph is None or node.op not in ("matmul", "gemm"):
                continue
            plan = self._matmul_plan(node) if node.op == "matmul" else self._gemm_plan(node)
            if plan is None:
                continue
            weight, bias, end = plan
            recomputed = [v for v, data in (weight, bias) if data is not None]
            if not self.fold_trainable and any(v.is_trainable for v in recomputed):
                stats["skipped_trainable"] += 1
                continue
            self._rewrite(node, weight, bias, end)
            stats["gemms_fused" if node.op == "gemm" else "matmuls_fused"] += 1
            stats["biases_fused"] += int(end is not node)
        modified = bool(stats["matmuls_fused"] or stats["gemms_fused"])
        return PassResult(graph, modified, stats)

    def _matmul_plan(self, node: Node) -> tuple | None:
        """``((weight value, new data or None), (bias value or None, new data or None), last node)`` or None."""
        x, w = node.inputs
        out = node.output
        if not isinstance(out.type, TensorType) or out.type.rank is None or out.type.rank < 1:
            return None
        if not out.type.dtype.is_floating_point or not isinstance(w.type, TensorType) or w.type.rank != 2:
            return None
        weight = _transposed_constant(w)
        if weight is None:
            if not w.is_constant:
                return None
            weight = (w, w.data.t())
        bias, end = (None, None), node
        add = sole_reader(out)
        if add is not None and add.op == "add" and add.output.same_type_as(out):
            c = constant_operand(add, out)
            values = None if c is None else per_channel(c, out, out.type.rank - 1, w.type.shape[1])
            if values is not None:
                bias, end = (c, None if c.data.shape == values.shape else values), add
        return weight, bias, end

    def _gemm_plan(self, node: Node) -> tuple | None:
        a = node.attrs
        b, c = node.inputs[1], bias_of(node)
        if a.get("alpha", 1.0) != 1.0 or a.get("trans_a") or not b.is_constant or not b.data.is_floating_point():
            return None
        weight = (b, None if a.get("trans_b") else b.data.t())
        if c is None:
            return weight, (None, None), node
        if a.get("beta", 1.0) != 1.0:
            return None
        values = per_channel(c, node.output, 1, output_channels(node))
        if values is None:
            return None
        return weight, (c, None if c.data.shape == values.shape else values), node

    def _rewrite(self, node: Node, weight: tuple, bias: tuple, end: Node) -> None:
        """Put a linear node in the place of ``node`` (and of ``end``), then remove what only they read."""
        graph = node.graph
        read = [v for v in node.inputs[1:] if v is not None] + [v for v in end.inputs if v is not None]
        transpose = node.inputs[1].producer
        inputs = [node.inputs[0], _as_constant(graph, weight, "t"), _as_constant(graph, bias, "b")]
        linear = graph.add_node("linear", inputs, output_types=[end.output.type], before=node,
                                meta={"created_by": self.name})
        end.output.replace_by(linear.output)
        for dead in dict.fromkeys((end, node)):
            graph.remove_node(dead)
        if transpose is not None and not transpose.output.uses() and not transpose.output.is_graph_output:
            read.append(transpose.inputs[0])
            graph.remove_node(transpose)
        drop_unread(graph, read)


_TRANSPOSED = op("permute", Var("source"), dims=[1, 0])


def _transposed_constant(w: Value) -> tuple[Value, None] | None:
    """``(W, None)`` when ``w`` is ``permute(W, [1, 0])`` of a 2-D constant: ``W`` is then the linear weight as is."""
    m = match(_TRANSPOSED, w)
    source = None if m is None else m["source"]
    return (source, None) if source is not None and source.is_constant and source.type.rank == 2 else None


def _as_constant(graph: Graph, plan: tuple, suffix: str) -> Value | None:
    """The value a plan names, or a new contiguous constant holding the data it computed."""
    value, data = plan
    if data is None:
        return value
    return graph.add_constant(data.contiguous().clone(), f"{value.name}_{suffix}")
