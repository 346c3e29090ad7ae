"""Pass instruments from the shells: torch.compile options and the CLI's --dump-after, --dump-dir, --time-passes."""
from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from graphopt.cli import main
from graphopt.compile_backend import graphopt_backend


def compile_o1(model: nn.Module, **options) -> nn.Module:
    return torch.compile(model, backend="graphopt", options={"fallback": False, "level": "O1", **options})


def test_torch_compile_dumps_each_graph_after_the_named_pass_into_its_own_folder(tmp_path):
    x = torch.randn(2, 4)
    with torch.no_grad():
        compile_o1(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), dump_after=["dce"], dump_dir=str(tmp_path))(x)
    (folder,) = tmp_path.iterdir()
    assert re.fullmatch(r"graph\d+\.inference", folder.name)  # one folder per compiled graph
    dumps = sorted(folder.iterdir())
    assert dumps and all(f.name.endswith("-dce.txt") for f in dumps)
    assert dumps[-1].read_text().startswith("graph ")


def test_torch_compile_prints_dumps_and_pass_times_to_stderr(capfd):
    x = torch.randn(2, 4)
    with torch.no_grad():
        compile_o1(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), dump_after=["cse"], time_passes=True)(x)
    err = capfd.readouterr().err
    assert "inference after cse (step " in err and "\ngraph " in err
    assert "inference\npass" in err and "\ncse " in err and "\ntotal " in err


@pytest.mark.parametrize("options, message", [
    ({"dump_after": "dce"}, "graphopt option 'dump_after' must be a list of pass names, got 'dce'"),
    ({"dump_after": ["fuse_linear"]}, "dump_after names fuse_linear, which this pipeline does not run"),
    ({"time_passes": "yes"}, "graphopt option 'time_passes' must be a bool"),
    ({"dump_dir": 3}, "graphopt option 'dump_dir' must be a path"),
])
def test_bad_instrument_options_are_refused_at_once(options, message):
    with pytest.raises(ValueError, match=message):
        graphopt_backend(torch.fx.symbolic_trace(nn.Linear(4, 4)), [torch.randn(2, 4)],
                         options={"level": "O1", **options})


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``relu(x + (one + one))``: a constant add for fold_constants."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [4], [1.0] * 4)
    graph = helper.make_graph(
        [helper.make_node("Add", ["one", "one"], ["two"]), helper.make_node("Add", ["x", "two"], ["y"]),
         helper.make_node("Relu", ["y"], ["out"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])], [one])
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def optimize(capsys, model_path: Path, tmp_path: Path, *flags: str | Path) -> tuple[int, str, str]:
    code = main(["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), "--level", "O1", *map(str, flags)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_dump_after_prints_the_graph_after_each_named_pass(model_path, tmp_path, capsys):
    code, out, err = optimize(capsys, model_path, tmp_path, "--dump-after", "fold_constants", "--dump-after", "dce")
    assert code == 0, err
    assert err.count("// graph after fold_constants") == 2 and err.count("// graph after dce") == 2
    assert "graph " not in out  # stdout keeps the op table alone


def test_cli_dump_dir_takes_the_dumps_and_time_passes_prints_a_table(model_path, tmp_path, capsys):
    dumps = tmp_path / "dumps"
    code, out, err = optimize(capsys, model_path, tmp_path, "--dump-after", "dce", "--dump-dir", dumps,
                              "--time-passes")
    assert code == 0, err
    assert [f.name.split("-", 1)[1] for f in sorted(dumps.iterdir())] == ["dce.txt", "dce.txt"]
    assert "// pass times for graph" in err and "fold_constants" in err and "// graph after" not in err


@pytest.mark.parametrize("flags, message", [
    (["--dump-after", "fuse_linear"], "dump_after names fuse_linear, which this pipeline does not run; it runs: "),
    (["--dump-after", "dce", "--dump-dir", "{model}"], "--dump-dir: cannot create directory"),
])
def test_cli_bad_instrument_flags_are_one_error_line(model_path, tmp_path, capsys, flags, message):
    flags = [f.format(model=model_path) for f in flags]
    code, out, err = optimize(capsys, model_path, tmp_path, *flags)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"graphopt: error: {message}"), err
    assert not (tmp_path / "out.onnx").exists()
