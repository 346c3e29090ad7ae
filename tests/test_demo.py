"""The demo's per-model run, on the ResNet case."""
from __future__ import annotations

from graphopt.demo import DemoRow, format_rows, run_case
from graphopt.models import demo_cases, get_case


def test_demo_covers_a_resnet_a_vit_and_a_dit():
    assert [case.family for case in demo_cases()] == ["torchvision", "timm", "diffusers"]


def test_resnet_row_matches_eager_and_passes_fire():
    row = run_case(get_case("torchvision.resnet18"), repeats=1)
    assert row.model == "torchvision.resnet18"
    assert 0 < row.nodes_after <= row.nodes_before
    assert row.diff_graphopt <= 1e-4
    assert row.diff_compile <= 1e-4
    assert row.eager_ms > 0 and row.graphopt_ms > 0 and row.compile_ms > 0
    table = format_rows([row])
    assert table.splitlines()[2].startswith("torchvision.resnet18")


def test_table_has_one_line_per_model():
    rows = [DemoRow("a", 10, 8, ["dce"], 0.0, 1e-7, 1.0, 0.9, 0.8),
            DemoRow("b", 5, 5, [], 2e-6, 0.0, 2.0, 2.0, 2.1)]
    lines = format_rows(rows).splitlines()
    assert len(lines) == 4
    assert lines[2].split()[:3] == ["a", "10->8", "dce"]
    assert lines[3].split()[:3] == ["b", "5->5", "-"]
