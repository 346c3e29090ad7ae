"""Attention fusion: the eager ``softmax(q kᵀ · scale + mask) v`` chain becomes one ``sdpa`` node."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from graphopt.ir import Graph, Node, TensorType, Value
from graphopt.ir.pattern import Const, Var, match, op
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass


@dataclass
class _Chain:
    """One matched attention: the values sdpa reads and the nodes between the two matmuls."""

    q: Value
    k_transposed: Value
    v: Value
    mask: Value | None
    scale: float
    is_causal: bool
    enable_gqa: bool
    out: Node  # matmul(probs, v)
    scores: Node  # matmul(q, kᵀ)
    inner: list[Node] = field(default_factory=list)  # scores..softmax, whose results only the chain reads
    prescales: list[Node] = field(default_factory=list)  # constant multiplies of q or kᵀ folded into the scale
    guard: list[Node] = field(default_factory=list)  # where(isnan(p), 0, p) between softmax and the second matmul


@register_pass
@dataclass
class FuseAttention(Pass):
    """Replace ``matmul(softmax(matmul(q, kᵀ) · c + mask), v)`` by ``sdpa(q, k, v, mask; scale=c)``.

    The FlashAttention rewrite's graph half (Dao et al. 2022, "FlashAttention";
    pattern as in onnxruntime's attention fusion): what eager attention
    spells out in five ops, one node holds, so a backend can run a fused
    kernel that never materialises the score matrix. Matched spellings:

    * the scale is any product of constant multiplies or divides (one value
      broadcast, dtype and shape unchanged) on the scores, on ``q`` or on
      ``kᵀ`` (the legacy ONNX exporter scales both by ``√scale``); no scale
      gives ``scale=1``, which ``sdpa`` is told explicitly;
    * ``kᵀ`` is any tensor; ``k`` is its last two dims swapped, composed
      into the ``permute`` that made ``kᵀ`` when there is one (so the
      transpose disappears);
    * the mask is an ``add`` of a tensor of the scores' dtype that does not
      widen them (applied after the scale, as sdpa adds it); a constant one
      that is 0 on and below the diagonal and ``-inf`` or lowest-finite above
      it, or a ``where`` with a constant lower-triangular condition and such
      a fill, becomes ``is_causal`` (each row keeps its diagonal, so both
      fills give the same probabilities); one mask at most;
    * ``softmax`` over the last dim, ``q``, ``k``, ``v`` of one dtype and
      rank, equal batch dims; in torch graphs ``k``/``v`` with one head
      broadcast over ``q``'s heads become ``enable_gqa`` (ONNX graphs keep those
      unfused: below opset 23 the emitter would repeat the heads again), and so do
      ``k``/``v`` whose heads ``repeat_kv`` copied (``unsqueeze→expand→reshape``):
      sdpa then reads the un-repeated heads.

    ATen's batched matmuls (what torch.compile hands over: ``reshape(bmm(reshape(q),
    reshape(kᵀ)))``) on either side of a softmax are first unflattened into rank-4 matmuls.

    A chain fuses only when the scores, scaled scores, masked scores and
    probabilities are read by nothing else (attention weights returned as an
    output stay as they are, computed once); chains that share their
    ``matmul(q, kᵀ)`` fuse together. Dropout between softmax and the second
    matmul must already be gone (O1 removes inference dropout). The exporters'
    guard ``where(isnan(p), 0, p)`` after the softmax (torch's "safe softmax",
    zeros for rows masked everywhere) is part of the chain: it is what sdpa
    computes.

    Exact up to float rounding: sdpa scales ``q`` and ``k`` by ``√scale``
    (or the scores by ``scale``) where the model did otherwise, so results
    agree to about 1e-6 relative, not bit for bit. One difference is
    torch's own: a row whose additive mask is ``-inf`` everywhere gives NaN
    in eager softmax and zeros in torch's sdpa.
    """

    name = "fuse_attention"
    kind = PassKind.EXACT
    requires = ("patterns_recognized",)  # the fusions read canonical ops
    ensures = ("attention_fused",)

    def call(self, graph: Graph) -> PassResult:
        unflattened = sum(_unflatten_matmuls_around(graph, node) for node in graph.find("softmax"))
        chains = [c for node in graph.nodes if node.op == "softmax" for c in [_match(node)] if c is not None]
        chains = _self_contained(chains)
        fused_scores = {id(c.scores) for c in chains}
        fused = []
        for chain in chains:
            # Matched again on the graph as earlier rewrites left it: a value of this chain may have moved.
            current = _match(chain.inner[0]) if chain.inner[0].graph is graph else None
            if current is not None:
                _rewrite(graph, current, fused_scores)
                fused.append(current)
        stats = {"attention_fused": len(fused), "causal": sum(c.is_causal for c in fused)}
        if unflattened:
            stats["batched_matmuls_unflattened"] = unflattened
        return PassResult(graph, bool(fused or unflattened), stats)


# ------------------------------------------------- ATen's batched matmuls
_CHAIN_OPS = frozenset({"add", "mul", "div", "where"})


def _unflatten_matmuls_around(graph: Graph, softmax: Node) -> int:
    """Unflatten the matmuls on either side of ``softmax`` (see :func:`_unflatten_matmul`); how many.

    ATen's matmul decomposition, what torch.compile hands over, multiplies rank-4 attention as
    ``reshape(bmm(reshape(q), reshape(kᵀ)))``; the chain matches on rank-4 matmuls.
    """
    count, frontier = 0, [softmax.inputs[0]]
    for _ in range(4):  # back through the mask and the scale
        nodes = [v.producer for v in frontier if v is not None and v.producer is not None]
        count += sum(_unflatten_matmul(graph, n.inputs[0].producer) for n in nodes
                     if n.op == "reshape" and n.inputs[0].producer is not None)
        frontier = [i for n in nodes if n.op in _CHAIN_OPS for i in n.inputs]
    guard = _nan_guard(softmax.output)
    for reader in (guard[0].output if guard else softmax.output).users():
        readers = reader.output.users() if reader.op == "reshape" else []
        count += sum(_unflatten_matmul(graph, r) for r in readers if r.inputs[0] is reader.output)
    return count


def _unflatten_matmul(graph: Graph, matmul: Node) -> bool:
    """``reshape(matmul(reshape(a), reshape(b)))`` with the batch dims of ``a`` and ``b`` flattened into one
    and split back after becomes ``matmul(a, b)``: the same products, batch for batch."""
    if matmul is None or matmul.op != "matmul" or len(matmul.output.users()) != 1:
        return False
    flat_a, flat_b, unflat = matmul.inputs[0].producer, matmul.inputs[1].producer, matmul.output.users()[0]
    if not all(n is not None and n.op == "reshape" for n in (flat_a, flat_b, unflat)):
        return False
    a, b = flat_a.inputs[0], flat_b.inputs[0]
    if not all(isinstance(v.type, TensorType) and v.type.is_static for v in (a, b, matmul.output, unflat.output)):
        return False
    (*batch, m, k), (*batch_b, k_b, n) = a.type.shape, b.type.shape
    if len(batch) < 2 or batch != batch_b or k != k_b or a.type.dtype != b.type.dtype:
        return False
    flat = math.prod(batch)
    if (matmul.inputs[0].type.shape != (flat, m, k) or matmul.inputs[1].type.shape != (flat, k, n)
            or unflat.output.type.shape != (*batch, m, n)):
        return False
    node = graph.add_node("matmul", [a, b], before=unflat, output_types=[unflat.output.type],
                          meta={"created_by": FuseAttention.name, "source": matmul.meta.get("source")})
    unflat.output.replace_by(node.output)
    for dead in (unflat, matmul, flat_a, flat_b):
        if not dead.output.uses() and not dead.output.is_graph_output:
            graph.remove_node(dead)
    return True


# ----------------------------------------------------------------- matching
def _match(softmax: Node) -> _Chain | None:
    probs = softmax.output
    rank = _rank(probs)
    if rank is None or rank < 2 or softmax.attrs["dim"] % rank != rank - 1:
        return None
    guard = _nan_guard(probs)
    read = guard[0].output if guard else probs
    readers = read.users()
    if len(readers) != 1 or readers[0].op != "matmul" or readers[0].inputs[0] is not read:
        return None
    out = readers[0]
    for mask, is_causal, masked, x in _unmasked_candidates(softmax.inputs[0]):
        scale, x, scale_nodes = _peel_scale(x)
        scores = x.producer
        if scores is None or scores.op != "matmul":
            continue
        q_scale, q, q_nodes = _peel_scale(scores.inputs[0])
        k_scale, k_transposed, k_nodes = _peel_scale(scores.inputs[1])
        chain = _Chain(q=q, k_transposed=k_transposed, v=out.inputs[1], mask=mask,
                       scale=scale * q_scale * k_scale, is_causal=is_causal, enable_gqa=False, out=out,
                       scores=scores, inner=[softmax, *masked, *scale_nodes, scores], prescales=q_nodes + k_nodes,
                       guard=guard)
        if _shapes_fit(chain, softmax.graph):
            return chain
    return None


_NAN_GUARD = op("where", op("isnan", Var("probs"), bind="isnan"), Const(0.0), Var("probs"))


def _nan_guard(probs: Value) -> list[Node]:
    """``[where, isnan]`` of a ``where(isnan(probs), 0, probs)`` that alone reads ``probs``, else ``[]``."""
    where = next((u for u in probs.users() if u.op == "where"), None)
    m = None if where is None else match(_NAN_GUARD, where)
    if m is None or m["probs"] is not probs:
        return []
    isnan = m["isnan"]
    if set(probs.users()) != {where, isnan} or isnan.output.is_graph_output or isnan.output.users() != [where]:
        return []
    return [where, isnan]


def _unmasked_candidates(x: Value) -> list[tuple[Value | None, bool, list[Node], Value]]:
    """Ways to read the softmax input as (mask, is_causal, masking nodes, scaled scores)."""
    node = x.producer
    if node is not None and node.op == "add":
        a, b = node.inputs
        return [(None, True, [node], scores) if _is_causal_bias(mask, scores) else (mask, False, [node], scores)
                for scores, mask in ((a, b), (b, a)) if _is_additive_mask(node, mask)]
    if node is not None and node.op == "where":
        scores = _causal_where(node)
        return [] if scores is None else [(None, True, [node], scores)]
    return [(None, False, [], x)]


def _is_additive_mask(add: Node, mask: Value) -> bool:
    """A tensor of the scores' dtype whose broadcast does not widen them (sdpa adds it after the scale)."""
    t = mask.type
    return (isinstance(t, TensorType) and isinstance(add.output.type, TensorType) and t.rank is not None
            and t.dtype == add.output.type.dtype and t.rank <= add.output.type.rank
            and all(add.output.same_type_as(v) for v in add.inputs if v is not mask))


