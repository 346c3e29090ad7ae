"""The video token grid an attention runs over, its two token orders, and the bands of key blocks.

Sparse VideoGen (Xi et al. 2025, "Sparse VideoGen: Accelerating Video
Diffusion Transformers with Spatial-Temporal Sparsity") sees two kinds of
heads: *spatial* ones attend within their own and nearby frames, a band
around the diagonal of the frame-major token order; *temporal* ones attend
to the same position in every frame, a band around the diagonal once the
tokens are token-major (frame index fastest). ``VideoGrid`` holds the
frames x height x width of the video tokens and where text tokens sit in a
joint sequence; ``Band`` is the block-sparse pattern both head kinds reduce
to: each block of ``block`` query rows attends to ``window`` consecutive keys
centred on it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import torch

from graphopt.ir import Graph


@dataclass(frozen=True)
class VideoGrid:
    """Video tokens ``frames x height x width`` (frame-major), and ``text`` tokens before or after them;
    ``text=None``: as many as each call's sequence holds beyond the video (Mochi drops padded text)."""

    frames: int
    height: int
    width: int
    text: int | None = 0
    text_first: bool = True

    def for_sequence(self, tokens: int) -> VideoGrid:
        """This grid with the text tokens a ``tokens``-long sequence holds."""
        if self.text is not None:
            return self
        return VideoGrid(self.frames, self.height, self.width, tokens - self.video, self.text_first)

    @property
    def per_frame(self) -> int:
        return self.height * self.width

    @property
    def video(self) -> int:
        return self.frames * self.per_frame

    @property
    def tokens(self) -> int:
        return self.video + self.text

    @property
    def video_span(self) -> slice:
        start = self.text if self.text_first else 0
        return slice(start, start + self.video)

    @property
    def text_span(self) -> slice:
        return slice(0, self.text) if self.text_first else slice(self.video, self.tokens)

    def to_token_major(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Video tokens along ``dim`` from frame-major to token-major order (a contiguous copy)."""
        dim = dim % x.dim()
        split = x.unflatten(dim, (self.frames, self.per_frame))
        return split.transpose(dim, dim + 1).flatten(dim, dim + 1)

    def to_frame_major(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """The inverse of ``to_token_major``."""
        dim = dim % x.dim()
        split = x.unflatten(dim, (self.per_frame, self.frames))
        return split.transpose(dim, dim + 1).flatten(dim, dim + 1)

    def reorder(self, x: torch.Tensor, token_major: bool, dim: int = -2) -> torch.Tensor:
        """``to_token_major`` if ``token_major`` else ``to_frame_major``."""
        return self.to_token_major(x, dim) if token_major else self.to_frame_major(x, dim)

    @cached_property
    def token_major_positions(self) -> torch.Tensor:
        """``p[i]``: where frame-major video token ``i`` sits in token-major order."""
        return self.to_frame_major(torch.arange(self.video), dim=0)

    @cached_property
    def token_major_order(self) -> list[int]:
        """The joint sequence's permutation to token-major video tokens (text tokens stay):
        ``token_major[i] = frame_major[perm[i]]``."""
        start = self.video_span.start
        video = (self.to_token_major(torch.arange(self.video), 0) + start).tolist()
        return [*range(start), *video, *range(start + self.video, self.tokens)]

    def orders(self, token_major: bool = False) -> torch.Tensor:
        """``[2, video]``: where token ``i`` of frame-major order (row 0) and of token-major order (row 1)
        lives in memory that holds the video tokens frame-major (or, with ``token_major``, token-major)."""
        identity = torch.arange(self.video)
        if token_major:
            return torch.stack([self.token_major_positions, identity])
        return torch.stack([identity, self.to_token_major(identity, 0)])


@dataclass(frozen=True)
class Band:
    """Each block of ``block`` query rows attends to ``window`` consecutive keys centred on it (clipped to
    the sequence): a block-sparse mask whose kept key blocks form one run per query block."""

    block: int
    window: int

    @classmethod
    def for_density(cls, tokens: int, density: float, block: int | None = None) -> Band:
        """The band keeping about ``density`` of the ``tokens x tokens`` scores, its window a whole number
        of ``min(block, 256)`` keys. The default block gives at least 8 query blocks of 16 to 1,024 rows, and
        none longer than the window: long blocks run faster on CPU, where ATen's flash kernel splits 768 or
        more query rows in tiles of 256 and fewer in tiles of 64."""
        default = block is None
        if default:
            block = 16
            while block < 1024 and block * 16 <= tokens:
                block *= 2
        unit = min(block, 256)
        units = -(-tokens // unit)
        window = min(tokens, min(units, max(1, round(density * units))) * unit)
        while default and block > max(window, unit):
            block //= 2
        return cls(block, window)

    def starts(self, tokens: int) -> list[int]:
        """The first key of each query block's window."""
        starts = []
        for s in range(0, tokens, self.block):
            centre = (s + min(s + self.block, tokens)) // 2
            starts.append(min(max(centre - self.window // 2, 0), tokens - self.window))
        return starts

    def mask(self, rows: torch.Tensor, tokens: int) -> torch.Tensor:
        """``[len(rows), tokens]`` booleans: the keys query rows ``rows`` attend to."""
        starts = torch.tensor(self.starts(tokens), device=rows.device)[rows // self.block]
        keys = torch.arange(tokens, device=rows.device)
        return (keys >= starts[:, None]) & (keys < starts[:, None] + self.window)

    def density(self, tokens: int) -> float:
        return self.window / tokens


# --------------------------------------------------------------- inference
def grid_splits(graph: Graph) -> Counter:
    """``(tokens, (f, h, w))`` for every reshape that unflattens the token dim of ``[batch, tokens, ...]``
    into three (an unpatchify), or flattens the last three dims into one (a patch embedding's
    ``flatten(2)`` of ``[batch, channels, f, h, w]``), counted. Splits of other dims (heads, rotary pairs)
    are not grids."""
    found: Counter = Counter()
    for node in graph.find("reshape"):
        x, y = (getattr(v.type, "shape", None) for v in (node.inputs[0], node.output))
        if not x or not y or not all(isinstance(d, int) for d in (*x[1:], *y[1:])):  # the batch may be symbolic
            continue
        i = next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), None)
        if i is None:
            continue
        if i == 1 and len(y) >= 4 and y[1] * y[2] * y[3] == x[1]:
            three = tuple(y[1:4])
        elif i >= 1 and len(x) == i + 3 and len(y) == i + 1 and x[i] * x[i + 1] * x[i + 2] == y[i]:
            three = tuple(x[i:])
        else:
            continue
        if min(three[1:]) > 1:
            found[three[0] * three[1] * three[2], three] += 1
    return found


def infer_grid(graph: Graph, sequence: int | None) -> tuple[int, int, int] | None:
    """The ``(frames, height, width)`` of the video tokens among ``sequence`` attention tokens (None: a
    data-dependent count): the most frequent split of the largest token count that fits, or None."""
    splits = grid_splits(graph)
    fitting = [(tokens, three) for (tokens, three) in splits if sequence is None or tokens <= sequence]
    if not fitting:
        return None
    tokens = max(t for t, _ in fitting)
    return max((three for t, three in fitting if t == tokens), key=lambda three: splits[tokens, three])


def infer_text_first(graph: Graph, video: int, text: int | None) -> bool | None:
    """Whether text tokens precede the video tokens in the joint sequence: the order of the two parts of a
    ``concat`` of ``video`` and ``text`` tokens (``None``: a data-dependent count), or None when no such
    concat is found."""
    votes: Counter = Counter()
    for node in graph.find("concat"):
        if len(node.inputs) != 2:
            continue
        dim = node.attrs["dim"]
        sizes = [getattr(v.type, "shape", None) for v in node.inputs]
        if any(s is None or len(s) <= dim for s in sizes):
            continue
        pair = (sizes[0][dim], sizes[1][dim])
        if pair == (text, video) or text is None and pair[1] == video and not isinstance(pair[0], int):
            votes[True] += 1
        elif pair == (video, text) or text is None and pair[0] == video and not isinstance(pair[1], int):
            votes[False] += 1
    return votes.most_common(1)[0][0] if votes else None
