"""The ``graphopt`` command line: optimize/inspect/passes on a small exported model, and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from graphopt.cli import main


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(y.view(y.size(0), -1))  # exports as a Shape/Gather/Concat chain that folds away


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    torch.onnx.export(TinyConvNet().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False,
                      input_names=["x"], output_names=["logits"], do_constant_folding=False)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_optimize_writes_a_smaller_model_and_prints_the_table(model_path, tmp_path, capsys):
    out_path = tmp_path / "opt.onnx"
    report = tmp_path / "report.json"
    code, out, err = run_cli(capsys, "optimize", model_path, "-o", out_path, "--check", "3", "--report", report)
    assert code == 0, err
    optimized = onnx.load(str(out_path))
    onnx.checker.check_model(optimized)
    nodes_before = len(onnx.load(str(model_path)).graph.node)
    assert len(optimized.graph.node) < nodes_before
    assert "Conv" in out and "total nodes" in out and "size (KiB)" in out
    total = next(line for line in out.splitlines() if line.startswith("total nodes")).split()
    assert total[-2:] == [str(nodes_before), str(len(optimized.graph.node))]
    assert "check: 3 random inputs" in out
    records = json.loads(report.read_text())
    assert {"fold_constants", "dce"} <= {r["name"] for r in records}


@pytest.mark.parametrize("target, opset, op", [("onnxruntime", None, "FusedConv"), ("onnx", 23, "Conv"),
                                               ("onnxruntime-cpu", None, "ReorderOutput")])
def test_target_and_opset_choose_what_is_written(model_path, tmp_path, capsys, target, opset, op):
    from graphopt.passes.onnxruntime_nchwc import nchwc_block_size
    from graphopt.passes.targets import TARGET_PIPELINES

    if target == "onnxruntime-cpu" and nchwc_block_size() is None:
        pytest.skip("this onnxruntime has no NCHWc kernels")
    out_path, report = tmp_path / "opt.onnx", tmp_path / "report.json"
    extra = ["--opset", str(opset)] if opset else []
    code, out, err = run_cli(capsys, "optimize", model_path, "-o", out_path, "--target", target, *extra, "--check", "2",
                             "--report", report)
    assert code == 0, err
    target_records = [r for r in json.loads(report.read_text()) if r["name"] in TARGET_PIPELINES[target]]
    assert [r["name"] for r in target_records] == TARGET_PIPELINES[target], "the report shows the target's passes"
    assert any(r["modified"] for r in target_records) == (target != "onnx")
    written = onnx.load(str(out_path))
    assert op in {n.op_type for n in written.graph.node}
    loaded = {o.domain: o.version for o in onnx.load(str(model_path)).opset_import}[""]
    assert {o.domain: o.version for o in written.opset_import}[""] == (opset or loaded)
    assert ("com.microsoft" in {n.domain for n in written.graph.node}) == (target == "onnxruntime")
    assert ("com.microsoft.nchwc" in {n.domain for n in written.graph.node}) == (target == "onnxruntime-cpu")


def test_bench_prints_both_latencies(model_path, tmp_path, capsys):
    code, out, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "opt.onnx", "--bench", "--repeat", "3")
    assert code == 0, err
    assert "median ms" in out
    assert any(line.startswith("before") for line in out.splitlines())
    assert any(line.startswith("after") for line in out.splitlines())


def test_failed_check_exits_3_and_keeps_the_existing_output(model_path, tmp_path, capsys, monkeypatch):
    import graphopt.api

    real_optimize = graphopt.api.optimize

    def optimize_wrongly(graph, **kwargs):  # an optimizer bug: doubles every weight
        graph = real_optimize(graph, **kwargs)
        for value in graph.constants.values():
            value.data = value.data * 2
        return graph

    monkeypatch.setattr(graphopt.api, "optimize", optimize_wrongly)
    out_path = tmp_path / "opt.onnx"
    out_path.write_bytes(b"previous result")
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", out_path, "--check", "1")
    assert code == 3
    assert err.startswith("graphopt: check failed: check: 1 random inputs") and "not written" in err
    assert out_path.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt.onnx"]


def bad_input_cases(model_path: Path, tmp_path: Path) -> dict[str, tuple[list[str], Path]]:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model \x00\xff")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    random_like = tmp_path / "random_like.onnx"
    io = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in "xy"]
    noise = onnx.helper.make_node("RandomNormalLike", ["x"], ["n"])
    add = onnx.helper.make_node("Add", ["x", "n"], ["y"])
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([noise, add], "g", io[:1], io[1:]),
                                     opset_imports=[onnx.helper.make_opsetid("", 17)]), str(random_like))
    out = tmp_path / "out.onnx"
    same_as_input = model_path.parent / ".." / model_path.parent.name / model_path.name
    return {
        "missing input": (["optimize", str(tmp_path / "nope.onnx"), "-o", str(out)], out),
        "corrupt input": (["optimize", str(corrupt), "-o", str(out)], out),
        "empty input": (["optimize", str(empty), "-o", str(out)], out),
        "unknown pass": (["optimize", str(model_path), "-o", str(out), "--passes", "dce,no_such_pass"], out),
        "unknown level": (["optimize", str(model_path), "-o", str(out), "--level", "O9"], out),
        "output is input": (["optimize", str(model_path), "-o", str(same_as_input)], out),
        "missing output dir": (["optimize", str(model_path), "-o", str(tmp_path / "no_dir" / "out.onnx")],
                               tmp_path / "no_dir"),
        "inspect missing": (["inspect", str(tmp_path / "nope.onnx")], out),
        "opset too old": (["optimize", str(model_path), "-o", str(out), "--opset", "9"], out),
        "opset kept ops cannot move": (["optimize", str(random_like), "-o", str(out), "--opset", "23"], out),
    }


@pytest.mark.parametrize("case", ["missing input", "corrupt input", "empty input", "unknown pass",
                                  "unknown level", "output is input", "missing output dir", "inspect missing",
                                  "opset too old", "opset kept ops cannot move"])
def test_bad_input_is_one_error_line_and_exit_2(case, model_path, tmp_path, capsys):
    model_before = model_path.read_bytes()
    argv, must_not_exist = bad_input_cases(model_path, tmp_path)[case]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), err
    assert "Traceback" not in err + out
    assert not must_not_exist.exists()
    assert model_path.read_bytes() == model_before


def test_bad_input_keeps_an_existing_output(model_path, tmp_path, capsys):
    out_path = tmp_path / "opt.onnx"
    out_path.write_bytes(b"previous result")
    code, _, _ = run_cli(capsys, "optimize", model_path, "-o", out_path, "--passes", "no_such_pass")
    assert code == 2
    assert out_path.read_bytes() == b"previous result"
    assert list(tmp_path.iterdir()) == [out_path]  # no temporary file left behind


def test_console_script_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(tmp_path / "nope.onnx"),
                             "-o", str(tmp_path / "out.onnx")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("graphopt: error: input file")
    assert "Traceback" not in result.stderr


def test_passes_lists_the_cleanup_passes_and_pipelines(capsys):
    code, out, _ = run_cli(capsys, "passes")
    assert code == 0
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if line and not line.startswith(" ")
            and len(line.split()) > 1 and line.split()[1] in ("exact", "lossy")}
    assert {"dce", "cse", "fold_constants", "eliminate_noops"} <= rows.keys()
    assert rows["dce"] == "exact"
    assert any(line.strip().startswith("O1: ") and "dce" in line for line in out.splitlines())


def test_inspect_summarizes_the_model_and_its_ir(model_path, capsys):
    code, out, err = run_cli(capsys, "inspect", model_path)
    assert code == 0, err
    assert "x: float32[1, 3, 8, 8]" in out
    assert "logits: float32[1, 4]" in out
    assert "Conv" in out and "BatchNormalization" in out
    assert "IR after load:" in out and "opaque" in out
    assert "parameters: " in out


def test_readme_pass_table_matches_the_registry():
    from graphopt.pass_manager import PASSES, pipeline

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Passes", 1)[1].split("\n## ", 1)[0]
    documented = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    assert documented == set(PASSES)
    assert f"`O1` runs `{', '.join(pipeline('O1'))}`" in section


def test_demo_command_runs_the_demo(monkeypatch, capsys):
    import graphopt.demo

    calls = []
    monkeypatch.setattr(graphopt.demo, "run_demo", lambda quick: calls.append(quick) or "demo table")
    code, out, _ = run_cli(capsys, "demo", "--quick")
    assert code == 0
    assert calls == [True]
    assert out.strip() == "demo table"


@pytest.fixture(scope="module")
def resnet_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-18-like model (one basic block per stage) exported by the TorchScript exporter."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet.onnx"
    torch.onnx.export(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval(), (torch.randn(1, 3, 32, 32),),
                      str(path), dynamo=False, input_names=["x"], output_names=["logits"])
    return path


def test_prune_writes_a_smaller_model_that_runs(resnet_path, tmp_path, capsys):
    import onnxruntime

    out_path, plan_path = tmp_path / "pruned.onnx", tmp_path / "plan.json"
    code, out, err = run_cli(capsys, "prune", resnet_path, "-o", out_path, "--ratio", "0.5", "--round-to", "8",
                             "--importance", "l1", "--plan-out", plan_path, "--check", "2")
    assert code == 0, err
    for row in ("groups pruned", "channels removed", "parameters", "MACs", "nodes", "size (KiB)"):
        assert row in out
    assert "check: 2 random inputs, output shapes kept" in out
    params = next(line for line in out.splitlines() if line.startswith("parameters")).split()[1:]
    before, after = (int(p.replace(",", "")) for p in params)
    assert after < 0.8 * before  # the last stage feeds a Gemm, which stays whole
    assert out_path.stat().st_size < resnet_path.stat().st_size
    pruned = onnx.load(str(out_path))
    onnx.checker.check_model(pruned)
    session = onnxruntime.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: torch.randn(1, 3, 32, 32).numpy()})
    assert logits.shape == (1, 10)
    assert json.loads(plan_path.read_text())["groups"]

    again = tmp_path / "again.onnx"
    code, _, err = run_cli(capsys, "prune", resnet_path, "-o", again, "--plan", plan_path)
    assert code == 0, err
    assert again.read_bytes() == out_path.read_bytes()


def test_prune_ignore_keeps_the_layer(resnet_path, tmp_path, capsys):
    out_path = tmp_path / "pruned.onnx"
    first_conv = next(n for n in onnx.load(str(resnet_path)).graph.node if n.op_type == "Conv")
    code, _, err = run_cli(capsys, "prune", resnet_path, "-o", out_path, "--ignore", first_conv.input[1])
    assert code == 0, err
    weights = {t.name: list(t.dims) for t in onnx.load(str(out_path)).graph.initializer}
    assert any(dims[:1] == [64] and len(dims) == 4 and dims[1] == 3 for dims in weights.values())


@pytest.mark.parametrize("extra, message", [
    (["--ratio", "1.5"], "argument --ratio: must be a finite number in [0, 1), got '1.5'"),
    (["--importance", "taylor"], "unknown --importance"),
    (["--round-to", "0"], "argument --round-to: must be an integer >= 1"),
    (["--ignore", "no_such_layer"], "ignored layer"),
    (["--plan", "MISSING"], "does not exist"),
    (["--plan", "CORRUPT"], "not a pruning plan"),
    (["--plan", "CORRUPT", "--ratio", "0.3"], "leave out --ratio"),
    (["--ranking", "best"], "ranking must be"),
])
def test_prune_bad_input_is_one_error_line_and_exit_2(resnet_path, tmp_path, capsys, extra, message):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"groups": 3}')
    replace = {"MISSING": str(tmp_path / "nope.json"), "CORRUPT": str(corrupt)}
    out_path = tmp_path / "out.onnx"
    code, out, err = run_cli(capsys, "prune", resnet_path, "-o", out_path, *[replace.get(a, a) for a in extra])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: ") and message in lines[0], err
    assert "Traceback" not in err + out
    assert not out_path.exists()


# ------------------------------------------------------------------- explain
def test_explain_prints_each_region_and_writes_json(model_path, tmp_path, capsys):
    out_json = tmp_path / "explain.json"
    code, out, err = run_cli(capsys, "explain", model_path, "--backends", "onnxruntime,torch", "--json", out_json)
    assert code == 0, err
    assert "region 0" in out and "chosen:" in out and "onnxruntime" in out
    decisions = json.loads(out_json.read_text())
    assert decisions[0]["chosen"] in ("onnxruntime", "torch")
    assert {c["backend"] for c in decisions[0]["candidates"]} == {"onnxruntime", "torch"}


@pytest.mark.parametrize("argv, message", [
    (["--backends", "nope"], "unknown backend"),
    (["--dim", "batch"], "--dim takes NAME=N"),
    (["--dim", "nothere=2"], "--dim names no symbolic input dimension"),
    (["--expected-calls", "0"], "argument --expected-calls: must be an integer >= 1, got '0'"),
])
def test_explain_bad_options_are_one_line_errors(model_path, capsys, argv, message):
    code, out, err = run_cli(capsys, "explain", model_path, *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["--level", "O3"], ["--passes", "lower_regions"]])
def test_optimize_refuses_lowering_into_an_onnx_file(model_path, tmp_path, capsys, argv):
    out_path = tmp_path / "never.onnx"
    code, out, err = run_cli(capsys, "optimize", model_path, "-o", out_path, *argv)
    assert code == 2 and "graphopt explain" in err and len(err.strip().splitlines()) == 1
    assert not out_path.exists()
