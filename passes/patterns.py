"""Pattern recognition: primitive-op spellings of activations and norms become one canonical op.

Exporters and decompositions spell ``gelu``, ``silu``, ``hardswish``,
``layer_norm``, ``rms_norm`` and ``group_norm`` as chains of elementwise ops,
reductions and views (ONNX before opset 17 has no LayerNormalization,
torch.onnx writes SiLU as Sigmoid*Mul, AOTAutograd decomposes silu and
hardswish, Hugging Face writes RMSNorm and GPT-2's GELU by hand). One canonical op is
cheaper to run and lets later passes and backends pick a fused kernel.

Patterns are data, matched by the shared matcher of ``graphopt.ir.pattern``
(commutative operands and alternatives tried by backtracking, constants by
value). A rule is a function from a root node to a ``Rewrite`` (or None);
one driver runs the rules, checks what every rewrite must respect, and counts
which rule fired.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from graphopt.ir import Graph, Node, TensorType, Value
from graphopt.ir.pattern import Absent, Bound, Const, Pattern, Var, any_of, attr_or_default, match, matches, op
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass


def product(*factors: Pattern) -> Pattern:
    """A product of three factors, however the two multiplications associate."""
    a, b, c = factors
    return any_of(*(op("mul", f, op("mul", g, h)) for f, g, h in ((a, b, c), (b, a, c), (c, a, b))))


# --------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rewrite:
    """Replace the root's output by ``op(*inputs, **attrs)``; the ``matched`` nodes then go.

    A tensor among the inputs becomes a new constant.
    """

    op: str
    inputs: list[Value | torch.Tensor | None]
    attrs: dict[str, Any]
    matched: tuple[Node, ...]


Rule = Callable[[Node], "Rewrite | None"]
RULES: dict[str, list[tuple[str, Rule]]] = {}
"""For each root op, the rules to try in order (the more specific first)."""


def rule(*root_ops: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for root_op in root_ops:
            RULES.setdefault(root_op, []).append((fn.__name__, fn))
        return fn
    return register


X = Var("x")


def _square(v: Pattern) -> Pattern:
    return any_of(op("pow", v, Const(2.0)), op("mul", v, v))


def _div(a: Pattern, b: Pattern) -> Pattern:
    return op("div", a, b, rounding_mode=None)


def _gelu_form(inner: Pattern) -> Pattern:
    """``0.5 * x * (1 + inner)`` in any association and operand order."""
    return product(X, Const(0.5), op("add", inner, Const(1.0)))


_GELU_ERF = _gelu_form(op("erf", any_of(_div(X, Const(math.sqrt(2.0))), op("mul", X, Const(math.sqrt(0.5))))))
_CUBE = any_of(op("pow", X, Const(3.0)), product(X, X, X))
_GELU_TANH = _gelu_form(op("tanh", op("mul", Const(math.sqrt(2.0 / math.pi)),
                                      op("add", X, op("mul", Const(0.044715), _CUBE)))))


@rule("mul")
def gelu_erf(root: Node) -> Rewrite | None:
    """``0.5 * x * (1 + erf(x / sqrt(2)))`` (Hendrycks & Gimpel 2016, eq. 1): exact GELU."""
    m = match(_GELU_ERF, root)
    return None if m is None else Rewrite("gelu", [m["x"]], {"approximate": "none"}, m.nodes)


@rule("mul")
def gelu_tanh(root: Node) -> Rewrite | None:
    """``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``: GELU's tanh approximation."""
    m = match(_GELU_TANH, root)
    return None if m is None else Rewrite("gelu", [m["x"]], {"approximate": "tanh"}, m.nodes)


_SILU = op("mul", X, op("sigmoid", X))


@rule("mul")
def silu(root: Node) -> Rewrite | None:
    """``x * sigmoid(x)`` (Elfwing et al. 2018; AOTAutograd's decomposition of silu)."""
    m = match(_SILU, root)
    return None if m is None else Rewrite("silu", [m["x"]], {}, m.nodes)


_RELU6_OF_X_PLUS_3 = any_of(
    op("clamp", op("add", X, Const(3.0)), min=0.0, max=6.0),
    op("clamp", op("clamp", op("add", X, Const(3.0)), min=0.0, max=None), min=None, max=6.0),
)
_HARDSWISH = any_of(
    op("mul", X, op("hardsigmoid", X, alpha=1 / 6, beta=0.5)),
    _div(op("mul", X, _RELU6_OF_X_PLUS_3), Const(6.0)),
    op("mul", X, _div(_RELU6_OF_X_PLUS_3, Const(6.0))),
    product(X, _RELU6_OF_X_PLUS_3, Const(1 / 6)),
)


