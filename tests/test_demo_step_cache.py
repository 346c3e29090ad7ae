"""The demo's diffusion part: step caching on the trained digits DiT, calibrated to PSNR >= 30 dB."""
import pytest

from graphopt.demo_step_cache import format_step_cache_row, run_step_cache_demo


@pytest.mark.slow
def test_the_cached_sampler_meets_its_budget_skips_blocks_and_draws_both_grids(tmp_path):
    row = run_step_cache_demo(quick=True, image=tmp_path / "grids.png")
    assert row.psnr >= 28 and row.skipped > 0.3 and row.accuracy_cached >= 0.8
    assert row.image.stat().st_size > 1000
    table = format_step_cache_row(row)
    assert "step_cache auto" in table and "speed-up" in table
