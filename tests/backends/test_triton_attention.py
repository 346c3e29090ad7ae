"""The Triton band attention (sparse video attention's GPU kernel) against dense attention under its mask.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors, which
must be chosen before ``triton.language`` is first imported, so unless
``TRITON_INTERPRET=1`` was set when this process started,
``test_kernel_in_the_interpreter`` runs this file again in a fresh process
that sets it, and the kernel tests here skip. Shapes are small and not
multiples of the blocks, so masks are exercised; expected values come from
``band_attention_reference`` (dense attention under the band's mask).
"""
import pytest
import torch

from graphopt.backends import triton_attention
from graphopt.passes.sparse_attention.grid import Band, VideoGrid
from graphopt.passes.sparse_attention.kernels import band_attention_reference
from graphopt.passes.sparse_attention.profile import DENSE, SPATIAL, TEMPORAL
from triton_interpreter import passed_in_interpreter

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
UNAVAILABLE = triton_attention.unavailable(DEVICE)
needs_kernel = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"{UNAVAILABLE}; the interpreter test runs these")
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")


@pytest.mark.skipif(UNAVAILABLE is None or DEVICE.type != "cpu", reason="kernels run in this process")
def test_kernel_in_the_interpreter(tmp_path):
    passed, output = passed_in_interpreter(__file__, tmp_path)
    assert passed >= 6, output


def video(grid: VideoGrid, heads: int, dim: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(heads, n, dim, generator=g).to(DEVICE, dtype) for n in (grid.video,) * 3 + (grid.text,) * 2]


@needs_kernel
@pytest.mark.parametrize("dim, density, text", [(16, 0.5, 0), (32, 0.3, 5), (16, 1.0, 3), (64, 0.25, 4), (128, 0.25, 0)])
def test_spatial_and_temporal_heads_equal_dense_attention_under_their_band(dim, density, text):
    grid = VideoGrid(4, 2, 9, text=text)  # 72 video tokens: blocks of 16 do not divide them
    q, k, v, tk, tv = video(grid, 3, dim)
    band = Band.for_density(grid.video, density, block=16)
    kinds = torch.tensor([SPATIAL, TEMPORAL, SPATIAL])
    out = triton_attention.band_attention(q, k, v, band.starts(grid.video), band.window, band.block,
                                          grid.orders(), kinds, tk if text else None, tv if text else None)
    extra = (tk, tv) if text else (None, None)
    spatial = band_attention_reference(q, k, v, band, *extra)
    tm = grid.to_token_major
    temporal = grid.to_frame_major(band_attention_reference(tm(q), tm(k), tm(v), band, *extra))
    torch.testing.assert_close(out[0::2], spatial[0::2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1], temporal[1], rtol=1e-4, atol=1e-5)


@needs_kernel
def test_a_block_longer_than_a_program_runs_as_tiles_sharing_its_window():
    grid = VideoGrid(5, 8, 16, text=3)  # 640 video tokens in blocks of 256: five programs of 128 rows, one cut short
    q, k, v, tk, tv = video(grid, 2, 16)
    band = Band(block=256, window=384)
    out = triton_attention.band_attention(q, k, v, band.starts(grid.video), band.window, band.block,
                                          grid.orders(), torch.tensor([SPATIAL, SPATIAL]), tk, tv)
    torch.testing.assert_close(out, band_attention_reference(q, k, v, band, tk, tv), rtol=1e-4, atol=1e-5)


@needs_kernel
def test_listed_heads_are_written_into_a_strided_output_and_the_rest_left_alone():
    grid = VideoGrid(3, 4, 4, text=4)
    q, k, v, tk, tv = video(grid, 4, 16)
    band = Band.for_density(grid.video, 0.5, block=16)
    joint = torch.zeros(4, grid.tokens, 16, device=DEVICE)  # text first: video rows are a strided view
    heads = torch.tensor([1, 3])
    triton_attention.band_attention(q, k, v, band.starts(grid.video), band.window, band.block, grid.orders(),
                                    torch.tensor([SPATIAL, TEMPORAL, DENSE, SPATIAL]), tk, tv,
                                    out=joint[:, grid.video_span], heads=heads)
    tm = grid.to_token_major
    temporal = grid.to_frame_major(band_attention_reference(tm(q), tm(k), tm(v), band, tk, tv))
    torch.testing.assert_close(joint[1, grid.video_span], temporal[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(joint[3, grid.video_span], band_attention_reference(q, k, v, band, tk, tv)[3],
                               rtol=1e-4, atol=1e-5)
    assert (joint[0] == 0).all() and (joint[2] == 0).all() and (joint[:, grid.text_span] == 0).all()


@needs_kernel
def test_half_precision_inputs_accumulate_in_float():
    grid = VideoGrid(2, 4, 4)
    q, k, v, _, _ = video(grid, 2, 16, torch.float16)
    band = Band.for_density(grid.video, 0.5, block=16)
    out = triton_attention.band_attention(q, k, v, band.starts(grid.video), band.window, band.block, grid.orders(),
                                          torch.tensor([SPATIAL, SPATIAL]))
    assert out.dtype == torch.float16
    expected = band_attention_reference(q.float(), k.float(), v.float(), band)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-3)


@needs_kernel
@pytest.mark.parametrize("order", ["frame", "token"])
def test_the_module_s_triton_path_equals_its_torch_path(order):
    """In either token order of the inputs: the Triton kernel reads both head kinds through order tables."""
    from graphopt.emitters.state import GraphState
    from graphopt.passes.sparse_attention.runtime import Settings, SparseVideoAttention

    grid = VideoGrid(4, 4, 4, text=6, text_first=False)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, grid.tokens, 16, generator=g).to(DEVICE) for _ in range(3))
    outs = []
    for kernel in ("triton", "torch"):
        settings = Settings(grid, density=0.5, block=16, dense_heads=False, kernel=kernel, order=order)
        outs.append(SparseVideoAttention(settings, GraphState(), "attention")(q, k, v))  # every head sparse
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_head_dims_the_kernel_takes():
    assert triton_attention.takes(64) and triton_attention.takes(128) and not triton_attention.takes(80)