@rule("mul", "div")
def hardswish(root: Node) -> Rewrite | None:
    """``x * relu6(x + 3) / 6`` (Howard et al. 2019, "Searching for MobileNetV3", eq. 2), or ``x * hardsigmoid(x)``."""
    m = match(_HARDSWISH, root)
    return None if m is None else Rewrite("hardswish", [m["x"]], {}, m.nodes)


def _normalized_shape(x: Value, *reductions: Node) -> list[int] | None:
    """The static trailing shape of ``x`` that every reduction averages over, keeping dims; None if they differ."""
    shape = x.type.shape if isinstance(x.type, TensorType) else None
    if not shape:
        return None
    rank = len(shape)
    dim_sets = set()
    for node in reductions:
        dims = node.attrs["dims"]
        if dims is None or not node.attrs["keepdim"] or len(node.inputs[0].type.shape or ()) != rank:
            return None
        dim_sets.add(tuple(sorted(d % rank for d in dims)))
    if len(dim_sets) != 1:
        return None
    (dims,) = dim_sets
    trailing = shape[rank - len(dims):]
    if dims != tuple(range(rank - len(dims), rank)) or not all(isinstance(d, int) for d in trailing):
        return None
    return list(trailing)


def _layer_norm_forms() -> Pattern:
    """``(x - mean(x)) / sqrt(var(x) + eps)``, or the same times ``rsqrt``.

    The biased variance is ``mean((x - mean(x))^2)`` or ``var(x, correction=0)``.
    """
    centered = Bound("centered", op("sub", X, op("mean", X, bind="mean")))
    variance = any_of(op("mean", _square(centered), bind="variance"), op("var", X, correction=0.0, bind="variance"))
    var_plus_eps = op("add", variance, Const(name="eps"))
    return any_of(_div(centered, op("sqrt", var_plus_eps)), op("mul", centered, op("rsqrt", var_plus_eps)))


_LAYER_NORM = _layer_norm_forms()


@rule("div", "mul")
def layer_norm(root: Node) -> Rewrite | None:
    """Layer normalisation (Ba et al. 2016, eq. 4) over trailing dims, without the affine part."""
    for m in matches(_LAYER_NORM, root):
        shape = _normalized_shape(m["x"], m["mean"], m["variance"])
        if shape is not None:
            return Rewrite("layer_norm", [m["x"], None, None], {"normalized_shape": shape, "eps": m["eps"]},
                           m.nodes)
    return None


_MEAN_SQUARE_PLUS_EPS = op("add", op("mean", _square(X), bind="mean"), Const(name="eps"))
_RMS_NORM = any_of(op("mul", X, op("rsqrt", _MEAN_SQUARE_PLUS_EPS)), _div(X, op("sqrt", _MEAN_SQUARE_PLUS_EPS)),
                   op("mul", X, op("reciprocal", op("sqrt", _MEAN_SQUARE_PLUS_EPS))))


@rule("mul", "div")
def rms_norm(root: Node) -> Rewrite | None:
    """``x * rsqrt(mean(x^2) + eps)`` over trailing dims (Zhang & Sennrich 2019, eq. 4), without the gain.

    Registered after ``layer_norm``: the RMS norm of a centred ``x`` is its layer norm.
    """
    for m in matches(_RMS_NORM, root):
        shape = _normalized_shape(m["x"], m["mean"])
        if shape is not None:
            return Rewrite("rms_norm", [m["x"], None], {"normalized_shape": shape, "eps": m["eps"]}, m.nodes)
    return None


def _is_affine_parameter(v: Value, norm: Node) -> bool:
    """A tensor of exactly the normalized shape and the norm's dtype: it scales or shifts each normalized row."""
    return (isinstance(v.type, TensorType) and v.type.dtype == norm.output.type.dtype
            and v.type.shape == tuple(norm.attrs["normalized_shape"]))


_LAYER_NORM_TIMES_WEIGHT = op("mul", op("layer_norm", X, Absent(), Absent(), bind="norm"), Var("weight"))
_LAYER_NORM_PLUS_BIAS = op("add", op("layer_norm", X, any_of(Absent(), Var("weight")), Absent(), bind="norm"),
                           Var("bias"))
_RMS_NORM_TIMES_WEIGHT = op("mul", op("rms_norm", X, Absent(), bind="norm"), Var("weight"))


