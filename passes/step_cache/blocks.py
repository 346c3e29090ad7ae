"""Finding a denoiser's repeated transformer blocks by dataflow, never by module or node names.

A diffusion transformer is a stack of blocks that each read the hidden-state
stream(s) and side inputs (timestep embedding, rotary tables, text states) and
write the stream on. Step caching (DeepCache, Δ-DiT, FORA, TeaCache) reuses
block outputs between sampling steps, so it needs those blocks and the values
that cross their boundaries, on any model.

The method: each node gets a local structural key (op, attributes, output
types, and per input whether it is a constant of some type or a computed value
of some type). A block repeated ``n`` times is a tandem repeat of that key
sequence with period ``P``: ``key[i] == key[i + P]`` over ``(n - 1) * P``
consecutive positions. The repeat of most coverage is taken (then further runs
beside it: FLUX's double- then single-stream blocks), and its phase fixed where
the fewest values cross the cut (right after a residual add only the stream
does). Nodes that do not depend on the stream (per-block timestep-embedding
projections) are ``hoisted``; a block that ends a run but differs from it (SD3's
and Mochi's last block updates the image stream only) joins as a tail where the
dataflow allows. Every candidate is checked: each block reads only the previous
block's stream, values from before the span and constants, and after the span
only the last block's stream is read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from graphopt.ir import Graph, Node, Value
from graphopt.ir.analysis import attr_key


@dataclass
class BlockSpan:
    blocks: list[list[Node]]
    """Each block's nodes in execution order; blocks in execution order, contiguous but for ``hoisted``."""
    runs: list[tuple[int, int]]
    """``[start, end)`` ranges of ``blocks`` that are structurally identical (FLUX: double-, then single-stream)."""
    hoisted: list[Node]
    """Nodes inside the span's range that do not depend on the stream (may move before the first block)."""
    stream_in: list[Value]
    """The values entering the first block that carry the stream (hidden states; FLUX: text and image)."""
    stream_out: list[Value]
    """The last block's stream values: all the graph reads of the span after it."""


def find_blocks(graph: Graph, min_repeats: int = 2) -> BlockSpan | None:
    """The longest stack of ``min_repeats`` or more repeated blocks in ``graph``, or None when it has none.

    Blocks are sought in ``conditioning_first(graph)`` order; a caller that outlines them puts the graph
    in that order first."""
    nodes = conditioning_first(graph)
    keys = _local_keys(nodes)
    crossing = _crossing_counts(graph, nodes)
    for start, period, extent in _tandem_repeats(keys, min_repeats, np.zeros(len(nodes), dtype=bool)):
        best: BlockSpan | None = None
        for runs in _runs_with_tail(graph, nodes, keys, crossing, start, period, extent):
            if sum(len(c) - 1 for c in runs) < min_repeats:
                continue
            span = _validated(graph, nodes, runs)
            if span is None or _covered(span) < len(nodes) / 4:
                continue  # a few repeated ops (a reshape and a permute), not the model's stack of blocks
            runs = _add_neighbour_runs(graph, nodes, keys, crossing, runs, min_repeats)
            span = _validated(graph, nodes, _add_head(graph, nodes, crossing, runs))
            if span is not None and (best is None or _rank_of(span) > _rank_of(best)):
                best = span  # the phase of fewest crossings may start a run mid-block and strand its neighbours
        if best is not None:
            return best
    return None


def conditioning_first(graph: Graph) -> list[Node]:
    """The nodes with the conditioning work first: pure nodes that read no token tensor (no graph input of
    rank 3 or more, directly or through other nodes), such as timestep and class embeddings, per-block
    modulation and rotary tables a capture computed lazily inside the first block. Each part keeps its
    order. Repeated blocks then are repeated key sequences, and the work that moved is not part of any."""
    conditioning = _conditioning(graph)
    nodes = graph.nodes
    return [n for n in nodes if id(n) in conditioning] + [n for n in nodes if id(n) not in conditioning]


