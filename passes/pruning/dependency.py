"""DepGraph on the IR: which channels of which values must be removed together.

"Towards Any Structural Pruning" (Fang et al., CVPR 2023) couples the prunable
dims of layers into groups. Here the unit is a *slot*, one dim of one value, and
every index of a slot is an element of a union-find. Each op rule links the
elements it maps one to one (a conv's output channel to its weight row, an add's
operand channel to the output channel, a flatten's ``c*HW + j`` to channel ``c``)
and blocks the dims it cannot map. A connected component of elements is one
channel: removing all of it, and only it, keeps every op well formed. Components
that touch the same slots the same number of times form a ``Group``; a group
with any blocked element (a graph input or output, an unknown op, an ignored
layer) is kept but marked unprunable with the reason, so it is never wrong.

Reshapes that split or merge dims (attention heads, flatten, channel shuffle)
relate one flat index space to several dims; the rule follows one *free* dim per
side and blocks the rest. The free dim is chosen by the ``heads`` mode (the head
or the head_dim dim of an ``sdpa``), then by which dim can carry channels.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from graphopt.ir import Graph, Node, Value
from graphopt.ir.registry import get_op
from graphopt.ir.types import TensorType

__all__ = ["Member", "Group", "build_groups"]

HEAD_MODES = ("heads", "head_dim")


@dataclass(frozen=True)
class Member:
    """One value's share of a group: group channel c is the slice positions[c] (k indices) of `dim`."""

    value: Value
    dim: int
    positions: torch.Tensor  # int64, (group.size, k)


@dataclass
class Group:
    """Channels that must be removed together (DepGraph's coupled dims), as one index space of `size`."""

    id: int
    size: int
    members: list[Member]
    label: str
    prunable: bool = True
    reason: str = ""
    min_keep: int = 1

    def parameters(self) -> list[Member]:
        """Members whose value is a constant or parameter (the ones that get sliced)."""
        return [m for m in self.members if m.value.is_constant]


# ------------------------------------------------------------------ union-find
class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, x):
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:
            parent[x], x = root, parent.get(x, x)
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


Slot = tuple[int, int]  # (id(value), dim)


@dataclass
class _Chunk:
    """A reshape's coupled dims: ``ins`` of ``src`` hold the same flat indices as ``outs`` of ``dst``."""

    node: Node
    src: Value
    ins: list[int]
    dst: Value
    outs: list[int]


