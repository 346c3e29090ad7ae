"""The demo's per-model run, on the ResNet case."""
from __future__ import annotations

import math

import pytest

from graphopt.demo import DemoRow, format_rows, run_case
from graphopt.models import demo_cases, get_case

QUICK_LOWERING = {"lower_regions": {"backends": ["onnxruntime", "torch"], "cost_model": "analytical"}}
"""The default level, choosing by prediction among the candidates that compile in about a second: keeps the
fast test fast (measuring is tested in tests/backends/test_lower.py)."""


def test_demo_covers_a_resnet_a_vit_and_a_dit():
    assert [case.family for case in demo_cases()] == ["torchvision", "timm", "diffusers"]


def test_resnet_row_matches_eager_lowers_to_onnxruntime_and_passes_fire():
    row = run_case(get_case("torchvision.resnet18"), repeats=1, inductor=False, pass_options=QUICK_LOWERING)
    assert row.model == "torchvision.resnet18"
    assert 0 < row.nodes_after <= row.nodes_before and "fold_batch_norm" in row.passes_fired
    assert row.diff_graphopt <= 1e-4
    assert row.diff_compile <= 1e-4
    assert row.regions and set(row.regions) <= {"onnxruntime", "torch"}
    assert row.eager_ms > 0 and row.graphopt_ms > 0 and row.compile_ms > 0 and row.onnxruntime_ms > 0
    assert row.compile_s > 0 and row.inductor_ms is None
    table = format_rows([row])
    assert [line.split()[0] for line in table.splitlines() if line.startswith("torchvision")] == [
        "torchvision.resnet18"] * 2


@pytest.mark.slow
def test_resnet_row_shows_the_default_compile_beside_inductor_and_onnxruntime():
    row = run_case(get_case("torchvision.resnet18"), repeats=3)
    assert row.diff_compile <= 1e-4 and row.regions
    assert row.inductor_ms > 0 and row.inductor_compile_s > 0 and row.onnxruntime_ms > 0 and row.compile_s > 0
    assert "inductor compile s" in format_rows([row])


def test_tables_have_one_line_per_model_and_dashes_for_ways_not_run():
    rows = [DemoRow("a", 10, 8, ["dce"], 0.0, 1e-7, 1.0, 0.9, 0.8, {"onnxruntime": 2}, 3.5, 0.7, 20.0, 0.5),
            DemoRow("b", 5, 5, [], 2e-6, 0.0, 2.0, 2.0, 2.1)]
    ir, timings, note = format_rows(rows).split("\n\n")
    lines = ir.splitlines()
    assert len(lines) == 4
    assert lines[2].split()[:4] == ["a", "10->8", "dce", "onnxruntime:2"]
    assert lines[3].split()[:4] == ["b", "5->5", "-", "-"]
    a, b = (line.split() for line in timings.splitlines()[2:])
    assert a[1:] == ["1.00", "0.90", "0.80", "0.70", "0.50", "3.5", "20.0"]
    assert b[4:6] == ["-", "-"] and b[6] == "nan" and b[7] == "-" and math.isnan(rows[1].compile_s)
    assert "options={'level': 'O2'}" in note
