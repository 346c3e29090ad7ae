"""Pattern recognition: primitive-op spellings of activations and norms become one canonical op.

Exporters and decompositions spell ``gelu``, ``silu``, ``hardswish``,
``layer_norm``, ``rms_norm`` and ``group_norm`` as chains of elementwise ops,
reductions and views (ONNX before opset 17 has no LayerNormalization,
torch.onnx writes SiLU as Sigmoid*Mul, AOTAutograd decomposes silu and
hardswish, Hugging Face writes RMSNorm and GPT-2's GELU by hand). One canonical op is
cheaper to run and lets later passes and backends pick a fused kernel.

A pattern is data: a tree of ``Op``/``Var``/``Const`` nodes matched against the
producers of a value, with commutative operands and alternatives tried by
backtracking. A rule is a function from a root node to a ``Rewrite`` (or None);
one driver runs the rules, checks what every rewrite must respect, and counts
which rule fired.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from graphopt.ir import Graph, Node, TensorType, Value
from graphopt.ir.registry import get_op
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass

from .cleanup import is_graph_output, is_pure, is_trainable, replace_value

_COMMUTATIVE = frozenset({"add", "mul"})
_REL_TOL = 1e-6
"""Constants match a wanted value to within this relative error, or two ulps of their own dtype if coarser:
``0.70710677`` (float32) is ``1/sqrt(2)``, ``0.6`` is not ``0.5``."""


# ------------------------------------------------------------------ matching
@dataclass(frozen=True)
class Match:
    """What a pattern bound so far: named values, constants and nodes, and every node it consumed."""

    bound: dict[str, Any] = field(default_factory=dict)
    nodes: tuple[Node, ...] = ()

    def __getitem__(self, name: str) -> Any:
        return self.bound[name]

    def bind(self, name: str, thing: Any) -> Match | None:
        """Bind ``name``; a name bound before must name the very same thing."""
        if name in self.bound:
            return self if self.bound[name] is thing else None
        return Match({**self.bound, name: thing}, self.nodes)

    def consume(self, node: Node) -> Match:
        return self if node in self.nodes else Match(self.bound, (*self.nodes, node))


class Pattern:
    """A predicate on a value and the nodes that produced it, binding names as it goes."""

    def matches(self, v: Value | None, m: Match) -> Iterator[Match]:
        """Every way this pattern matches value ``v`` extending ``m``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Var(Pattern):
    """Any value; every occurrence of the same name must be the same value."""

    name: str

    def matches(self, v, m):
        bound = None if v is None else m.bind(self.name, v)
        if bound is not None:
            yield bound


@dataclass(frozen=True)
class Absent(Pattern):
    """An optional input that is not given."""

    def matches(self, v, m):
        if v is None:
            yield m


@dataclass(frozen=True)
class Const(Pattern):
    """A one-element constant equal to ``value`` (see ``_REL_TOL``); with ``name``, any such constant, bound."""

    value: float | None = None
    name: str | None = None

    def matches(self, v, m):
        number = _scalar_constant(v)
        if number is None or (self.value is not None and not _close(number, self.value, v.data.dtype)):
            return
        bound = m if self.name is None else m.bind(self.name, number)
        if bound is not None:
            yield bound


@dataclass(frozen=True)
class Op(Pattern):
    """A value produced by ``op`` from inputs matching ``args`` (either order for add and mul).

    ``attrs`` must match the node's attributes (a missing one reads as the op's
    default; floats to within ``_REL_TOL``); ``bind`` names the node for the rule to inspect.
    """

    op: str
    args: tuple[Pattern, ...]
    attrs: dict[str, Any]
    bind: str | None = None

    def matches(self, v, m):
        node = None if v is None else v.producer
        if node is None or node.op != self.op or len(node.inputs) != len(self.args) or len(node.outputs) != 1:
            return
        if not all(_same_attr(_attr(node, k), want) for k, want in self.attrs.items()):
            return
        m = m if self.bind is None else m.bind(self.bind, node)
        if m is None:
            return
        m = m.consume(node)
        for args in [self.args, self.args[::-1]] if self.op in _COMMUTATIVE else [self.args]:
            yield from _match_all(args, node.inputs, m)