def _causal_where(where: Node) -> Value | None:
    """The scores of ``where(tril, scores, fill)``: a constant lower-triangular keep-mask, a -inf-like fill."""
    cond, scores, fill = where.inputs
    if not (cond.is_constant and fill.is_constant and where.output.same_type_as(scores)):
        return None
    if cond.data.dtype != torch.bool or fill.data.numel() != 1 or not _is_masked_out(fill.data, scores.type.dtype):
        return None
    keep = _square_pattern(cond.data, scores)
    return scores if keep is not None and torch.equal(keep, _tril_like(keep)) else None


def _is_causal_bias(mask: Value, scores: Value) -> bool:
    """A constant additive mask that is 0 on and below the diagonal and -inf-like above it."""
    if not mask.is_constant or not mask.data.is_floating_point():
        return False
    bias = _square_pattern(mask.data, scores)
    if bias is None:
        return False
    keep = _tril_like(bias)
    return bool((bias[keep] == 0).all()) and _is_masked_out(bias[~keep], scores.type.dtype)


def _square_pattern(data: torch.Tensor, scores: Value) -> torch.Tensor | None:
    """``data`` as one [L, S] matrix: it has the scores' last two dims and the same matrix at every batch index."""
    if data.dim() < 2 or data.numel() == 0 or tuple(scores.type.shape[-2:]) != tuple(data.shape[-2:]):
        return None
    matrices = data.reshape(-1, *data.shape[-2:])
    first = matrices[0]
    return first if bool((matrices == first).all()) else None


