"""The ``step_cache`` pass: a denoiser's repeated blocks, found by dataflow, wrapped in one cached span.

Each block (``blocks.find_blocks``) is outlined as a ``region``; the regions
go into the body of one ``step_cache`` node whose inputs are the stream the
first block reads (one value per stream: FLUX has a text and an image
stream), the side values the blocks read (timestep embedding, rotary tables,
text states) and the denoiser's timestep input. The torch emitter turns the
node into a ``runtime.StepCache`` module that runs the blocks under the
node's policy, with its memory on the emitted module's ``GraphState``.
Without the emitter (``interpret``) the node computes every block: the
uncached reference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch

from graphopt.errors import InvalidOptionError, UnsupportedModelError
from graphopt.ir import Graph, Node, Value
from graphopt.ir.types import ScalarType
from graphopt.ir.region import interpret, outline
from graphopt.ir.registry import OpDef, register_op
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass

from .blocks import BlockSpan, conditioning_first, find_blocks
from .policies import Curves, Policy, make_policy
from .runtime import Source, StepCache


# ------------------------------------------------------------------- the op
def step_cache(*inputs: torch.Tensor, body: Graph, label: str = "step_cache", policy: str = "{}",
               timestep: int = -1, streams: int = 1, slots: list | None = None, tail: bool = False,
               batched: list | None = None) -> Any:
    """Run every block of the body: what the span computes with nothing cached.

    ``slots[b][k]`` is the output of block ``b`` that carries stream ``k``; the body's
    outputs are the last block's, in stream order, or a ``tail`` block's as they are.
    ``batched`` lists the inputs whose first dim is the batch (a symbolic dim shared
    with the stream), so a subset of the samples can run the blocks alone; empty when
    the batch is not known to be separable.
    """
    results = interpret(body, inputs)
    return results[0] if len(results) == 1 else tuple(results)


def policy_of(node: Node) -> Policy:
    """The node's policy, with its calibrated curves."""
    spec = json.loads(node.attrs["policy"])
    curves = spec.pop("curves", None)
    return make_policy(spec, Curves.from_json(curves) if curves else None)


def wiring_of(body: Graph, streams: int, slots: list[list[int]]) -> list[list[Source]]:
    """Where each block of a span body reads each input: a stream slot, or the span's inputs."""
    position = {id(v): k for k, v in enumerate(body.inputs)}
    wiring: list[list[Source]] = []
    previous: Node | None = None
    for b, block in enumerate(body):
        slot_of = {j: k for k, j in enumerate(slots[b - 1])} if b else {}
        sources: list[Source] = []
        for v in block.inputs:
            if previous is not None and v.producer is previous:
                sources.append(("stream", slot_of[v.index]))
            elif previous is None and position.get(id(v), streams) < streams:
                sources.append(("stream", position[id(v)]))
            else:
                sources.append(("input", position[id(v)]))
        wiring.append(sources)
        previous = block
    return wiring


def _emit(node: Node, emit_body: Any, state: Any) -> StepCache:
    body: Graph = node.attrs["body"]
    streams = node.attrs["streams"]
    blocks = [emit_body(block.attrs["body"]) for block in body]
    timestep = node.attrs["timestep"]
    slots = node.attrs["slots"]
    return StepCache(blocks, wiring_of(body, streams, slots), streams, None if timestep < 0 else timestep,
                     policy_of(node), state, node.attrs["label"], slots, node.attrs["tail"],
                     node.attrs["batched"] or ())


register_op(OpDef("step_cache", step_cache, category="opaque", pure=False,
                  infer=lambda node: [v.type for v in node.attrs["body"].outputs],
                  num_outputs=lambda attrs: len(attrs["body"].outputs), torch_module=_emit, doc=step_cache.__doc__))


# ------------------------------------------------------------------ the pass
POLICY_OPTIONS = ("interval", "threshold", "warmup", "max_reuse", "front", "back", "order", "boundary", "blocks",
                  "alpha")