def _conditioning(graph: Graph) -> set[int]:
    """ids of the pure nodes that read no token tensor (see ``conditioning_first``)."""
    conditioning: set[int] = set()
    for n in graph.nodes:
        if n.is_pure and all(v is None or v.is_constant
                             or (id(v.producer) in conditioning if v.producer is not None else _rank(v) < 3)
                             for v in n.inputs):
            conditioning.add(id(n))
    return conditioning


def _rank(v: Value) -> int:
    return getattr(v.type, "rank", None) or 0


def _covered(span: BlockSpan) -> int:
    return sum(map(len, span.blocks))


def _rank_of(span: BlockSpan) -> tuple[int, int, int]:
    """Most blocks, then most blocks that hand on the stream's types (FLUX's single blocks cut before their
    joint norm carry text and image as the double blocks do, not the joined tokens and their norm), then
    most nodes covered."""
    kinds = sorted(str(v.type) for v in span.stream_in)
    same = 0
    for block in span.blocks:
        members = {id(n) for n in block}
        outs = [o for n in block for o in n.outputs if o.is_graph_output or any(id(u) not in members for u in o.users())]
        same += sorted(str(o.type) for o in outs) == kinds
    return len(span.blocks), same, _covered(span)


def _runs_with_tail(graph: Graph, nodes: list[Node], keys: np.ndarray, crossing: np.ndarray, start: int,
                    period: int, extent: int) -> list[list[list[int]]]:
    """A repeat's candidate block boundaries, each with its last block when that one differs (``_add_tail``)."""
    end = start + extent
    return [[cuts[:-1], cuts[-2:]] if cuts[-1] > end else _add_tail(graph, nodes, crossing, [cuts])
            for cuts in _phases(crossing, start, period, extent)]


# ------------------------------------------------------------------ keys and repeats
def _local_keys(nodes: list[Node]) -> np.ndarray:
    """One int per node, equal for nodes that do the same thing on the same kinds of inputs."""
    ids: dict[tuple, int] = {}
    out = np.empty(len(nodes), dtype=np.int64)
    for k, n in enumerate(nodes):
        inputs = tuple("-" if v is None else ("c" if v.is_constant else "v", _type_kind(v)) for v in n.inputs)
        key = (n.op, tuple(sorted((a, _attr_kind(x)) for a, x in n.attrs.items())),
               tuple(_type_kind(o) for o in n.outputs), inputs)
        out[k] = ids.setdefault(key, len(ids))
    return out


_SYMBOL = re.compile(r"\b[us]\d+\b")


def _type_kind(v: Value) -> str:
    """The value's type with its symbolic sizes unnamed: each block's data-dependent size (Mochi's
    ``nonzero`` over the text mask) gets a symbol of its own."""
    return _SYMBOL.sub("?", str(v.type))


def _attr_kind(a: object) -> object:
    """``attr_key``, but an opaque object (a captured torch function) by its type and name, not its identity:
    each block holds its own such object for the same call."""
    if isinstance(a, (list, tuple)):
        return "sequence", tuple(_attr_kind(x) for x in a)
    if isinstance(a, dict):
        return "dict", tuple(sorted((k, _attr_kind(x)) for k, x in a.items()))
    key = attr_key(a)
    if key[0] == "object":
        return "object", type(a).__module__, type(a).__qualname__, getattr(a, "__qualname__", None)
    return key


