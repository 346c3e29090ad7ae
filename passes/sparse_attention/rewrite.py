"""The ``sparse_video_attention`` pass: self-attention over a video token grid becomes head-kind sparse.

It matches the IR's ``sdpa`` (the unfused spellings are ``sdpa`` once
``fuse_attention`` has run, which ``O1`` does) wherever queries and keys are
the same joint sequence of video tokens and text tokens, and replaces it by a
``video_sparse_attention`` node that the torch emitter turns into a
``runtime.SparseVideoAttention`` module. The grid is read off the graph's
reshapes (a patch embedding's flatten, an unpatchify's unflatten) and the
text side off the ``concat`` that joins text and video tokens; options give
them where the graph does not. Cross-attention, causal and grouped attention,
and masks other than a key mask stay dense. Without the emitter
(``interpret``) the node is dense attention: the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from graphopt.errors import InvalidOptionError, UnsupportedModelError
from graphopt.ir import Graph, Node
from graphopt.ir.registry import OpDef, register_op
from graphopt.ir.types import TensorType
from graphopt.pass_manager import Pass, PassKind, PassResult, register_pass
from graphopt.passes.layout import FoldTokenPermutations, insert_inverse_token_permutation, permute_tokens

from .grid import VideoGrid, infer_grid, infer_text_first
from .runtime import Settings, SparseVideoAttention


# ------------------------------------------------------------------- the op
def video_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                           scale: float | None = None, grid: list | None = None, text: int | None = 0,
                           text_first: bool = True, density: float = 0.25, levels: int = 1, block: int | None = None,
                           budget: float = 0.05, samples: int = 64, dense_steps: int = 0, profile_every: int = 1,
                           first_tokens: int | None = None, dense_heads: bool = True, kernel: str = "auto",
                           order: str = "frame", label: str = "") -> torch.Tensor:
    """Attention of video (and text) tokens, sparse per head once emitted; interpreted, dense attention (the
    same in either token ``order``: q, k, v and the mask are in one order)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


SETTINGS = ("density", "levels", "block", "budget", "samples", "dense_steps", "profile_every", "first_tokens",
            "dense_heads", "kernel", "scale", "order")


def settings_of(node: Node) -> Settings:
    a = node.attrs
    grid = VideoGrid(*a["grid"], text=a["text"], text_first=a["text_first"])
    return Settings(grid, **{k: a[k] for k in SETTINGS})


class _Emitted(SparseVideoAttention):
    """Returns a tuple, as the emitter's submodules do."""

    uses_state = True

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:  # type: ignore[override]
        return (super().forward(*inputs),)


def _emit(node: Node, emit_body: Any, state: Any) -> SparseVideoAttention:
    module = _Emitted(settings_of(node), state, "")
    module.key = f"sparse_attention/{id(module)}"
    return module


# Opaque, as ``step_cache``: a stateful runtime module that no importer, emitter or code generator lowers.
register_op(OpDef("video_sparse_attention", video_sparse_attention, category="opaque", pure=False,
                  torch_module=_emit, doc=video_sparse_attention.__doc__))