@rule("mul")
def layer_norm_weight(root: Node) -> Rewrite | None:
    """``layer_norm(x) * gamma`` takes gamma as its weight."""
    for m in matches(_LAYER_NORM_TIMES_WEIGHT, root):
        norm = m["norm"]
        if _is_affine_parameter(m["weight"], norm):
            return Rewrite("layer_norm", [m["x"], m["weight"], None], dict(norm.attrs), m.nodes)
    return None


@rule("add")
def layer_norm_bias(root: Node) -> Rewrite | None:
    """``layer_norm(x, gamma) + beta`` takes beta as its bias."""
    for m in matches(_LAYER_NORM_PLUS_BIAS, root):
        norm = m["norm"]
        if _is_affine_parameter(m["bias"], norm):
            return Rewrite("layer_norm", [m["x"], norm.inputs[1], m["bias"]], dict(norm.attrs), m.nodes)
    return None


@rule("mul")
def rms_norm_weight(root: Node) -> Rewrite | None:
    """``rms_norm(x) * g`` takes g as its weight."""
    for m in matches(_RMS_NORM_TIMES_WEIGHT, root):
        norm = m["norm"]
        if _is_affine_parameter(m["weight"], norm):
            return Rewrite("rms_norm", [m["x"], m["weight"]], dict(norm.attrs), m.nodes)
    return None


_GROUPED = op("reshape", X, bind="grouped")
_GROUP_NORM = op("reshape", any_of(
    op("layer_norm", _GROUPED, Absent(), Absent(), bind="norm"),
    op("group_norm", _GROUPED, any_of(Absent(), Var("ones")), any_of(Absent(), Var("zeros")), bind="norm"),
))


def _groups(x: Value, grouped: Value) -> int | None:
    """G when ``grouped`` is ``x`` ([N, C, *spatial]) viewed as [N, G, ...] with G dividing C: row-major
    order puts each run of C/G channels in one group."""
    xs, gs = (v.type.shape if isinstance(v.type, TensorType) and v.type.is_static else None for v in (x, grouped))
    if xs is None or gs is None or len(xs) < 2 or len(gs) < 3 or gs[0] != xs[0] or xs[1] % gs[1]:
        return None
    return gs[1]


def _filled_with(v: Value | None, number: float) -> bool:
    """Absent, or a non-trainable constant whose every entry is ``number`` (an affine step that does nothing)."""
    return v is None or (v.is_constant and not v.is_trainable and bool((v.data == number).all()))


@rule("reshape")
def group_norm(root: Node) -> Rewrite | None:
    """Group normalisation (Wu & He 2018, eq. 1 and §3.1): view as [N, G, ...], normalise each group, view back.

    The middle step is a layer norm over everything after G (a decomposed one
    becomes ``layer_norm`` first), or an instance norm of the view with unit
    scale and zero shift (torch.onnx's GroupNorm before opset 18).
    """
    for m in matches(_GROUP_NORM, root):
        norm, grouped = m["norm"], m["grouped"].output
        groups = _groups(m["x"], grouped)
        if groups is None:
            continue
        if norm.op == "layer_norm":
            fits = list(norm.attrs["normalized_shape"]) == list(grouped.type.shape[2:])
        else:
            fits = norm.attrs["num_groups"] == groups and _filled_with(m.bound.get("ones"), 1.0) \
                and _filled_with(m.bound.get("zeros"), 0.0)
        if fits:
            attrs = {"num_groups": groups, "eps": attr_or_default(norm, "eps")}
            return Rewrite("group_norm", [m["x"], None, None], attrs, m.nodes)
    return None


def _per_channel(v: Value, x: Value) -> torch.Tensor | None:
    """A non-trainable constant that broadcasts along dim 1 of ``x`` only, as the [C] vector group_norm takes."""
    if not v.is_constant or v.is_trainable or v.data.dtype != x.type.dtype or v.data.dim() > len(x.type.shape):
        return None
    shape = (1,) * (len(x.type.shape) - v.data.dim()) + tuple(v.data.shape)
    channels = x.type.shape[1]
    if shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return v.data.reshape(channels)


_GROUP_NORM_TIMES_WEIGHT = op("mul", op("group_norm", X, Absent(), Absent(), bind="norm"), Var("weight"))
_GROUP_NORM_PLUS_BIAS = op("add", op("group_norm", X, any_of(Absent(), Var("weight")), Absent(), bind="norm"),
                           Var("bias"))