def _tril_like(t: torch.Tensor) -> torch.Tensor:
    """sdpa's causal keep-mask: top-left aligned, diagonal included."""
    return torch.ones(t.shape, dtype=torch.bool).tril()


def _is_masked_out(fill: torch.Tensor, dtype: torch.dtype) -> bool:
    """Every entry -inf or the dtype's lowest finite value: both get probability 0 when a row keeps an entry."""
    return dtype.is_floating_point and bool(((fill == float("-inf")) | (fill == torch.finfo(dtype).min)).all())


def _peel_scale(x: Value) -> tuple[float, Value, list[Node]]:
    """Strip constant multiplies and divides off ``x``: (their product, the unscaled value, the nodes)."""
    scale, nodes = 1.0, []
    while True:
        node = x.producer
        factor = _scale_factor(node) if node is not None else None
        if factor is None:
            return scale, x, nodes
        scale *= factor[0]
        x = factor[1]
        nodes.append(node)


def _scale_factor(node: Node) -> tuple[float, Value] | None:
    """(c, x) for ``x * c``, ``c * x`` or ``x / c`` with c a constant holding one value that changes no type."""
    if node.op not in ("mul", "div") or node.attrs.get("rounding_mode") is not None:
        return None
    a, b = node.inputs
    pairs = [(a, b), (b, a)] if node.op == "mul" else [(a, b)]
    for x, c in pairs:
        if c.is_constant and c.data.is_floating_point() and c.data.numel() >= 1 and node.output.same_type_as(x):
            value = c.data.reshape(-1)[0]
            if bool((c.data == value).all()) and math.isfinite(float(value)) and float(value) != 0:
                return (float(value) if node.op == "mul" else 1 / float(value)), x
    return None