@dataclass
class _Builder:
    graph: Graph
    heads: str
    values: dict[int, Value] = field(default_factory=dict)
    base: dict[Slot, int] = field(default_factory=dict)
    owner: list[tuple[Slot, int]] = field(default_factory=list)  # element -> (slot, base)
    links: list[tuple[Slot, torch.Tensor, Slot, torch.Tensor]] = field(default_factory=list)
    blocked: dict[Slot, str] = field(default_factory=dict)
    labels: dict[Slot, str] = field(default_factory=dict)
    chunks: list[_Chunk] = field(default_factory=list)
    claimed: set[Slot] = field(default_factory=set)
    weight_derived: set[int] = field(default_factory=set)  # ids of values computed from constants only

    # ----------------------------------------------------------- rule helpers
    def size(self, v: Value, d: int) -> int | None:
        shape = v.type.shape if isinstance(v.type, TensorType) else None
        if shape is None or not -len(shape) <= d < len(shape):
            return None
        s = shape[d]
        return s if isinstance(s, int) else None

    def slot(self, v: Value, d: int) -> Slot:
        rank = len(v.type.shape)
        self.values[id(v)] = v
        return (id(v), d % rank)

    def link(self, a: Value, da: int, ia: torch.Tensor, b: Value, db: int, ib: torch.Tensor) -> None:
        """Element ia[n] of a's dim da is the same channel as element ib[n] of b's dim db."""
        sa, sb = self.slot(a, da), self.slot(b, db)
        self.claimed.update((sa, sb))
        if self.size(a, da) is None or self.size(b, db) is None:
            return  # symbolic: left unclaimed-equivalent below
        self.links.append((sa, ia, sb, ib))

    def same(self, a: Value, da: int, b: Value, db: int) -> None:
        n = self.size(a, da)
        if n is None or n != self.size(b, db):
            return
        idx = torch.arange(n)
        self.link(a, da, idx, b, db, idx)

    def block(self, v: Value, d: int, reason: str) -> None:
        s = self.slot(v, d)
        self.claimed.add(s)
        self.blocked.setdefault(s, reason)

    def label(self, v: Value, d: int, name: str) -> None:
        self.labels[self.slot(v, d)] = name

    def element(self, s: Slot) -> int:
        if s not in self.base:
            self.base[s] = len(self.owner)
            n = self.size(self.values[s[0]], s[1]) or 0
            self.owner.extend([(s, len(self.owner))] * n)
        return self.base[s]

    # ------------------------------------------------------------------ build
    def free(self, v: Value, d: int) -> None:
        """Dim ``d`` of ``v`` maps to nothing and blocks nothing (a statistic over a weight's channels)."""
        self.claimed.add(self.slot(v, d))

    def run(self) -> None:
        for node in self.graph.nodes:
            if all(v is None or v.is_constant or id(v) in self.weight_derived for v in node.inputs):
                self.weight_derived.update(id(o) for o in node.outputs)
        for v in self.graph.inputs:
            self._block_all(v, f"reaches graph input %{v.name}")
        for v in self.graph.outputs:
            self._block_all(v, f"reaches graph output %{v.name}")
        for node in self.graph.nodes:
            self.claimed = set()
            rule = RULES.get(node.op)
            if rule is None or not self._all_static(node):
                reason = f"{node.op} {node.name} is not modelled" if rule is None else \
                    f"{node.op} {node.name} has symbolic or unknown shapes"
                for v in (*node.inputs, *node.outputs):
                    self._block_all(v, reason)
                continue
            rule(node, self)
            for v in (*node.inputs, *node.outputs):
                if _tensor(v):
                    for d in range(len(v.type.shape)):
                        if self.slot(v, d) not in self.claimed:
                            self.block(v, d, f"{node.op} {node.name} does not map dim {d} of %{v.name}")
        self._resolve_chunks()

    def _all_static(self, node: Node) -> bool:
        return all(v is None or not isinstance(v.type, TensorType) or v.type.shape is not None
                   for v in (*node.inputs, *node.outputs))

    def _block_all(self, v: Value | None, reason: str) -> None:
        if _tensor(v):
            for d in range(len(v.type.shape)):
                self.block(v, d, reason)

    # ------------------------------------------------------- reshape chunks
    def _resolve_chunks(self) -> None:
        """Pick each chunk's free dims: head-labelled ones first, so labels flow across reshapes."""
        want = "H" if self.heads == "heads" else "D"
        slots = _UnionFind()
        for sa, _, sb, _ in self.links:
            slots.union(sa, sb)
        pending = list(self.chunks)
        while pending:
            info = self._slot_info(slots)
            ready = [c for c in pending if any(
                want in info.get(slots.find(self.slot(v, d)), ((), False, False))[0]
                for v, dims in ((c.src, c.ins), (c.dst, c.outs)) for d in dims)]
            chunk = ready[0] if ready else pending[0]
            pending.remove(chunk)
            a = self._free(chunk.src, chunk.ins, info, slots, want)
            b = self._free(chunk.dst, chunk.outs, info, slots, want)
            flat = torch.arange(_prod(self.size(chunk.src, d) for d in chunk.ins))
            self.link(chunk.src, a, _digit(flat, chunk.src, chunk.ins, a, self),
                      chunk.dst, b, _digit(flat, chunk.dst, chunk.outs, b, self))
            slots.union(self.slot(chunk.src, a), self.slot(chunk.dst, b))
            for v, dims, free in ((chunk.src, chunk.ins, a), (chunk.dst, chunk.outs, b)):
                for d in dims:
                    if d != free and self.size(v, d) != 1:
                        self.block(v, d, f"{chunk.node.op} {chunk.node.name} splits or merges dim {d} "
                                         f"of %{v.name} into another")

    def _slot_info(self, slots: _UnionFind) -> dict:
        """Per slot component: (labels, blocked, has a parameter)."""
        info: dict = {}
        for s in {*self.labels, *self.blocked, *(s for s, _, t, _ in self.links), *(t for _, _, t, _ in self.links)}:
            root = slots.find(s)
            labels, blocked, param = info.get(root, ((), False, False))
            if s in self.labels:
                labels = (*labels, self.labels[s])
            info[root] = (labels, blocked or s in self.blocked, param or self.values[s[0]].is_constant)
        return info

    def _free(self, v: Value, dims: list[int], info: dict, slots: _UnionFind, want: str) -> int:
        def score(k: int):
            d = dims[k]
            labels, blocked, param = info.get(slots.find(self.slot(v, d)), ((), False, False))
            return (want in labels, not blocked, param, self.size(v, d), -k)
        return dims[max(range(len(dims)), key=score)]

    # ------------------------------------------------------------------ groups
    def groups(self, ignored: set[str]) -> list[Group]:
        uf = _UnionFind()
        for sa, ia, sb, ib in self.links:
            ea, eb = self.element(sa), self.element(sb)
            for x, y in zip((ia + ea).tolist(), (ib + eb).tolist()):
                uf.union(x, y)
        for s in list(self.blocked):
            self.element(s)
        comps: dict[int, list[int]] = {}
        for e in range(len(self.owner)):
            comps.setdefault(uf.find(e), []).append(e)
        by_sig: dict[tuple, list[dict[Slot, list[int]]]] = {}
        for elems in comps.values():
            per: dict[Slot, list[int]] = {}
            for e in elems:
                s, base = self.owner[e]
                per.setdefault(s, []).append(e - base)
            sig = tuple(sorted((s, len(ix)) for s, ix in per.items()))
            by_sig.setdefault(sig, []).append(per)
        order = {id(v): k for k, v in enumerate(self.graph.values())}
        groups = []
        for sig, channels in by_sig.items():
            slots = sorted((s for s, _ in sig), key=lambda s: (order.get(s[0], 1 << 30), s[1]))
            if not any(_is_weight(self.values[s[0]]) for s in slots) or \
                    all(self.values[s[0]].is_constant for s in slots):
                continue  # no parameter to slice, or a weight's own unmapped dim (a conv kernel)
            head = next((s for s in slots if _is_weight(self.values[s[0]]) and s[1] == 0),
                        next(s for s in slots if _is_weight(self.values[s[0]])))
            channels.sort(key=lambda per: min(per[head]))
            members = [Member(self.values[s[0]], s[1], torch.tensor([sorted(per[s]) for per in channels],
                                                                     dtype=torch.int64)) for s in slots]
            reasons = [self.blocked[s] for s in slots if s in self.blocked]
            reasons += [f"ignored: {self.values[s[0]].name}" for s in slots
                        if s[1] == 0 and self.values[s[0]].name in ignored]
            groups.append(Group(len(groups), len(channels), members,
                                f"{self.values[head[0]].name}[{head[1]}]",
                                prunable=not reasons and len(channels) > 1, reason=reasons[0] if reasons else
                                ("" if len(channels) > 1 else "a single channel cannot be removed")))
        groups.sort(key=lambda g: (order.get(id(g.members[0].value), 1 << 30), g.label))
        seen: dict[str, int] = {}
        for k, g in enumerate(groups):
            g.id = k
            seen[g.label] = seen.get(g.label, 0) + 1
            if seen[g.label] > 1:  # one weight split into several groups (concat/split halves)
                g.label = f"{g.label}#{seen[g.label] - 1}"
        return groups