@rule("mul")
def group_norm_weight(root: Node) -> Rewrite | None:
    """``group_norm(x) * gamma[C, 1, 1]`` takes gamma as its weight (a constant one: it is reshaped to [C])."""
    for m in matches(_GROUP_NORM_TIMES_WEIGHT, root):
        weight = _per_channel(m["weight"], m["x"])
        if weight is not None:
            return Rewrite("group_norm", [m["x"], weight, None], dict(m["norm"].attrs), m.nodes)
    return None


@rule("add")
def group_norm_bias(root: Node) -> Rewrite | None:
    """``group_norm(x, gamma) + beta[C, 1, 1]`` takes beta as its bias."""
    for m in matches(_GROUP_NORM_PLUS_BIAS, root):
        bias = _per_channel(m["bias"], m["x"])
        if bias is not None:
            return Rewrite("group_norm", [m["x"], m["norm"].inputs[1], bias], dict(m["norm"].attrs), m.nodes)
    return None


# -------------------------------------------------------------------- driver
def _self_contained(rewrite: Rewrite, root: Node) -> bool:
    """Only the root's output may be read outside the match: every other matched value dies with it."""
    inside = set(rewrite.matched)
    if any(isinstance(v, Value) and v.producer in inside for v in rewrite.inputs):
        return False
    return all(
        n is root or (n.is_pure and not any(o.is_graph_output or not set(o.users()) <= inside for o in n.outputs))
        for n in rewrite.matched)


def _remove_dead(graph: Graph, nodes: tuple[Node, ...]) -> None:
    """Remove the matched nodes, readers before producers, then the pattern constants only they read."""
    matched = set(nodes)
    constants = {id(v): v for n in nodes for v in n.inputs if v is not None and v.is_constant}
    for n in reversed(graph.nodes):
        if n in matched:
            graph.remove_node(n)
    for v in constants.values():
        graph.remove_constant(v)


@register_pass
@dataclass
class RecognizePatterns(Pass):
    """Replace primitive-op spellings of GELU, SiLU, HardSwish, LayerNorm, RMSNorm and GroupNorm by one op.

    Instruction selection by tree pattern matching (Aho, Ganapathi & Tjiang 1989,
    "Code generation using tree matching and dynamic programming"), here used to
    raise the level of the IR: each rule matches the expression tree under a
    root node (constants by value, see ``graphopt.ir.pattern.REL_TOL``; reductions must average
    over exactly the trailing, static dims with ``keepdim``; a norm's weight
    and bias must have exactly the normalized shape, or for group norm be
    per-channel). Nodes are visited in execution order, so a norm recognised
    at its division then absorbs the ``* gamma`` and ``+ beta`` that follow
    it, and a layer norm of a grouped view becomes a group norm at the view
    back.

    A rewrite happens only when every matched value other than the root's is
    read by matched nodes alone, and the canonical op's output has the
    root's exact type. Trainable parameters are never consumed as pattern
    constants (a learnt ``0.5`` is not GELU's); as layer/RMS norm weights they
    stay parameters, while a group norm's [C, 1, 1] weight must be reshaped
    to [C], so it is absorbed only when it is a plain constant (a reshaped
    copy could no longer be fine-tuned). Outputs agree with the primitive
    spelling to within float rounding, not bit for bit.
    """

    name = "recognize_patterns"
    kind = PassKind.EXACT
    ensures = ("patterns_recognized",)

    def call(self, graph: Graph) -> PassResult:
        stats = {name: 0 for rules in RULES.values() for name, _ in rules}
        for node in graph.nodes:
            if node.graph is None or len(node.outputs) != 1:
                continue
            for name, try_rule in RULES.get(node.op, ()):
                rewrite = try_rule(node)
                if rewrite is not None and self._apply(graph, node, rewrite):
                    stats[name] += 1
                    break
        return PassResult(graph, any(stats.values()), stats)

    def _apply(self, graph: Graph, root: Node, rewrite: Rewrite) -> bool:
        if not _self_contained(rewrite, root):
            return False
        made = {i: graph.add_constant(v, f"{root.name}_{rewrite.op}")
                for i, v in enumerate(rewrite.inputs) if isinstance(v, torch.Tensor)}
        inputs = [made.get(i, v) for i, v in enumerate(rewrite.inputs)]
        new = graph.add_node(rewrite.op, inputs, rewrite.attrs, before=root, meta={"created_by": self.name})
        if new.output.type != root.output.type:
            graph.remove_node(new)
            for v in made.values():
                graph.remove_constant(v)
            return False
        root.output.replace_by(new.output)
        _remove_dead(graph, rewrite.matched)
        return True