def op(name: str, *args: Pattern, bind: str | None = None, **attrs: Any) -> Op:
    return Op(name, args, attrs, bind)


@dataclass(frozen=True)
class Bound(Pattern):
    """``pattern`` at its first occurrence, bound to ``name``; later occurrences must be the same value."""

    name: str
    pattern: Pattern

    def matches(self, v, m):
        if self.name in m.bound:
            if m.bound[self.name] is v:
                yield m
            return
        for m1 in self.pattern.matches(v, m):
            bound = m1.bind(self.name, v)
            if bound is not None:
                yield bound


@dataclass(frozen=True)
class AnyOf(Pattern):
    """The first alternative that matches, then the next on backtracking."""

    alternatives: tuple[Pattern, ...]

    def matches(self, v, m):
        for p in self.alternatives:
            yield from p.matches(v, m)


def any_of(*alternatives: Pattern) -> AnyOf:
    return AnyOf(alternatives)


def _match_all(patterns: tuple[Pattern, ...], values: tuple[Value | None, ...], m: Match) -> Iterator[Match]:
    if not patterns:
        yield m
        return
    for m1 in patterns[0].matches(values[0], m):
        yield from _match_all(patterns[1:], values[1:], m1)


def product(*factors: Pattern) -> Pattern:
    """A product of three factors, however the two multiplications associate."""
    a, b, c = factors
    return any_of(*(op("mul", f, op("mul", g, h)) for f, g, h in ((a, b, c), (b, a, c), (c, a, b))))


def _scalar_constant(v: Value | None) -> float | None:
    """The value of a one-element, non-trainable numeric constant, else None."""
    if v is None or not v.is_constant or v.data.numel() != 1 or is_trainable(v):
        return None
    if v.data.dtype == torch.bool or v.data.is_complex():
        return None
    return float(v.data.reshape(()).item())