def _shapes_fit(chain: _Chain, graph: Graph) -> bool:
    """q, k, v of one floating dtype and rank, and equal batch dims.

    Or, in torch graphs, one k/v head broadcast over q's heads: that sets the chain's ``enable_gqa``.
    """
    q, kt, v = chain.q.type, chain.k_transposed.type, chain.v.type
    if not all(isinstance(t, TensorType) and t.shape is not None for t in (q, kt, v)):
        return False
    if not (q.dtype == kt.dtype == v.dtype and q.dtype.is_floating_point and q.rank == kt.rank == v.rank >= 3):
        return False
    if chain.mask is not None and chain.mask.type.dtype != q.dtype:
        return False
    out = chain.out.output.type
    if out != TensorType(q.dtype, (*q.shape[:-1], v.shape[-1])) or kt.shape[-2] != q.shape[-1]:
        return False
    if kt.shape[-1] != v.shape[-2]:
        return False
    batch_q, batch_k, batch_v = q.shape[:-2], kt.shape[:-2], v.shape[:-2]
    if batch_q == batch_k == batch_v:
        return True
    one_kv_head = batch_k == batch_v and batch_k[:-1] == batch_q[:-1] and batch_k[-1] == 1 and q.rank == 4
    if one_kv_head and graph.meta.get("source") != "onnx":
        chain.enable_gqa = True
        return True
    return False


def _self_contained(chains: list[_Chain]) -> list[_Chain]:
    """The chains whose inner results only fused chains read, to a fixed point.

    Dropping a chain makes its nodes outside readers of the chains that share
    a node with it, so the check repeats until nothing more is dropped.
    """
    while True:
        inside = {id(n) for c in chains for n in c.inner}
        kept = [c for c in chains if all(_read_only_by(n, inside) for n in c.inner if n.op != "softmax")
                and _read_only_by(c.inner[0], {id(n) for n in c.guard} if c.guard else {id(c.out)})
                and (not c.guard or _read_only_by(c.guard[0], {id(c.out)}))]
        if len(kept) == len(chains):
            return kept
        chains = kept


def _read_only_by(node: Node, readers: set[int]) -> bool:
    return not node.output.is_graph_output and all(id(u) in readers for u in node.output.users())


