"""Physically remove group channels: slice constants, fix size attributes, re-type the graph.

Every slot (value, dim) loses the union of the indices its members give for the
removed group channels. Constants are sliced in place of their data (still
parameters, so ``to_torch`` keeps them trainable); attributes that spell sizes
(reshape/expand shapes, split sizes, slice bounds, conv groups, norm shapes) are
rewritten from the new shapes; then every affected node is re-typed in order and
checked against the shape the removal predicts.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from graphopt.ir import Graph, Node, Value
from graphopt.ir.registry import infer_types
from graphopt.ir.types import TensorType

from .dependency import Group

__all__ = ["remove_channels"]


def remove_channels(graph: Graph, groups: Sequence[Group], removals: Mapping[int, Sequence[int]]) -> None:
    """Remove, for each group id, those group channels: slice every member's constant data, fix every attr
    that depends on the sizes (reshape shapes, conv groups for depthwise, group_norm num_groups, split sizes,
    head counts in reshapes), re-infer all types; the graph verifies with check_types=True afterwards."""
    drop = _dropped(groups, removals)
    if not drop:
        return
    old = {id(v): v.type for v in graph.values()}
    new_shape = {}
    for key, dims in drop.items():
        v = dims["value"]
        shape = list(v.type.shape)
        for d, idx in dims["dims"].items():
            shape[d] -= len(idx)
        new_shape[key] = tuple(shape)
    touched = {id(n) for n in graph.nodes if _fix_attrs(n, drop, new_shape)}
    for key, entry in drop.items():
        v = entry["value"]
        if v.is_constant:
            data = v.data.detach()
            for d, idx in entry["dims"].items():
                keep = _keep(data.shape[d], idx)
                data = data.index_select(d, keep)
            v.data = data.contiguous()
            v.type = TensorType(v.type.dtype, tuple(data.shape))
    changed = {id(entry["value"]) for entry in drop.values() if entry["value"].is_constant}
    for node in graph.nodes:
        if not any(v is not None and id(v) in changed for v in node.inputs) and id(node) not in touched:
            continue
        for out, t in zip(node.outputs, infer_types(node)):
            want = new_shape.get(id(out), old[id(out)].shape if isinstance(old[id(out)], TensorType) else None)
            if isinstance(t, TensorType) and want is not None and t.shape != want:
                raise RuntimeError(f"pruning left {node.op} {node.name} with output {t}, expected shape {want}")
            if t != out.type:
                out.type = t
                changed.add(id(out))


def _dropped(groups: Sequence[Group], removals: Mapping[int, Sequence[int]]) -> dict:
    """id(value) -> {"value": v, "dims": {dim: sorted removed indices}} over all groups."""
    by_id = {g.id: g for g in groups}
    drop: dict = {}
    for gid, channels in removals.items():
        if gid not in by_id:
            raise ValueError(f"group id {gid} is not one of the groups given; pass ids from build_groups()")
        g = by_id[gid]
        channels = sorted(set(int(c) for c in channels))
        if not channels:
            continue
        if not g.prunable:
            raise ValueError(f"group {g.id} ({g.label}) is not prunable: {g.reason}; leave it out of removals")
        if channels[0] < 0 or channels[-1] >= g.size:
            raise ValueError(f"group {g.id} ({g.label}) has channels 0..{g.size - 1}; got {channels}")
        if g.size - len(channels) < g.min_keep:
            raise ValueError(f"group {g.id} ({g.label}) must keep {g.min_keep} of {g.size} channels; remove fewer")
        for m in g.members:
            entry = drop.setdefault(id(m.value), {"value": m.value, "dims": {}})
            idx = set(entry["dims"].get(m.dim, ()))
            idx.update(m.positions[channels].reshape(-1).tolist())
            entry["dims"][m.dim] = sorted(idx)
    return drop


def _keep(n: int, removed: Sequence[int]) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[list(removed)] = False
    return mask.nonzero().reshape(-1)


def _fix_attrs(node: Node, drop: dict, new_shape: dict) -> bool:
    """Rewrite attrs that spell sizes of pruned dims; True when the node touches a pruned value."""
    if not any(v is not None and id(v) in drop for v in (*node.inputs, *node.outputs)):
        return False

    def shape(v: Value) -> tuple:
        return new_shape.get(id(v), v.type.shape)

    a = node.attrs
    if node.op in ("reshape", "expand"):
        out = shape(node.output)
        a["shape"] = [s if s == -1 or not isinstance(s, int) else out[i] for i, s in enumerate(a["shape"])]
    elif node.op == "split":
        axis = a.get("dim", 0)
        a["sizes"] = [shape(o)[axis] for o in node.outputs]
    elif node.op == "slice":
        x = node.inputs[0]
        axis = a.get("dim", 0) % len(x.type.shape)
        removed = drop.get(id(x), {"dims": {}})["dims"].get(axis)
        if removed:
            n = x.type.shape[axis]
            start = min(max(a.get("start", 0) + (n if a.get("start", 0) < 0 else 0), 0), n)
            new_start = start - sum(1 for i in removed if i < start)
            a["start"], a["end"] = new_start, new_start + shape(node.output)[axis]
    elif node.op == "conv" and a.get("groups", 1) > 1:
        x, w = node.inputs[0], node.inputs[1]
        a["groups"] = shape(x)[1] // shape(w)[1]
    elif node.op == "group_norm":
        x = node.inputs[0]
        per = x.type.shape[1] // a.get("num_groups", 1)
        a["num_groups"] = shape(x)[1] // per
    elif node.op in ("layer_norm", "rms_norm"):
        k = len(a.get("normalized_shape", ()))
        a["normalized_shape"] = list(shape(node.inputs[0])[len(shape(node.inputs[0])) - k:])
    elif node.op == "sdpa" and a.get("scale") is None:
        q = node.inputs[0]
        if shape(q)[-1] != q.type.shape[-1]:
            a["scale"] = float(q.type.shape[-1]) ** -0.5
    return True