def _close(number: float, want: float, dtype: torch.dtype = torch.float64) -> bool:
    tol = max(_REL_TOL, 2 * torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0
    return math.isclose(number, want, rel_tol=tol, abs_tol=0.0)


def _attr(node: Node, key: str) -> Any:
    """A node's attribute, or the default its op's torch implementation gives it."""
    if key in node.attrs:
        return node.attrs[key]
    return _defaults(node.op).get(key)


@functools.cache
def _defaults(op_name: str) -> dict[str, Any]:
    impl = get_op(op_name).torch_impl
    try:
        params = inspect.signature(impl).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _same_attr(actual: Any, want: Any) -> bool:
    if isinstance(want, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return _close(float(actual), want)
    return actual == want


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


def _matches(pattern: Pattern, root: Node) -> Iterator[Match]:
    """Every match of ``pattern`` at ``root``, for rules that check more than the pattern says."""
    return pattern.matches(root.output, Match())


def _first(pattern: Pattern, root: Node) -> Match | None:
    return next(_matches(pattern, root), None)


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
    m = _first(_GELU_ERF, root)
    return None if m is None else Rewrite("gelu", [m["x"]], {"approximate": "none"}, m.nodes)


@rule("mul")
def gelu_tanh(root: Node) -> Rewrite | None:
    """``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``: GELU's tanh approximation."""
    m = _first(_GELU_TANH, root)
    return None if m is None else Rewrite("gelu", [m["x"]], {"approximate": "tanh"}, m.nodes)


_SILU = op("mul", X, op("sigmoid", X))


@rule("mul")
def silu(root: Node) -> Rewrite | None:
    """``x * sigmoid(x)`` (Elfwing et al. 2018; AOTAutograd's decomposition of silu)."""
    m = _first(_SILU, root)
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
    m = _first(_HARDSWISH, root)
    return None if m is None else Rewrite("hardswish", [m["x"]], {}, m.nodes)


def _normalized_shape(x: Value, *reductions: Node) -> list[int] | None:
    """The static trailing shape of ``x`` that every reduction averages over, keeping dims; None if they differ."""
    shape = x.type.shape if isinstance(x.type, TensorType) else None
    if not shape:
        return None
    rank = len(shape)
    dim_sets = set()
    for node in reductions:
        dims = node.attrs.get("dims")
        if dims is None or not node.attrs.get("keepdim") or len(node.inputs[0].type.shape or ()) != rank:
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
    for m in _matches(_LAYER_NORM, root):
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
    for m in _matches(_RMS_NORM, root):
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
    for m in _matches(_LAYER_NORM_TIMES_WEIGHT, root):
        norm = m["norm"]
        if _is_affine_parameter(m["weight"], norm):
            return Rewrite("layer_norm", [m["x"], m["weight"], None], dict(norm.attrs), m.nodes)
    return None


@rule("add")
def layer_norm_bias(root: Node) -> Rewrite | None:
    """``layer_norm(x, gamma) + beta`` takes beta as its bias."""
    for m in _matches(_LAYER_NORM_PLUS_BIAS, root):
        norm = m["norm"]
        if _is_affine_parameter(m["bias"], norm):
            return Rewrite("layer_norm", [m["x"], norm.inputs[1], m["bias"]], dict(norm.attrs), m.nodes)
    return None


@rule("mul")
def rms_norm_weight(root: Node) -> Rewrite | None:
    """``rms_norm(x) * g`` takes g as its weight."""
    for m in _matches(_RMS_NORM_TIMES_WEIGHT, root):
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
    return v is None or (v.is_constant and not is_trainable(v) and bool((v.data == number).all()))


@rule("reshape")
def group_norm(root: Node) -> Rewrite | None:
    """Group normalisation (Wu & He 2018, eq. 1 and §3.1): view as [N, G, ...], normalise each group, view back.

    The middle step is a layer norm over everything after G (a decomposed one
    becomes ``layer_norm`` first), or an instance norm of the view with unit
    scale and zero shift (torch.onnx's GroupNorm before opset 18).
    """
    for m in _matches(_GROUP_NORM, root):
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
            return Rewrite("group_norm", [m["x"], None, None], {"num_groups": groups, "eps": _attr(norm, "eps")},
                           m.nodes)
    return None


def _per_channel(v: Value, x: Value) -> torch.Tensor | None:
    """A non-trainable constant that broadcasts along dim 1 of ``x`` only, as the [C] vector group_norm takes."""
    if not v.is_constant or is_trainable(v) or v.data.dtype != x.type.dtype or v.data.dim() > len(x.type.shape):
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
    for m in _matches(_GROUP_NORM_TIMES_WEIGHT, root):
        weight = _per_channel(m["weight"], m["x"])
        if weight is not None:
            return Rewrite("group_norm", [m["x"], weight, None], dict(m["norm"].attrs), m.nodes)
    return None


@rule("add")
def group_norm_bias(root: Node) -> Rewrite | None:
    """``group_norm(x, gamma) + beta[C, 1, 1]`` takes beta as its bias."""
    for m in _matches(_GROUP_NORM_PLUS_BIAS, root):
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
        n is root or (is_pure(n) and not any(is_graph_output(o) or not set(o.users()) <= inside for o in n.outputs))
        for n in rewrite.matched)


def _remove_dead(graph: Graph, nodes: tuple[Node, ...]) -> None:
    """Remove the matched nodes, readers before producers, then the pattern constants only they read."""
    matched = set(nodes)
    constants = {id(v): v for n in nodes for v in n.inputs if v is not None and v.is_constant}
    for n in reversed(graph.nodes):
        if n in matched:
            graph.remove_node(n)
    for v in constants.values():
        if not v.uses() and not is_graph_output(v) and graph.constants.get(v.name) is v:
            del graph.constants[v.name]


@register_pass
@dataclass
class RecognizePatterns(Pass):
    """Replace primitive-op spellings of GELU, SiLU, HardSwish, LayerNorm, RMSNorm and GroupNorm by one op.

    Instruction selection by tree pattern matching (Aho, Ganapathi & Tjiang 1989,
    "Code generation using tree matching and dynamic programming"), here used to
    raise the level of the IR: each rule matches the expression tree under a
    root node (constants by value, see ``_REL_TOL``; reductions must average
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
                del graph.constants[v.name]
            return False
        replace_value(root.output, new.output)
        _remove_dead(graph, rewrite.matched)
        return True
