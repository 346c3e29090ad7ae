"""Sparse attention and step caching under one budget: predicted pairs, tried in order of work."""
import math

import pytest

from graphopt.errors import GraphoptError
from graphopt.passes.sparse_attention.calibrate import Measured, candidates, choose, predicted, work
from graphopt.passes.step_cache.calibrate import meets


def quality(psnr: float) -> dict:
    return {"psnr": psnr, "ssim": 0.99, "rel_error": 0.01, "worst_psnr": psnr, "worst_ssim": 0.99,
            "worst_rel_error": 0.01}


CACHE = Measured({"policy": "fora", "interval": 2}, quality(33.0), skipped=0.5)
SPARSE = Measured({"density": 0.25}, quality(36.0), kept=0.4)


def test_a_pair_s_error_is_the_sum_of_its_passes_errors():
    both = predicted(CACHE, SPARSE)
    assert both["worst_psnr"] == pytest.approx(-10 * math.log10(10 ** -3.3 + 10 ** -3.6))
    assert predicted(CACHE, None)["worst_psnr"] == 33.0


def test_work_multiplies_the_savings():
    assert work(0.5, 0.4, attention_share=0.5) == pytest.approx(0.5 * (1 - 0.5 * 0.6))


def test_pairs_predicted_to_meet_the_budget_come_least_work_first():
    pairs = candidates([CACHE], [SPARSE], 0.5, {"psnr": 30}, meets)
    assert [(c is not None, s is not None) for _, c, s in pairs] == [(True, True), (True, False), (False, True)]
    assert [round(w, 3) for w, _, _ in pairs] == [0.35, 0.5, 0.7]
    assert len(candidates([CACHE], [SPARSE], 0.5, {"psnr": 33.5}, meets)) == 1  # only sparse alone fits


def test_a_pair_that_misses_when_run_gives_way_to_the_next():
    pairs = candidates([CACHE], [SPARSE], 0.5, {"psnr": 30}, meets)
    ran = []

    def run(c, s):
        ran.append((c, s))
        return Measured(None, quality(29.0), 0.5, 0.4)  # the pair misses

    c, s, measured = choose(pairs, run, {"psnr": 30}, meets)
    assert ran == [(CACHE, SPARSE)] and (c, s) == (CACHE, None) and measured is CACHE


def test_nothing_within_the_budget_is_one_clear_error():
    with pytest.raises(GraphoptError, match="loosen the budget"):
        choose([], lambda c, s: None, {"psnr": 40}, meets)