# ------------------------------------------------------------------ rewrite
def _rewrite(graph: Graph, chain: _Chain, fused_scores: set[int]) -> None:
    q, q_extra = _unscaled_or_scaled(chain.scores.inputs[0], chain.q, fused_scores)
    kt, k_extra = _unscaled_or_scaled(chain.scores.inputs[1], chain.k_transposed, fused_scores)
    scale = chain.scale / (q_extra * k_extra)
    k, v = _untranspose(graph, kt, before=chain.out), chain.v
    grouped = _grouped_heads(k, v) if graph.meta.get("source") != "onnx" else None
    if grouped is not None:
        k, v = grouped
    attrs = {"is_causal": chain.is_causal, "scale": scale}
    if chain.enable_gqa or grouped is not None:
        attrs["enable_gqa"] = True
    # The result has the second matmul's type: inference could not tell that a symbolic mask dim broadcasts.
    sdpa = graph.add_node("sdpa", [q, k, v, chain.mask], attrs, before=chain.out,
                          output_types=[chain.out.output.type],
                          meta={"created_by": FuseAttention.name, "source": chain.out.meta.get("source")})
    chain.out.output.replace_by(sdpa.output)
    graph.remove_node(chain.out)
    transpose = [kt.producer] if kt.producer is not None and kt.producer.op == "permute" else []
    for node in chain.guard + chain.inner + chain.prescales + transpose:
        if node.graph is not None and not node.output.uses() and not node.output.is_graph_output:
            graph.remove_node(node)


def _unscaled_or_scaled(operand: Value, unscaled: Value, fused_readers: set[int]) -> tuple[Value, float]:
    """The operand to feed sdpa, and the scale factor it still carries.

    Prescaled ``q``/``kᵀ`` whose scaling other nodes also read stay as they
    are (their factor then leaves the ``scale`` attribute): the multiply is
    needed anyway.
    """
    if operand is unscaled or all(id(u) in fused_readers for u in operand.users()):
        return unscaled, 1.0
    factor, _, _ = _peel_scale(operand)
    return operand, factor


def _grouped_heads(k: Value, v: Value) -> tuple[Value, Value] | None:
    """The un-repeated k and v when both repeat each of their heads equally often (``repeat_kv``).

    ``reshape(expand(unsqueeze(x, 2), [b, h, n, s, d]), [b, h·n, s, d])`` gives
    head ``j`` of the result from head ``j // n`` of ``x``, exactly what sdpa's
    ``enable_gqa`` does, so sdpa can read ``x`` and skip the copy.
    """
    k_source, v_source = _repeated_heads(k), _repeated_heads(v)
    if k_source is None or v_source is None or k_source[1] != v_source[1]:
        return None
    return k_source[0], v_source[0]


_REPEAT_KV = op("reshape", op("expand", op("unsqueeze", Var("source"), dims=[2]), bind="expand"))


def _repeated_heads(x: Value) -> tuple[Value, int] | None:
    """(source, repeats) when ``x`` is a ``repeat_kv`` of a rank-4 source, else None."""
    m = match(_REPEAT_KV, x)
    if m is None:
        return None
    source, expand = m["source"], m["expand"]
    if _rank(source) != 4 or _rank(expand.output) != 5 or _rank(x) != 4:
        return None
    batch, heads, seq, dim = source.type.shape
    repeats = expand.output.type.shape[2]
    if not (isinstance(heads, int) and isinstance(repeats, int)):
        return None
    if expand.output.type.shape != (batch, heads, repeats, seq, dim) or x.type.shape != (batch, heads * repeats,
                                                                                         seq, dim):
        return None
    return source, repeats


def _untranspose(graph: Graph, kt: Value, before: Node) -> Value:
    """``kᵀ`` with its last two dims swapped back, composed into the permute that made it if any."""
    rank = len(kt.type.shape)
    swap = list(range(rank - 2)) + [rank - 1, rank - 2]
    source, dims = kt, swap
    producer = kt.producer
    if producer is not None and producer.op == "permute":
        inner = [d % rank for d in producer.attrs["dims"]]
        source, dims = producer.inputs[0], [inner[d] for d in swap]
    if dims == list(range(rank)):
        return source
    node = graph.add_node("permute", [source], {"dims": dims}, before=before,
                          meta={"created_by": FuseAttention.name})
    return node.output


def _rank(v: Value) -> int | None:
    return v.type.rank if isinstance(v.type, TensorType) else None