def _tensor(v: Value | None) -> bool:
    return v is not None and isinstance(v.type, TensorType) and v.type.shape is not None


def _is_weight(v: Value) -> bool:
    return v.is_parameter and v.data.is_floating_point() and v.data.dim() > 0


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _digit(flat: torch.Tensor, v: Value, dims: list[int], d: int, b: _Builder) -> torch.Tensor:
    """Index along dim ``d`` of each flat (row-major) position over ``dims``."""
    stride = _prod(b.size(v, k) for k in dims[dims.index(d) + 1:])
    return (flat // stride) % b.size(v, d)


# ---------------------------------------------------------------------- rules
Rule = Callable[[Node, _Builder], None]
RULES: dict[str, Rule] = {}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        for name in ops:
            RULES[name] = fn
        return fn
    return wrap


def _rank(v: Value | None) -> int:
    return len(v.type.shape) if _tensor(v) else -1


def _broadcast(node: Node, b: _Builder, operands: Sequence[Value | None]) -> None:
    """Pointwise with broadcasting: a dim of an operand that matches the output is the same channel."""
    for out in node.outputs:
        if not _tensor(out):
            continue
        r = _rank(out)
        for v in operands:
            if not _tensor(v):
                continue
            shift = r - _rank(v)
            for d in range(_rank(v)):
                if shift + d >= 0:
                    b.same(v, d, out, shift + d)


def _elementwise(node: Node, b: _Builder) -> None:
    _broadcast(node, b, node.inputs)


for _name in ("relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "neg", "abs", "erf", "reciprocal",
              "sign", "silu", "mish", "selu", "hardswish", "identity", "add", "sub", "mul", "div", "pow",
              "maximum", "minimum", "where", "gelu", "leaky_relu", "elu", "celu", "softplus", "hardsigmoid",
              "clamp", "cast", "dropout", "contiguous"):
    RULES[_name] = _elementwise


NOT_MODELLED: dict[str, str] = {
    **dict.fromkeys(["acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "ceil", "cos", "cosh", "floor",
                     "fmod", "remainder", "round", "sin", "sinh", "tan", "isinf", "isnan", "eq", "ne", "lt", "le",
                     "gt", "ge", "logical_and", "logical_or", "logical_xor", "logical_not", "bitwise_and",
                     "bitwise_or", "bitwise_xor", "bitwise_not"],
                    "pointwise, not yet listed with the pointwise rule: the channels it touches are kept"),
    **dict.fromkeys(["matmul", "einsum", "gather", "index", "index_select", "take", "argmax", "argmin", "cumsum",
                     "topk", "flip", "roll", "repeat", "tril", "triu", "broadcast_to", "stack"],
                    "its index mapping is not followed: the channels it touches are kept"),
    **dict.fromkeys(["arange", "full", "full_like", "shape"], "makes a tensor from sizes: no channel flows through"),
}
"""Canonical ops without a rule, and why: ``build_groups`` blocks every dim they touch, so pruning stays correct."""


@rule("conv")
def _conv(node: Node, b: _Builder) -> None:
    """Out channels = weight rows = bias; in channels = weight dim 1, per group of channels."""
    x, w, bias = (list(node.inputs) + [None])[:3]
    out = node.output
    if node.attrs["transposed"]:
        return
    groups = node.attrs["groups"]
    cin, cout = b.size(x, 1), b.size(out, 1)
    b.same(x, 0, out, 0)
    if groups == 1:
        b.same(x, 1, w, 1)
        b.same(out, 1, w, 0)
        if bias is not None:
            b.same(out, 1, bias, 0)
        return
    # grouped (depthwise included): a whole conv group is one channel, `groups` shrinks with it
    gi, go = torch.arange(cin) // (cin // groups), torch.arange(cout) // (cout // groups)
    first_in = gi * (cin // groups)
    b.link(x, 1, torch.arange(cin), x, 1, first_in)
    b.link(out, 1, torch.arange(cout), x, 1, go * (cin // groups))
    b.same(out, 1, w, 0)
    if bias is not None:
        b.same(out, 1, bias, 0)


@rule("linear")
def _linear(node: Node, b: _Builder) -> None:
    x, w, bias = (list(node.inputs) + [None])[:3]
    b.same(x, -1, w, 1)
    b.same(node.output, -1, w, 0)
    if bias is not None:
        b.same(node.output, -1, bias, 0)


@rule("gemm")
def _gemm(node: Node, b: _Builder) -> None:
    """ONNX Gemm: like linear, with the contraction dims picked by trans_a/trans_b."""
    a, w, c = (list(node.inputs) + [None])[:3]
    out = node.output
    b.same(a, 0 if node.attrs["trans_a"] else 1, w, 1 if node.attrs["trans_b"] else 0)
    b.same(out, 1, w, 0 if node.attrs["trans_b"] else 1)
    if _tensor(c):
        _broadcast(node, b, [c])


@rule("batch_norm")
def _batch_norm(node: Node, b: _Builder) -> None:
    x, out = node.inputs[0], node.output
    for d in range(_rank(x)):
        b.same(x, d, out, d)
    for p in node.inputs[1:]:
        if p is not None:
            b.same(out, 1, p, 0)


@rule("layer_norm", "rms_norm")
def _layer_norm(node: Node, b: _Builder) -> None:
    """Normalized dims couple with the affine params; removing them changes the statistics (not exact)."""
    x, out = node.inputs[0], node.output
    k = len(node.attrs["normalized_shape"])
    for d in range(_rank(x)):
        b.same(x, d, out, d)
    for p in node.inputs[1:3]:
        if _tensor(p):
            for d in range(_rank(p)):
                b.same(p, d, out, _rank(out) - k + d)


@rule("group_norm")
def _group_norm(node: Node, b: _Builder) -> None:
    """Statistics are per norm group, so a whole norm group is one channel (exact)."""
    x, out = node.inputs[0], node.output
    c, g = b.size(x, 1), node.attrs["num_groups"]
    for d in range(_rank(x)):
        b.same(x, d, out, d)
    if c is not None:
        idx = torch.arange(c)
        b.link(x, 1, idx, x, 1, idx // (c // g) * (c // g))
    for p in node.inputs[1:3]:
        if p is not None:
            b.same(out, 1, p, 0)


@rule("softmax", "log_softmax")
def _softmax(node: Node, b: _Builder) -> None:
    x, out = node.inputs[0], node.output
    axis = node.attrs["dim"] % _rank(x)
    for d in range(_rank(x)):
        if d != axis:
            b.same(x, d, out, d)


@rule("sum", "mean", "amax", "amin", "prod", "var", "any", "all")
def _reduce(node: Node, b: _Builder) -> None:
    """Kept dims map through. A reduction over a weight (weight standardisation) leaves its
    reduced dims prunable: removing channels changes the statistic, as in a layer norm."""
    x, out = node.inputs[0], node.output
    r = _rank(x)
    dims = set(range(r)) if node.attrs["dims"] is None else {d % r for d in node.attrs["dims"]}
    keep = node.attrs["keepdim"]
    k = 0
    for d in range(r):
        if d not in dims:
            b.same(x, d, out, d if keep else k)
        elif id(x) in b.weight_derived:
            b.free(x, d)
        k += d not in dims


@rule("max_pool", "avg_pool", "adaptive_avg_pool", "interpolate")
def _pool(node: Node, b: _Builder) -> None:
    x, out = node.inputs[0], node.output
    b.same(x, 0, out, 0)
    b.same(x, 1, out, 1)


@rule("concat")
def _concat(node: Node, b: _Builder) -> None:
    out = node.output
    axis = node.attrs["dim"] % _rank(out)
    offset = 0
    for v in node.inputs:
        for d in range(_rank(v)):
            if d != axis:
                b.same(v, d, out, d)
        n = b.size(v, axis)
        if n is None:
            return
        b.link(v, axis, torch.arange(n), out, axis, torch.arange(n) + offset)
        offset += n


@rule("split")
def _split(node: Node, b: _Builder) -> None:
    x = node.inputs[0]
    axis = node.attrs["dim"] % _rank(x)
    offset = 0
    for out in node.outputs:
        for d in range(_rank(x)):
            if d != axis:
                b.same(x, d, out, d)
        n = b.size(out, axis)
        b.link(x, axis, torch.arange(n) + offset, out, axis, torch.arange(n))
        offset += n


@rule("slice")
def _slice(node: Node, b: _Builder) -> None:
    x, out = node.inputs[0], node.output
    axis = node.attrs["dim"] % _rank(x)
    for d in range(_rank(x)):
        if d != axis:
            b.same(x, d, out, d)
    n, total = b.size(out, axis), b.size(x, axis)
    if node.attrs["step"] == 1 and n is not None and total is not None:
        start = _clamp_index(node.attrs["start"], total)
        b.link(x, axis, torch.arange(n) + start, out, axis, torch.arange(n))


def _clamp_index(i: int, n: int) -> int:
    return min(max(i + n if i < 0 else i, 0), n)


@rule("select")
def _select(node: Node, b: _Builder) -> None:
    x, out = node.inputs[0], node.output
    axis = node.attrs["dim"] % _rank(x)
    for d in range(_rank(x)):
        if d != axis:
            b.same(x, d, out, d - (d > axis))


@rule("squeeze", "unsqueeze")
def _squeeze(node: Node, b: _Builder) -> None:
    """Dims of size > 1 keep their order; size-1 dims carry no channels."""
    x, out = node.inputs[0], node.output
    src = [d for d in range(_rank(x)) if b.size(x, d) != 1]
    dst = [d for d in range(_rank(out)) if b.size(out, d) != 1]
    if len(src) == len(dst):
        for d, e in zip(src, dst):
            b.same(x, d, out, e)


@rule("expand")
def _expand(node: Node, b: _Builder) -> None:
    """Broadcast copies are independent: removing some only shrinks ``shape`` (GQA's repeat of kv heads)."""
    _broadcast(node, b, node.inputs[:1])
    for d in range(_rank(node.output)):
        b.claimed.add(b.slot(node.output, d))


@rule("permute")
def _permute(node: Node, b: _Builder) -> None:
    x, out = node.inputs[0], node.output
    for k, d in enumerate(node.attrs["dims"]):
        b.same(x, d % _rank(x), out, k)


@rule("pad")
def _pad(node: Node, b: _Builder) -> None:
    x, out = node.inputs[0], node.output
    pads = list(node.attrs["pads"])
    padded = {_rank(x) - 1 - k // 2 for k, p in enumerate(pads) if p}
    for d in range(_rank(x)):
        if d not in padded:
            b.same(x, d, out, d)


@rule("embedding")
def _embedding(node: Node, b: _Builder) -> None:
    b.same(node.inputs[0], 1, node.output, -1)


@rule("flatten")
def _flatten(node: Node, b: _Builder) -> None:
    x, out = node.inputs[0], node.output
    r = _rank(x)
    if r == 0:
        return
    start, end = node.attrs["start_dim"] % r, node.attrs["end_dim"] % r
    for d in range(start):
        b.same(x, d, out, d)
    for d in range(end + 1, r):
        b.same(x, d, out, d - (end - start))
    _chunk(node, b, x, list(range(start, end + 1)), out, [start])


@rule("reshape")
def _reshape(node: Node, b: _Builder) -> None:
    x, out = node.inputs[0], node.output
    if not (x.type.is_static and out.type.is_static):
        return
    a, c = x.type.shape, out.type.shape
    i = j = 0
    while i < len(a) and j < len(c):
        if a[i] == 1:
            i += 1
            continue
        if c[j] == 1:
            j += 1
            continue
        ins, outs, pa, pc = [i], [j], a[i], c[j]
        i, j = i + 1, j + 1
        while pa != pc:
            if pa < pc and i < len(a):
                pa *= a[i]
                ins.append(i)
                i += 1
            elif pc < pa and j < len(c):
                pc *= c[j]
                outs.append(j)
                j += 1
            else:
                return
        _chunk(node, b, x, ins, out, outs)


def _chunk(node: Node, b: _Builder, x: Value, ins: list[int], out: Value, outs: list[int]) -> None:
    ins = [d for d in ins if b.size(x, d) != 1] or ins[:1]
    outs = [d for d in outs if b.size(out, d) != 1] or outs[:1]
    if len(ins) == 1 and len(outs) == 1:
        b.same(x, ins[0], out, outs[0])
        return
    for d in ins:
        b.claimed.add(b.slot(x, d))
    for d in outs:
        b.claimed.add(b.slot(out, d))
    b.chunks.append(_Chunk(node, x, ins, out, outs))


@rule("sdpa")
def _sdpa(node: Node, b: _Builder) -> None:
    """Heads couple q, k, v and the output (GQA: one kv head with its query heads); or the head dims."""
    q, k, v = node.inputs[:3]
    out = node.output
    if not all(_rank(t) == 4 for t in (q, k, v)):
        return
    if b.heads == "heads":
        for t in (q, k, v, out):
            b.label(t, 1, "H")
        hq, hk = b.size(q, 1), b.size(k, 1)
        b.same(q, 1, out, 1)
        b.same(k, 1, v, 1)
        if hq == hk:
            b.same(q, 1, k, 1)
        elif node.attrs["enable_gqa"] and hq and hk and hq % hk == 0:
            b.link(q, 1, torch.arange(hq), k, 1, torch.arange(hq) // (hq // hk))
    else:
        for t in (q, k, v, out):
            b.label(t, 3, "D")
        b.same(q, 3, k, 3)
        b.same(v, 3, out, 3)


# ------------------------------------------------------------------------ API
def _unshare_buffers(graph: Graph) -> None:
    """Give each user of a shared non-parameter constant its own copy.

    Cleanup deduplicates equal buffers (fresh BN running stats are all zeros and
    ones), which would tie unrelated layers together; tied *parameters* are a real
    coupling and stay shared.
    """
    for v in list(graph.constants.values()):
        if v.is_parameter or v.data.dim() == 0:
            continue
        for node, i in v.uses()[1:]:
            node.replace_input(i, graph.add_constant(v.data.clone(), v.name))


def _raise_norms(graph: Graph) -> None:
    """Rewrite primitive spellings of norms (and activations) as one op, in place.

    Llama's RMSNorm is captured as pow, mean, rsqrt and mul: the mean over the hidden
    dim has no channel map, so it would block the hidden size. As one ``rms_norm`` the
    statistics stay inside the norm and its weight couples to the channel.
    """
    from graphopt.pass_manager import PassManager

    PassManager(["recognize_patterns"], fixed_point=False).run(graph)


def build_groups(graph: Graph, ignored: Sequence[str] = (), heads: str = "heads") -> list[Group]:
    """ignored: names of parameter values or node names whose output channels must stay.
    heads: "heads" (prune whole attention heads) or "head_dim" (prune within each head, equally).
    Norms written out in primitive ops are first raised to one op in ``graph``."""
    if heads not in HEAD_MODES:
        raise ValueError(f"heads={heads!r} is not supported; pass 'heads' or 'head_dim'")
    known = set(graph.constants) | {n.name for n in graph.nodes}
    unknown = [name for name in ignored if name not in known]
    if unknown:
        raise ValueError(f"ignored name {unknown[0]!r} is neither a constant nor a node of the graph; "
                         f"pass a parameter name (e.g. 'fc.weight') or a node name")
    for node in graph.nodes:
        get_op(node.op)
    names = set(ignored)
    for node in graph.nodes:
        if node.name in names:
            names.update(v.name for v in node.inputs[1:] if v is not None and v.is_constant)
    _raise_norms(graph)
    _unshare_buffers(graph)
    builder = _Builder(graph, heads)
    builder.run()
    return builder.groups(names)