# ------------------------------------------------------------------ the pass
@register_pass
@dataclass
class SparseVideoAttentionPass(Pass):
    """Head-kind sparse attention for video diffusion transformers (Sparse VideoGen, Xi et al. 2025)."""

    name = "sparse_video_attention"
    kind = PassKind.LOSSY
    quality_metric = "psnr against dense attention with the same seed"
    before_level = True

    density: float = 0.25
    """The share of (query block, key block) pairs a sparse head computes, in (0, 1]."""
    levels: int = 1
    """Band widths profiling may choose per head: ``density``, twice it, ... (1: one width, as SVG)."""
    video_shape: tuple[int, int, int] | None = None
    """``(frames, height, width)`` in tokens, where the graph's reshapes do not tell."""
    text_tokens: int | None = None
    """Text tokens in the joint sequence (0 for video-only self-attention), where the graph does not tell."""
    text_position: str | None = None
    """``"first"`` or ``"last"``: where text tokens sit in the joint sequence."""
    block: int | None = None
    """Query rows per block (16-256 by the sequence length when not given)."""
    budget: float = 0.05
    """A head whose closer band misses its sampled rows by more (relative squared error) stays dense."""
    samples: int = 64
    dense_steps: int = 0
    """Calls of each attention (sampling steps) that run dense before profiling starts."""
    dense_layers: int = 1
    """Video self-attentions, in graph order, left dense (SVG keeps the first layer dense)."""
    profile_every: int = 1
    first_tokens: int | None = None
    """Draw profiled rows from the first tokens only (SVG's draw: 10,000), for comparison."""
    dense_heads: bool = True
    """Whether profiling may keep a head dense (False: SVG's recipe, the closer band always)."""
    kernel: str = "auto"
    """``"auto"`` (on a GPU, whichever of Triton's and torch's kernels times faster on the first call of a
    shape; torch's elsewhere), ``"triton"`` or ``"torch"``."""
    layout: str = "frame"
    """The video token order the graph runs in. ``"frame"``: the model's own; torch's kernels permute
    temporal heads in and back inside each attention. ``"token"``: each attention reads its q, k, v
    token-major through token permutations in the graph, which ``fold_token_permutations`` cancels across
    the token-wise ops between attentions, so the model runs token-major from where its tokens first
    appear to where they leave, and torch's kernels permute spatial heads instead. (The Triton kernel reads
    either order with no copies.)"""

    def call(self, graph: Graph) -> PassResult:
        self._check_options()
        if graph.find("video_sparse_attention", nested=True):  # sparse already (passes repeated; its layers
            # may sit inside a region by now, as step caching's blocks do)
            return PassResult(graph, False)
        attentions = [n for n in graph.find("sdpa") if _self_attention(n)]
        if not attentions:
            raise UnsupportedModelError(
                f"sparse_video_attention found no self-attention in {graph.name}; it makes the attention of a "
                f"video diffusion transformer sparse, leave it out for other models")
        static = [_tokens(n) for n in attentions if isinstance(_tokens(n), int)]
        grid = self.grid(graph, max(static) if static else None)
        video = [n for n in attentions if (_tokens(n) == grid.tokens if grid.text is not None
                                           else not isinstance(_tokens(n), int))]
        if self.layout == "token" and grid.text is None:
            raise InvalidOptionError(
                "sparse_video_attention: layout='token' needs a text length known when compiling, and this "
                "model's varies per call; use layout='frame'")
        replaced = [_replace(graph, n, grid, self) for n in video[self.dense_layers:]]
        stats = {"attention_replaced": len(replaced),
                 "attention_dense_layers": min(len(video), self.dense_layers),
                 "attention_other": len(graph.find("sdpa")) - min(len(video), self.dense_layers)}
        if self.layout == "token" and replaced:
            stats.update(_run_token_major(graph, replaced, grid))
        return PassResult(graph, bool(replaced), stats)

    def _check_options(self) -> None:
        if not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            raise InvalidOptionError(f"sparse_video_attention: density must be in (0, 1], got {self.density!r}")
        if not isinstance(self.levels, int) or self.levels < 1:
            raise InvalidOptionError(f"sparse_video_attention: levels is a count of band widths >= 1, got {self.levels!r}")
        if self.layout not in ("frame", "token"):
            raise InvalidOptionError(f"sparse_video_attention: layout is 'frame' or 'token', got {self.layout!r}")
        if self.kernel not in ("auto", "triton", "torch"):
            raise InvalidOptionError(f"sparse_video_attention: kernel is 'auto', 'triton' or 'torch', got {self.kernel!r}")
        if self.text_position not in (None, "first", "last"):
            raise InvalidOptionError(f"sparse_video_attention: text_position is 'first' or 'last', "
                                     f"got {self.text_position!r}")
        if self.video_shape is not None and (len(self.video_shape) != 3 or min(self.video_shape) < 1):
            raise InvalidOptionError(f"sparse_video_attention: video_shape is (frames, height, width) in tokens, "
                                     f"got {self.video_shape!r}")

    def grid(self, graph: Graph, tokens: int | None) -> VideoGrid:
        """The grid of the ``tokens``-long self-attention (None: a data-dependent length, video tokens and
        as many text tokens as each call holds): from the options, else from the graph."""
        shape = tuple(self.video_shape) if self.video_shape is not None else infer_grid(graph, tokens)
        length = "a data-dependent number of" if tokens is None else tokens
        if shape is None:
            raise UnsupportedModelError(
                f"sparse_video_attention cannot tell the video grid of {graph.name}'s attention over {length} "
                f"tokens from its reshapes; give video_shape=(frames, height, width) in tokens")
        video = shape[0] * shape[1] * shape[2]
        text = self.text_tokens if self.text_tokens is not None else None if tokens is None else tokens - video
        if tokens is not None and text is not None and video + text != tokens:
            raise InvalidOptionError(
                f"sparse_video_attention: video_shape {shape} is {video} tokens and text_tokens {text}, "
                f"{video + text} in all, but the self-attention runs over {tokens}; fix video_shape or text_tokens")
        if text is not None and text < 0:
            raise InvalidOptionError(
                f"sparse_video_attention: video_shape {shape} is {video} tokens, more than the {tokens} the "
                f"self-attention runs over; fix video_shape")
        first = True
        if text != 0:
            first = {"first": True, "last": False}.get(self.text_position or "", None)
            first = infer_text_first(graph, video, text) if first is None else first
            if first is None:
                raise UnsupportedModelError(
                    f"sparse_video_attention cannot tell whether the text tokens come before or after the "
                    f"{video} video tokens; give text_position='first' or 'last'")
        return VideoGrid(*shape, text=text, text_first=first)


