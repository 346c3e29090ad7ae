"""Data movement: reshape, permute, slicing, gather, concat, split, pad, expand."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import OpDef, rank_of_first_input, register_op


def reshape(x: torch.Tensor, shape=()) -> torch.Tensor:
    """Reshape to ``shape`` (one entry may be -1); a view when torch can make one."""
    return torch.reshape(x, list(shape))


def permute(x: torch.Tensor, dims=()) -> torch.Tensor:
    return x.permute(list(dims))


def flatten(x: torch.Tensor, start_dim: int = 0, end_dim: int = -1) -> torch.Tensor:
    return torch.flatten(x, start_dim, end_dim)


def squeeze(x: torch.Tensor, dims=None) -> torch.Tensor:
    """Remove the listed size-1 dims (all size-1 dims when ``dims`` is None)."""
    return x.squeeze() if dims is None else x.squeeze(tuple(dims))


def unsqueeze(x: torch.Tensor, dims=()) -> torch.Tensor:
    """Insert size-1 dims at ``dims``, positions in the output (as ONNX Unsqueeze)."""
    rank = x.dim() + len(dims)
    for d in sorted(d % rank for d in dims):
        x = x.unsqueeze(d)
    return x


def expand(x: torch.Tensor, shape=()) -> torch.Tensor:
    """torch ``expand``: -1 keeps a dim; leading dims may be added."""
    return x.expand(list(shape))


def broadcast_to(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """ONNX Expand: bidirectional broadcast of ``x`` with a runtime shape tensor."""
    target = torch.broadcast_shapes(tuple(x.shape), tuple(int(s) for s in shape.tolist()))
    return x.expand(target)


def slice(x: torch.Tensor, dim: int = 0, start: int = 0, end: int = 2**63 - 1, step: int = 1) -> torch.Tensor:  # noqa: A001
    """Positive-step slice along one dim, bounds clamped as in Python."""
    return torch.ops.aten.slice.Tensor(x, dim, start, end, step)


def select(x: torch.Tensor, dim: int = 0, index: int = 0) -> torch.Tensor:
    return torch.select(x, dim, index)


def take(x: torch.Tensor, indices: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """ONNX Gather: index ``axis`` of ``x`` by an index tensor of any shape (negative indices wrap)."""
    axis = axis % x.dim()
    idx = torch.where(indices < 0, indices + x.shape[axis], indices).long()
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


def index(x: torch.Tensor, *indices: torch.Tensor, dims=()) -> torch.Tensor:
    """Advanced indexing ``x[..., i, ..., j, ...]`` by integer index tensors at ``dims`` (others are full).

    The index tensors broadcast together; their shape replaces the indexed dims in
    place when ``dims`` are consecutive, else it leads the result (torch's rules).
    Negative indices wrap. ``dims`` are ascending; ``None`` marks a full dim for ATen.
    """
    per_dim: list[torch.Tensor | None] = [None] * (max(dims) + 1)
    for dim, idx in zip(dims, indices):
        per_dim[dim] = idx
    return torch.ops.aten.index.Tensor(x, per_dim)


def index_select(x: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.index_select(x, dim, index)


def gather(x: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """torch.gather (= ONNX GatherElements)."""
    return torch.gather(x, dim, index)


def embedding(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return F.embedding(indices, weight)


def concat(*xs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Join along ``dim``; as in ``torch.cat``, inputs :func:`skipped_by_concat` are left out."""
    return torch.cat(xs, dim)


def skipped_by_concat(shape, out_rank: int | None) -> bool:
    """torch.cat's legacy rule: a 1-D empty input (an empty KV cache's placeholder) joins tensors of any rank
    by being skipped; ONNX's Concat wants every input of the output's rank."""
    return shape is not None and tuple(shape) == (0,) and out_rank != 1


def stack(*xs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.stack(xs, dim)


def split(x: torch.Tensor, dim: int = 0, sizes=()) -> tuple[torch.Tensor, ...]:
    return tuple(torch.split(x, list(sizes), dim))


def pad(x: torch.Tensor, pads=(), mode: str = "constant", value: float = 0.0) -> torch.Tensor:
    """``F.pad``: ``pads`` pairs (before, after) from the last dim backwards; negative pads crop."""
    if mode == "constant":
        return F.pad(x, list(pads), mode, value)
    return F.pad(x, list(pads), mode)


def repeat(x: torch.Tensor, repeats=()) -> torch.Tensor:
    """torch ``repeat`` (= ONNX Tile when the ranks match)."""
    return x.repeat(list(repeats))


def flip(x: torch.Tensor, dims=()) -> torch.Tensor:
    return torch.flip(x, list(dims))


def roll(x: torch.Tensor, shifts=(), dims=()) -> torch.Tensor:
    return torch.roll(x, list(shifts), list(dims))


def tril(x: torch.Tensor, diagonal: int = 0) -> torch.Tensor:
    return torch.tril(x, diagonal)


def triu(x: torch.Tensor, diagonal: int = 0) -> torch.Tensor:
    return torch.triu(x, diagonal)


def shape(x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """The (sliced) shape of ``x`` as a 1-D int64 tensor (ONNX Shape)."""
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


def contiguous(x: torch.Tensor, memory_format: str = "contiguous_format") -> torch.Tensor:
    """The same values laid out in ``memory_format`` (``"contiguous_format"`` or ``"channels_last"``)."""
    return x.contiguous(memory_format=getattr(torch, memory_format))


def _rank_after_insert(inputs, attrs) -> int | None:
    """``unsqueeze``'s dims are positions in its output, ``stack``'s dim one in a rank-plus-one result."""
    rank = rank_of_first_input(inputs, attrs)
    if rank is None:
        return None
    return rank + (len(attrs["dims"]) if "dims" in attrs else 1)


def _rank_of_joined(inputs, attrs) -> int | None:
    """``concat``'s dim: that of its inputs' rank (a skipped empty 1-D placeholder may come first)."""
    ranks = [rank_of_first_input([v], attrs) for v in inputs]
    return max((r for r in ranks if r is not None), default=None)


_VIEWS = (reshape, permute, flatten, squeeze, unsqueeze, expand, broadcast_to, slice, select, shape)
_MOVES_ENTRIES = (take, slice, select, squeeze, unsqueeze, reshape, flatten, concat, index_select, gather)
_RESHAPES = (reshape, flatten, squeeze, unsqueeze)
_DIM_RANK = {unsqueeze: _rank_after_insert, stack: _rank_after_insert, concat: _rank_of_joined}
for _fn in (reshape, permute, flatten, squeeze, unsqueeze, expand, broadcast_to, slice, select, take,
            index, index_select, gather, embedding, concat, stack, pad, repeat, flip, roll, tril, triu, shape,
            contiguous, split):
    register_op(OpDef(_fn.__name__, _fn, category="shape", doc=(_fn.__doc__ or "").strip(), flops=lambda n: 0,
                      num_outputs=(lambda attrs: len(attrs["sizes"])) if _fn is split else 1,
                      dim_rank=_DIM_RANK.get(_fn, rank_of_first_input), view=_fn in _VIEWS or _fn is split,
                      moves_entries=_fn in _MOVES_ENTRIES, reads_shape_only=_fn is shape, reshapes=_fn in _RESHAPES,
                      keeps_dims=_fn in (slice, split)))
