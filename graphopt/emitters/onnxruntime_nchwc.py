"""ONNX rows for onnxruntime's NCHWc ops (domain ``com.microsoft.nchwc``): the ``ort.nchwc.*`` IR ops.

Which regions run blocked is decided by the ``plan_nchwc_regions`` pass
(``graphopt.passes.onnxruntime_nchwc``). In the IR a blocked tensor is the NCHW
tensor with its channels zero-padded to whole blocks and its filters are OIHW;
this module writes them in the blocked memory order onnxruntime reads:
``[N, C/B, H, W, B]`` tensors and OIHWBiBo / OIHWBo filters.
"""
from __future__ import annotations

import torch

from graphopt.ir import Node

from .onnx import OnnxEmitter
from .onnxruntime_ops import activation_attributes

DOMAIN = "com.microsoft.nchwc"
METADATA_KEY = "onnxruntime.nchwc_block_size"
"""Model metadata naming the block size the model was written for: it runs only on CPUs with that one."""


def reorder_filter_blocked(w: torch.Tensor, block: int) -> torch.Tensor:
    """``[O, I, kh, kw]`` → OIHWBiBo: ``[O/B][I/B][kh][kw][B in][B out]``, both channel dims zero-padded."""
    o, i, kh, kw = w.shape
    po, pi = _pad_to(o, block), _pad_to(i, block)
    padded = w.new_zeros(po, pi, kh, kw)
    padded[:o, :i] = w
    blocks = padded.reshape(po // block, block, pi // block, block, kh, kw).permute(0, 2, 4, 5, 3, 1)
    return blocks.reshape(po, pi, kh, kw).contiguous()


def reorder_filter_out_blocked(w: torch.Tensor, block: int) -> torch.Tensor:
    """``[O, I, kh, kw]`` → OIHWBo: ``[O/B][I][kh][kw][B out]``, for depthwise convs and unblocked inputs."""
    o, i, kh, kw = w.shape
    po = _pad_to(o, block)
    padded = w.new_zeros(po, i, kh, kw)
    padded[:o] = w
    return padded.reshape(po // block, block, i, kh, kw).permute(0, 2, 3, 4, 1).reshape(po, i, kh, kw).contiguous()


def _pad_to(n: int, block: int) -> int:
    return -(-n // block) * block


def _add(e: OnnxEmitter, n: Node, op_type: str, ins: list, outs: list, **attrs) -> None:
    """One node of the NCHWc domain; the model records the block size it is written for."""
    e.extra_opsets[DOMAIN] = 1
    if "block" in n.attrs:
        e.metadata[METADATA_KEY] = str(n.attrs["block"])
    e.add(op_type, ins, outs, domain=DOMAIN, **attrs)


def _reorder_input(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    _add(e, n, "ReorderInput", ins, outs)


def _reorder_output(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    _add(e, n, "ReorderOutput", ins, outs, channels=int(n.attrs["channels"]))


def _conv(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    """onnxruntime's filter rule: OIHWBo for depthwise convs and for inputs of fewer channels than a block
    (read in NCHW), else OIHWBiBo."""
    from .onnx_table import conv_attributes

    w, block = n.inputs[1], int(n.attrs["block"])
    out_channels, in_per_group = w.data.shape[:2]
    groups = int(n.attrs["groups"])
    depthwise = in_per_group == 1 and groups == out_channels
    reads_nchw = groups == 1 and in_per_group < block
    layout = reorder_filter_out_blocked if depthwise or reads_nchw else reorder_filter_blocked
    x, _, b, z = (ins + [""] * 4)[:4]
    filters = e.const(layout(w.data.float(), block), hint=f"{w.name}_nchwc")
    _add(e, n, "Conv", [x, filters, b, z] if z else [x, filters, b], outs, **conv_attributes(n),
         **activation_attributes(n))


def _max_pool(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    from .onnx_table import per_dim, pool_window

    _add(e, n, "MaxPool", ins, outs, dilations=per_dim(n.attrs["dilation"], 2), **pool_window(n))


def _avg_pool(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    from .onnx_table import pool_window

    _add(e, n, "AveragePool", ins, outs, count_include_pad=int(n.attrs["count_include_pad"]), **pool_window(n))


def _global_avg_pool(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    _add(e, n, "GlobalAveragePool", ins, outs)


def _channel_scale(e: OnnxEmitter, n: Node, ins: list, outs: list) -> None:
    """The blocked ``x`` as rows ``[N, C/B, H, W·B]`` and the per-channel ``s`` tiled to one such row
    ``[N, C/B, 1, W·B]``, so that they broadcast over whole rows.

    As ``[N, C/B, H, W, B]`` against ``[N, C/B, 1, 1, B]`` onnxruntime broadcasts in spans of ``B``
    elements: with its squeeze-excitation scales so, EfficientNet-B0 ran 8% slower than with onnxruntime's
    own choice (reorder to NCHW, multiply, reorder back); as rows, 9% faster at batch 1 and 11% at batch 8
    (2 threads).
    """
    x, s = n.inputs
    _, channels, height, width = x.type.shape
    block = int(n.attrs["block"])
    blocks, row = channels // block, width * block
    if s.is_constant:
        tiled = s.data.float().reshape(1, blocks, 1, 1, block).expand(1, blocks, 1, width, block)
        s_row = e.const(tiled.reshape(1, blocks, 1, row), hint=f"{s.name}_nchwc_row")
    else:
        s5 = e.add1("Reshape", [ins[1], e.ints([0, blocks, 1, 1, block], "nchwc_split")])
        tiled = e.add1("Expand", [s5, e.ints([1, blocks, 1, width, block], "nchwc_tile")])
        s_row = e.add1("Reshape", [tiled, e.ints([0, blocks, 1, row], "nchwc_row")])
    x_rows = e.add1("Reshape", [ins[0], e.ints([0, blocks, height, row], "nchwc_rows")])
    y = e.add1({"mul": "Mul", "add": "Add"}[n.attrs["binary"]], [x_rows, s_row])
    e.add("Reshape", [y, e.ints([0, channels, height, width], "nchwc_join")], outs)


ROWS = {
    "ort.nchwc.reorder_input": _reorder_input,
    "ort.nchwc.reorder_output": _reorder_output,
    "ort.nchwc.conv": _conv,
    "ort.nchwc.max_pool": _max_pool,
    "ort.nchwc.avg_pool": _avg_pool,
    "ort.nchwc.global_avg_pool": _global_avg_pool,
    "ort.nchwc.channel_scale": _channel_scale,
}
"""The emitter table's rows for the NCHWc ops."""