def _run_token_major(graph: Graph, attentions: list[Node], grid: VideoGrid) -> dict[str, int]:
    """Give each (token-order) attention token-major q, k, v (and key mask) and its output back frame-major,
    through token permutations in the graph, then cancel them across the layers (``fold_token_permutations``).
    Returns the permutations placed and those left."""
    perm = grid.token_major_order
    placed = 0
    for node in attentions:
        for i, x in enumerate(node.inputs):  # q, k, v: [batch, heads, tokens, d]; a key mask: [..., 1, tokens]
            node.replace_input(i, permute_tokens(graph, x, perm, x.type.rank - (1 if i == 3 else 2), before=node))
        insert_inverse_token_permutation(graph, node.output, perm, 2)
        placed += len(node.inputs) + 1
    folded = FoldTokenPermutations(inference=True).call(graph)
    return {"layout_permutations_placed": placed, "layout_permutations_left": folded.stats["transforms_after"]}


def _tokens(node: Node) -> Any:
    """The sequence length: an int, or a symbolic length (a data-dependent text count)."""
    return node.inputs[0].type.shape[-2]


def _self_attention(node: Node) -> bool:
    """Queries and keys of one length, no causal or grouped heads, at most a key mask. Heads and head dims
    are static; the batch and the length may be symbolic."""
    q, k, v, *rest = node.inputs
    mask = rest[0] if rest else None
    shapes = [getattr(x.type, "shape", None) for x in (q, k, v)]
    if any(s is None or len(s) != 4 or not all(isinstance(d, int) for d in (s[1], s[3])) for s in shapes):
        return False
    if node.attrs["is_causal"] or node.attrs["enable_gqa"]:
        return False
    if shapes[0][1] != shapes[1][1] or not _same_length(shapes[0][-2], shapes[1][-2]):
        return False
    if mask is not None:
        m = getattr(mask.type, "shape", None)
        return m is not None and len(m) == 4 and m[-2] == 1
    return True


def _same_length(a: Any, b: Any) -> bool:
    return a == b if isinstance(a, int) and isinstance(b, int) else str(a) == str(b)


def _replace(graph: Graph, node: Node, grid: VideoGrid, options: SparseVideoAttentionPass) -> Node:
    q, k, v, *rest = node.inputs
    inputs = [q, k, v] + [m for m in rest[:1] if m is not None]
    attrs = {"scale": node.attrs["scale"], "grid": [grid.frames, grid.height, grid.width], "text": grid.text,
             "text_first": grid.text_first, "label": "",
             "order": options.layout, **{k: getattr(options, k) for k in SETTINGS if k not in ("scale", "order")}}
    out: TensorType = node.output.type
    new = graph.add_node("video_sparse_attention", inputs, attrs, output_types=[out], after=node,
                         name=graph.unique_name("sparse_attention"))
    node.output.replace_by(new.output)
    graph.remove_node(node)
    return new
