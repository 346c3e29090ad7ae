"""Tree patterns over the IR: match the producers of a value against a pattern, binding names.

A pattern is data: ``op("mul", Var("x"), op("sigmoid", Var("x")))`` is
``x * sigmoid(x)``. Matching walks from a value up through its producers and
backtracks over the choices a pattern leaves open (the two operand orders of
a commutative op, the alternatives of ``any_of``), yielding every way it fits.
It reads only the IR and the op registry, so any pass, backend or cost model
may use it; what to do with a match is the caller's business.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .graph import Node, Value
from .registry import get_op

REL_TOL = 1e-6
"""Constants match a wanted value to within this relative error, or two ulps of their own dtype if coarser:
``0.70710677`` (float32) is ``1/sqrt(2)``, ``0.6`` is not ``0.5``."""


@dataclass(frozen=True)
class Match:
    """What a pattern bound so far: named values, constants and nodes, and every node it consumed.

    Immutable, so an alternative that fails leaves the match it started from as it was.
    """

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


def matches(pattern: Pattern, root: Node | Value) -> Iterator[Match]:
    """Every match of ``pattern`` at ``root`` (a value, or a node's single output), for callers that check more."""
    return pattern.matches(root.output if isinstance(root, Node) else root, Match())


def match(pattern: Pattern, root: Node | Value) -> Match | None:
    """The first match of ``pattern`` at ``root``, or None."""
    return next(matches(pattern, root), None)


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
    """A one-element constant equal to ``value`` (see ``REL_TOL``); with ``name``, any such constant, bound."""

    value: float | None = None
    name: str | None = None

    def matches(self, v, m):
        number = scalar_constant(v)
        if number is None or (self.value is not None and not close(number, self.value, v.data.dtype)):
            return
        bound = m if self.name is None else m.bind(self.name, number)
        if bound is not None:
            yield bound


@dataclass(frozen=True)
class Op(Pattern):
    """A value produced by ``op`` from inputs matching ``args``, in either order when the op is commutative.

    ``attrs`` must match the node's attributes (a missing one reads as the
    schema's default; floats to within ``REL_TOL``, lists equal to tuples);
    ``bind`` names the node for the caller to inspect.
    """

    op: str
    args: tuple[Pattern, ...]
    attrs: dict[str, Any]
    bind: str | None = None

    def matches(self, v, m):
        node = None if v is None else v.producer
        if node is None or node.op != self.op or len(node.inputs) != len(self.args) or len(node.outputs) != 1:
            return
        if not all(_same_attr(attr_or_default(node, k), want) for k, want in self.attrs.items()):
            return
        m = m if self.bind is None else m.bind(self.bind, node)
        if m is None:
            return
        m = m.consume(node)
        orders = [self.args, self.args[::-1]] if get_op(self.op).commutative else [self.args]
        for args in orders:
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


def scalar_constant(v: Value | None) -> float | None:
    """The value of a one-element, non-trainable numeric constant, else None (a learnt 0.5 is no pattern's)."""
    if v is None or not v.is_constant or v.data.numel() != 1 or v.is_trainable:
        return None
    if v.data.dtype == torch.bool or v.data.is_complex():
        return None
    return float(v.data.reshape(()).item())


def close(number: float, want: float, dtype: torch.dtype = torch.float64) -> bool:
    """``number``, stored in ``dtype``, stands for ``want`` (see ``REL_TOL``); integers must be exact."""
    tol = max(REL_TOL, 2 * torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0
    return math.isclose(number, want, rel_tol=tol, abs_tol=0.0)


def attr_or_default(node: Node, key: str) -> Any:
    """A node's attribute, or its op's schema default (None for a name the schema lacks or requires)."""
    if key in node.attrs:
        return node.attrs[key]
    try:
        return get_op(node.op).default(key)
    except KeyError:
        return None


def _same_attr(actual: Any, want: Any) -> bool:
    if isinstance(want, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return close(float(actual), want)
    if isinstance(want, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(actual) == len(want) and all(map(_same_attr, actual, want))
    return actual == want