@register_pass
@dataclass
class StepCachePass(Pass):
    """Step caching: the denoiser's repeated blocks reuse their residuals across sampling steps."""

    name = "step_cache"
    kind = PassKind.LOSSY
    quality_metric = "psnr against the uncached output of the same seed"
    before_level = True

    policy: Any = "fora"
    """A policy name, ``{"policy": name, **options}``, or a calibrated plan (``graphopt.diffusers``)."""
    interval: int | None = None
    threshold: float | None = None
    warmup: int | None = None
    max_reuse: int | None = None
    front: int | None = None
    back: int | None = None
    order: int | None = None
    boundary: float | None = None
    blocks: int | None = None
    alpha: float | None = None
    curves: dict | None = None
    """Calibrated curves (``policies.Curves`` as a dict) for the policies that read them."""
    timestep_input: str | None = None
    """The graph input holding the timestep, where dataflow cannot tell (none feeds a sin/cos embedding)."""
    label: str = "step_cache"

    def call(self, graph: Graph) -> PassResult:
        policy = self.make_policy()
        if graph.find("step_cache"):  # cached already (a pipeline that repeats its passes)
            return PassResult(graph, False)
        graph.reorder(conditioning_first(graph))  # the order find_blocks reads blocks in
        span = find_blocks(graph)
        if span is None:
            raise UnsupportedModelError(
                f"step_cache found no repeated blocks in {graph.name}: it caches the layers of a denoiser "
                f"(a diffusion transformer); for other models leave the pass out")
        timestep = self._timestep(graph)
        node = build_span(graph, span, timestep, policy, self.label)
        policy.check(len(span.blocks) - node.attrs["tail"])
        return PassResult(graph, True, {"blocks": len(span.blocks), "runs": len(span.runs),
                                        "streams": node.attrs["streams"], "timestep_found": int(timestep is not None)})

    def make_policy(self) -> Policy:
        spec = self.policy
        if isinstance(spec, str):
            spec = {"policy": spec}
        if not isinstance(spec, dict):
            raise InvalidOptionError(f"step_cache policy must be a name or a dict, got {type(spec).__name__}")
        spec = dict(spec)
        curves = spec.pop("curves", None) or self.curves
        spec.pop("fingerprint", None)
        spec.pop("quality", None)
        spec.update({k: getattr(self, k) for k in POLICY_OPTIONS if getattr(self, k) is not None})
        return make_policy(spec, Curves.from_json(curves) if curves else None)

    def _timestep(self, graph: Graph) -> Value | None:
        if self.timestep_input is not None:
            for v in graph.inputs:
                if v.name == self.timestep_input:
                    return v
            names = ", ".join(v.name for v in graph.inputs)
            raise InvalidOptionError(f"step_cache: no graph input named {self.timestep_input!r}; inputs: {names}")
        return find_timestep(graph)


def find_timestep(graph: Graph) -> Value | None:
    """The input that feeds a sinusoidal embedding (a ``sin``/``cos`` downstream) and has at most one dim:
    the denoiser's timestep, by dataflow."""
    for v in graph.inputs:
        if len(getattr(v.type, "shape", ()) or ()) > 1:
            continue
        seen, frontier = {id(v)}, [v]
        while frontier:
            value = frontier.pop()
            for user in value.users():
                if user.op in ("sin", "cos"):
                    return v
                for out in user.outputs:
                    if id(out) not in seen:
                        seen.add(id(out))
                        frontier.append(out)
    return None


def build_span(graph: Graph, span: BlockSpan, timestep: Value | None, policy: Policy, label: str) -> Node:
    """Outline each block, then gather the block regions into one ``step_cache`` node."""
    _recompute_scalars(graph, span)
    _hoist(graph, span)
    regions = [outline(graph, nodes, f"{label}_block{b}") for b, nodes in enumerate(span.blocks)]
    streams, perms, tail = _stream_slots(regions)
    members = {id(r) for r in regions}
    sides: list[Value] = []
    for r in regions:
        for v in r.inputs:
            inside = v.producer is not None and id(v.producer) in members
            if not inside and all(v is not s for s in streams) and all(v is not s for s in sides):
                sides.append(v)
    inputs = [*streams, *sides]
    if timestep is not None and all(timestep is not v for v in inputs):
        inputs.append(timestep)
    body = Graph(label)
    mapping = {id(v): body.add_input(v.name, v.type) for v in inputs}
    for r in regions:
        copy = body.add_node("region", [mapping[id(v)] for v in r.inputs], r.attrs,
                             output_types=[o.type for o in r.outputs], name=r.name)
        mapping.update((id(o), c) for o, c in zip(r.outputs, copy.outputs))
    last = regions[-1]
    outputs = list(last.outputs) if tail else [last.outputs[j] for j in perms[-1]]
    body.outputs = [mapping[id(o)] for o in outputs]
    node = graph.add_node("step_cache", inputs, {
        "body": body, "label": label, "policy": json.dumps(_policy_json(policy)),
        "timestep": -1 if timestep is None else next(k for k, v in enumerate(inputs) if v is timestep),
        "streams": len(streams), "slots": perms, "tail": tail, "batched": batched_inputs(inputs, len(streams))},
        output_types=[o.type for o in outputs], after=last, name=label)
    for old, new in zip(outputs, node.outputs):
        old.replace_by(new)
    for r in reversed(regions):
        graph.remove_node(r)
    return node


def batched_inputs(inputs: Sequence[Value], streams: int) -> list[int]:
    """The inputs whose first dim is the streams' symbolic batch dim (captured with ``dynamic``), or none
    where the batch is static: a static first dim may equal the batch by chance (64 rotary rows, 64 rows)."""
    def first_dim(v: Value) -> Any:
        shape = getattr(v.type, "shape", None)
        return shape[0] if shape else None

    batch = first_dim(inputs[0])
    if isinstance(batch, int) or batch is None or any(first_dim(v) != batch for v in inputs[:streams]):
        return []
    return [k for k, v in enumerate(inputs) if first_dim(v) == batch]


def _policy_json(policy: Policy) -> dict[str, Any]:
    spec = policy.options()
    if policy.curves is not None:
        spec["curves"] = policy.curves.to_json()
    return spec