def _tandem_repeats(keys: np.ndarray, min_repeats: int, taken: np.ndarray,
                    lo: int = 0, hi: int | None = None) -> list[tuple[int, int, int]]:
    """``(start, period, extent)`` of the tandem repeats in ``keys[lo:hi]`` (skipping ``taken``), those with
    ``min_repeats`` whole copies first, then most coverage first, shorter period first among equals (a period's multiples repeat too). The last copy may be half
    missing: a last block whose unused outputs were removed (CogVideoX's text stream) differs at its end."""
    hi = len(keys) if hi is None else hi
    seq = keys[lo:hi]
    free = ~taken[lo:hi]
    found: list[tuple[int, int, int]] = []
    for period in range(2, len(seq) // min_repeats + 1):
        same = (seq[:-period] == seq[period:]) & free[:-period] & free[period:]
        edges = np.flatnonzero(np.diff(np.concatenate(([0], same.view(np.int8), [0]))))
        for begin, end in zip(edges[::2], edges[1::2]):
            extent = int(end - begin) + period
            if extent >= (min_repeats - 0.5) * period:
                found.append((lo + int(begin), period, extent))
    found.sort(key=lambda r: (r[2] < min_repeats * r[1], -r[2], r[1], r[0]))  # whole copies first
    return found


def _crossing_counts(graph: Graph, nodes: list[Node]) -> np.ndarray:
    """``crossing[c]``: how many values computed by nodes ``< c`` are read at nodes ``>= c`` (or returned);
    conditioning values (read by the blocks as side inputs wherever they are computed) do not count."""
    position = {id(n): k for k, n in enumerate(nodes)}
    conditioning = _conditioning(graph)
    delta = np.zeros(len(nodes) + 2, dtype=np.int64)
    for k, n in enumerate(nodes):
        if id(n) in conditioning:
            continue
        for out in n.outputs:
            last = max((position[id(u)] for u in out.users()), default=k)
            if out.is_graph_output:
                last = len(nodes)
            if last > k:
                delta[k + 1] += 1
                delta[last + 1] -= 1
    return np.cumsum(delta)[: len(nodes) + 1]


def _phases(crossing: np.ndarray, start: int, period: int, extent: int) -> list[list[int]]:
    """A repeat's candidate block boundaries, best first: the offsets whose cuts the fewest values cross
    (right after a residual add only the stream does), each with the whole periods after it that fit, and
    one more where at least half of it repeats (a last block whose end differs: a run of its own)."""
    end = start + extent
    ranked = []
    for offset in range(period):
        cuts = list(range(start + offset, end + 1, period))
        if cuts[-1] < end and cuts[-1] + period <= len(crossing) - 1 and end - cuts[-1] >= period // 2:
            cuts.append(cuts[-1] + period)
        if len(cuts) >= 2:
            ranked.append(((float(crossing[cuts].mean()), -len(cuts), offset), cuts))
    ranked.sort(key=lambda r: r[0])
    return [cuts for _, cuts in ranked[:_PHASES_TRIED]]


_PHASES_TRIED = 8
"""Phases tried per repeat: the cheapest cut may split a stream its neighbours carry whole (FLUX's single
blocks concatenate text and image and split them again; the cut between keeps both streams)."""


# ------------------------------------------------------------------ more runs, head, tail
def _add_neighbour_runs(graph: Graph, nodes: list[Node], keys: np.ndarray, crossing: np.ndarray,
                        runs: list[list[int]], min_repeats: int) -> list[list[int]]:
    """Runs of another block right before or after the found ones (FLUX's single-stream blocks after its
    double-stream ones); the glue between two runs joins the following run's first block."""
    taken = np.zeros(len(nodes), dtype=bool)
    grown = True
    while grown:
        grown = False
        taken[:] = False
        for cuts in runs:
            taken[cuts[0]:cuts[-1]] = True
        first, last = runs[0][0], runs[-1][-1]
        for lo, hi, before in ((0, first, True), (last, len(nodes), False)):
            repeats = sorted(_tandem_repeats(keys, min_repeats, taken, lo, hi), key=lambda r: -r[2])
            for found in (f for r in repeats[:_NEIGHBOURS_TRIED] for f in _runs_with_tail(graph, nodes, keys, crossing, *r)):
                if sum(len(c) - 1 for c in found) < min_repeats:
                    continue
                glue = first - found[-1][-1] if before else found[0][0] - last
                if not 0 <= glue < (found[0][1] - found[0][0]) / 2:
                    continue  # overlaps the found runs, or leaves a block's worth of nodes out
                if before:
                    found[-1][-1] = first  # glue up to the found run goes into its last block
                    candidate = [*found, *runs]
                else:
                    found[0][0] = last  # glue after the found run goes into this run's first block
                    candidate = [*runs, *found]
                if _validated(graph, nodes, candidate) is not None:
                    runs, grown = candidate, True
                    break
            if grown:
                break
    return runs


_NEIGHBOURS_TRIED = 16


def _add_tail(graph: Graph, nodes: list[Node], crossing: np.ndarray,
              runs: list[list[int]]) -> list[list[int]]:
    """A last block that differs from its run (SD3: the text stream is read, not updated): the nodes after
    the run up to the first cut, within a period, past which the run's stream is no longer read and the
    fewest values cross, as long as it looks like a block (most of its ops occur in the run's block, and it is
    at least half as big)."""
    cuts = runs[-1]
    period = cuts[-1] - cuts[-2]
    begin = cuts[-1]
    stream = [o for n in nodes[cuts[-2]:begin] for o in n.outputs]
    position = {id(n): k for k, n in enumerate(nodes)}
    last_read = max((position[id(u)] for v in stream for u in v.users() if position[id(u)] >= begin), default=None)
    if last_read is None:
        return runs
    limit = min(len(nodes), begin + period)
    if last_read >= limit:
        return runs
    candidates = range(last_read + 1, limit + 1)
    end = min(candidates, key=lambda c: (crossing[c], c))
    if not _mostly_ops_of(nodes[begin:end], nodes[cuts[-2]:begin]):
        return runs
    candidate = [*runs, [begin, end]]
    span = _validated(graph, nodes, candidate)
    if span is None or len(span.blocks[-1]) < 0.5 * len(span.blocks[-2]):
        return runs  # too small for a block: the model's output head
    return candidate


def _add_head(graph: Graph, nodes: list[Node], crossing: np.ndarray,
              runs: list[list[int]]) -> list[list[int]]:
    """A first block that differs from its run (a pass left the first layer's attention dense, as Sparse
    VideoGen does): the period before the run, cut where the fewest values cross nearest a whole period back,
    as long as it looks like a block (most of its ops occur in the run's block, and it is at least half as
    big). Without it the first block runs at every step, cached or not."""
    cuts = runs[0]
    period = cuts[1] - cuts[0]
    end = cuts[0]
    candidates = range(max(0, end - period), end - period // 2 + 1)
    if not candidates:
        return runs
    begin = min(candidates, key=lambda c: (crossing[c], abs(c - (end - period))))
    if not _mostly_ops_of(nodes[begin:end], nodes[end:cuts[1]]):
        return runs
    candidate = [[begin, end], *runs]
    span = _validated(graph, nodes, candidate)
    if span is None or len(span.blocks[0]) < 0.5 * len(span.blocks[1]):
        return runs  # too small for a block: the model's input embedding
    return candidate


def _mostly_ops_of(part: list[Node], block: list[Node]) -> bool:
    """Whether at least half of ``part``'s ops occur in ``block`` (a head or tail that looks like a block)."""
    block_ops = _op_counts(block)
    return sum(min(k, block_ops.get(op, 0)) for op, k in _op_counts(part).items()) >= 0.5 * len(part)


def _op_counts(nodes: list[Node]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n.op] = counts.get(n.op, 0) + 1
    return counts


# ------------------------------------------------------------------ validation
def _validated(graph: Graph, nodes: list[Node], runs: list[list[int]]) -> BlockSpan | None:
    """The span of these block boundaries when the dataflow allows it (see the module docstring), else None."""
    bounds = [(a, b) for cuts in runs for a, b in zip(cuts, cuts[1:])]
    if any(b <= a for a, b in bounds) or any(p[1] != q[0] for p, q in zip(bounds, bounds[1:])):
        return None
    first, last = bounds[0][0], bounds[-1][1]
    block_of = {id(nodes[k]): b for b, (lo, hi) in enumerate(bounds) for k in range(lo, hi)}
    # The stream enters the first block as the values from before the span that it reads and the second block
    # does not (side inputs, the timestep embedding, rotary tables, masks, are read by every block).
    if len(bounds) < 2:
        return None
    second = {id(v) for k in range(*bounds[1]) for v in nodes[k].inputs}
    conditioning = _conditioning(graph)  # per-block modulation is read by one block, yet no stream
    seeds = {id(v) for k in range(*bounds[0]) for v in nodes[k].inputs
             if v is not None and not v.is_constant and id(v) not in second
             and (v.producer is None or id(v.producer) not in block_of)
             and (id(v.producer) not in conditioning if v.producer is not None else _rank(v) >= 3)}
    streamed: set[int] = set()  # nodes of the span that depend on the stream
    for k in range(first, last):
        n = nodes[k]
        if any(v is not None and (id(v) in seeds or (v.producer is not None and id(v.producer) in streamed))
               for v in n.inputs):
            streamed.add(id(n))
    blocks = [[nodes[k] for k in range(lo, hi) if id(nodes[k]) in streamed] for lo, hi in bounds]
    if any(not b for b in blocks):
        return None
    begin = next(k for k in range(first, last) if id(nodes[k]) in streamed)
    end = next(k for k in reversed(range(first, last)) if id(nodes[k]) in streamed)
    hoisted = [nodes[k] for k in range(begin, end) if id(nodes[k]) not in streamed]
    ins: list[list[Value]] = []
    outs: list[list[Value]] = []
    for b, block in enumerate(blocks):
        members = {id(n) for n in block}
        block_in: dict[int, Value] = {}
        for n in block:
            for v in n.inputs:
                if v is None or v.is_constant or (v.producer is not None and id(v.producer) in members):
                    continue
                source = -1 if v.producer is None else block_of.get(id(v.producer), -1)
                if v.producer is not None and id(v.producer) not in streamed:
                    source = -1  # hoisted: a side input
                if source == -1 and id(v) in seeds and b != 0:
                    return None  # a later block reads the stream the first one consumed
                if source == -1 and id(v) not in seeds:
                    continue  # a side input
                if source != b - 1:
                    return None
                block_in[id(v)] = v
        ins.append(list(block_in.values()))
        outs.append([o for n in block for o in n.outputs
                     if o.is_graph_output or any(id(u) not in members for u in o.users())])
    for b in range(1, len(blocks)):
        if {id(v) for v in ins[b]} != {id(v) for v in outs[b - 1]}:
            return None  # the previous block's stream leaks past this block
    if any(len(i) != len(o) for i, o in zip(ins[:-1], outs[:-1])) or len(outs[-1]) > len(ins[-1]):
        return None  # the stream's width changes inside the span
    # A block that turns the stream into other values (AuraFlow joins text and image between its runs, or a
    # cut inside a block hands on its norm) has no residual across it: each side is a span alone.
    if any(_kinds(i) != _kinds(o) for i, o in zip(ins[:-1], outs[:-1])):
        return None
    ordered_in = sorted(ins[0], key=lambda v: _first_read(blocks[0], v))
    return BlockSpan(blocks=blocks, runs=_run_ranges(runs), hoisted=hoisted, stream_in=ordered_in,
                     stream_out=outs[-1])


def _kinds(values: list[Value]) -> list[str]:
    """The stream's value types, order aside."""
    return sorted(_type_kind(v) for v in values)


def _first_read(block: list[Node], v: Value) -> int:
    return next(k for k, n in enumerate(block) if any(x is v for x in n.inputs))


def _run_ranges(runs: list[list[int]]) -> list[tuple[int, int]]:
    ranges = []
    start = 0
    for cuts in runs:
        ranges.append((start, start + len(cuts) - 1))
        start += len(cuts) - 1
    return ranges
