"""Sparse attention and step caching under one budget: predicted pairs, tried fastest first."""
import math

import pytest

from graphopt.errors import GraphoptError
from graphopt.passes.sparse_attention.calibrate import Measured, candidates, choose, predicted, time_left, work
from graphopt.passes.step_cache.calibrate import meets


def quality(psnr: float) -> dict:
    return {"psnr": psnr, "ssim": 0.99, "rel_error": 0.01, "worst_psnr": psnr, "worst_ssim": 0.99,
            "worst_rel_error": 0.01}


CACHE = Measured({"policy": "fora", "interval": 2}, quality(33.0), skipped=0.5, time=0.55)
SPARSE = Measured({"density": 0.25}, quality(36.0), kept=0.4, time=0.8)
SLOW_SPARSE = Measured({"density": 0.25}, quality(36.0), kept=0.4, time=1.1)  # fewer FLOPs, more overhead


def test_a_pair_s_error_is_the_sum_of_its_passes_errors():
    both = predicted(CACHE, SPARSE)
    assert both["worst_psnr"] == pytest.approx(-10 * math.log10(10 ** -3.3 + 10 ** -3.6))
    assert predicted(CACHE, None)["worst_psnr"] == 33.0


def test_work_multiplies_the_savings():
    assert work(0.5, 0.4, attention_share=0.5) == pytest.approx(0.5 * (1 - 0.5 * 0.6))


def test_time_left_counts_every_call_the_dense_steps_included():
    # attention is half the dense run; 2 dense-step calls of 1 s, 8 sparse calls of 0.5 s: calls average 0.6 s
    assert time_left(0.5, [2.0, 4.0], [2, 8], dense_call=9.9) == pytest.approx(1 - 0.5 * 0.4)
    assert time_left(0.5, [0.0, 4.0], [0, 8], dense_call=1.0) == pytest.approx(0.75)  # no dense step: a dense run's
    assert time_left(0.5, [0.0, 0.0], [0, 0], dense_call=1.0) == 1.0


def test_pairs_predicted_to_meet_the_budget_come_fastest_first():
    pairs = candidates([CACHE], [SPARSE], {"psnr": 30}, meets)
    assert [(c is not None, s is not None) for _, c, s in pairs] == [(True, True), (True, False), (False, True)]
    assert [round(t, 3) for t, _, _ in pairs] == [0.44, 0.55, 0.8]
    assert len(candidates([CACHE], [SPARSE], {"psnr": 33.5}, meets)) == 1  # only sparse alone fits


def test_a_pass_that_saves_flops_but_not_time_is_left_out():
    pairs = candidates([CACHE], [SLOW_SPARSE], {"psnr": 30}, meets)
    assert [(c, s) for _, c, s in pairs][0] == (CACHE, None)
    c, s, measured = choose(pairs, lambda c, s: pytest.fail("the slower pair was run"), {"psnr": 30}, meets)
    assert (c, s) == (CACHE, None) and measured is CACHE


def run_returning(measured: Measured, ran: list):
    def run(c, s):
        ran.append((c, s))
        return measured
    return run


@pytest.mark.parametrize("pair", [
    Measured(None, quality(29.0), 0.5, 0.4, time=0.44),  # misses the budget
    Measured(None, quality(31.0), 0.5, 0.4, time=0.6),  # meets it, but slower than caching alone ran
    Measured(None, quality(31.0), 0.5, 0.4, time=0.52),  # 5 % faster: within the time model's error
])
def test_a_pair_that_misses_or_is_slower_when_run_gives_way_to_the_next(pair):
    pairs = candidates([CACHE], [SPARSE], {"psnr": 30}, meets)
    ran = []
    c, s, measured = choose(pairs, run_returning(pair, ran), {"psnr": 30}, meets)
    assert ran == [(CACHE, SPARSE)] and (c, s) == (CACHE, None) and measured is CACHE


def test_a_pair_that_meets_the_budget_faster_than_either_pass_alone_is_chosen():
    pair = Measured(None, quality(31.0), 0.5, 0.4, time=0.45)
    c, s, measured = choose(candidates([CACHE], [SPARSE], {"psnr": 30}, meets), run_returning(pair, []),
                            {"psnr": 30}, meets)
    assert (c, s) == (CACHE, SPARSE) and measured is pair


def test_nothing_within_the_budget_is_one_clear_error():
    with pytest.raises(GraphoptError, match="loosen the budget"):
        choose([], lambda c, s: None, {"psnr": 40}, meets)