def _recompute_scalars(graph: Graph, span: BlockSpan) -> None:
    """Give each block its own copy of the host scalars it reads (a symbolic batch size queried before the
    span): the block then reads the tensor they are computed from, so a block run on some of the samples
    sees their count, not the whole batch's."""
    for block in span.blocks:
        copies: dict[int, Value] = {}

        def local(v: Value, before: Node) -> Value:
            producer = v.producer
            if producer is None or producer in block or not producer.is_pure or not producer.yields_host_scalars:
                return v
            if id(v) not in copies:
                inputs = [x if x is None else local(x, before) for x in producer.inputs]
                copy = graph.add_node(producer.op, inputs, dict(producer.attrs),
                                      output_types=[o.type for o in producer.outputs], before=before,
                                      name=producer.name)
                block.insert(block.index(before), copy)
                copies.update((id(o), c) for o, c in zip(producer.outputs, copy.outputs))
            return copies[id(v)]

        for n in list(block):
            for k, v in enumerate(n.inputs):
                if v is not None and isinstance(v.type, ScalarType):
                    n.replace_input(k, local(v, n))
    for n in reversed(graph.nodes):
        if n.is_pure and n.is_unused and n.yields_host_scalars:
            if n in span.hoisted:
                span.hoisted.remove(n)
            graph.remove_node(n)


def _hoist(graph: Graph, span: BlockSpan) -> None:
    """Move the span's stream-independent nodes before its first block, so the blocks are contiguous."""
    if not span.hoisted:
        return
    hoisted = {id(n) for n in span.hoisted}
    first = span.blocks[0][0]
    order: list[Node] = []
    for n in graph:
        if n is first:
            order.extend(span.hoisted)
        if id(n) not in hoisted:
            order.append(n)
    graph.reorder(order)


def _stream_slots(regions: list[Node]) -> tuple[list[Value], list[list[int]], bool]:
    """The values the first block reads as the stream, one per slot; for each block which of its
    outputs holds each slot; and whether the last block is a *tail*.

    Blocks of one run order their outputs alike; at a run boundary (FLUX's
    double- to single-stream blocks) a block's outputs are matched to slots
    through the next block of its run, which reads them where this block read
    its predecessor's. A last block whose outputs are not the stream (FLUX's
    last block hands on the joined text and image tokens, SD3's drops the text
    stream) is a tail: always computed, its outputs the span's. Each block
    must read only its predecessor's outputs and side values, hand all its
    outputs on, and keep the stream's types.
    """
    slots = len(regions[0].outputs)
    for b, r in enumerate(regions[:-1]):
        if any(u is not regions[b + 1] for out in r.outputs for u in out.users()):
            raise UnsupportedModelError(f"step_cache: a value of block {b} is read past block {b + 1}; "
                                        f"the blocks do not form one stream")
    types = [o.type for o in regions[0].outputs]
    perms = [list(range(slots))]
    tail = False
    for b in range(1, len(regions)):
        if _same_run(regions[b - 1], regions[b]):
            perms.append(perms[-1])
            continue
        slot_of = {j: s for s, j in enumerate(perms[-1])}
        perm: list[int | None] = [None] * slots
        if b + 1 < len(regions) and _same_run(regions[b], regions[b + 1]):
            for position, v in enumerate(regions[b + 1].inputs):
                before = regions[b].inputs[position]
                if v.producer is regions[b] and before.producer is regions[b - 1]:
                    perm[slot_of[before.index]] = v.index
        filled = _by_type(perm, types, regions[b].outputs)
        if filled is None and b == len(regions) - 1:
            tail = True
            break
        if filled is None:
            raise UnsupportedModelError(f"step_cache: cannot tell which outputs of block {b} carry the stream")
        perms.append(filled)
    streams: list[Value | None] = [None] * slots
    if _same_run(regions[0], regions[1]):
        for position, v in enumerate(regions[1].inputs):
            if v.producer is regions[0]:
                streams[v.index] = regions[0].inputs[position]
    for k in range(slots):
        if streams[k] is None:
            candidates = [v for v in regions[0].inputs if v.type == types[k] and all(v is not x for x in streams)]
            if len(candidates) != 1:
                raise UnsupportedModelError(f"step_cache: cannot tell which input of the first block is stream {k}")
            streams[k] = candidates[0]
    return [v for v in streams if v is not None], perms, tail


def _by_type(perm: list[int | None], types: list[Any], outputs: Sequence[Value]) -> list[int] | None:
    """Fill the slots the next block could not tell by the one output of the slot's type; None when the
    outputs are not the stream."""
    if len(outputs) != len(types):
        return None
    for k, j in enumerate(perm):
        if j is None:
            candidates = [o.index for o in outputs if o.type == types[k] and o.index not in perm]
            if len(candidates) != 1:
                return None
            perm[k] = candidates[0]
    if any(outputs[j].type != types[k] for k, j in enumerate(perm)):
        return None
    return [j for j in perm if j is not None]


def _same_run(a: Node, b: Node) -> bool:
    return a.attrs["body"].structural_hash() == b.attrs["body"].structural_hash()
