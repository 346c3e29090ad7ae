"""The bad-input contract of the ``graphopt`` command and the Python API.

Command: a user mistake is one ``graphopt: error: ...`` line on stderr and exit 2, with no
traceback, nothing written (no hidden temporary file either) and the input untouched; a
``--check`` that cannot be done is one ``graphopt: warning:`` line; onnxruntime's own log
lines appear only at ``--verbose``. API: graphopt's own errors, ``ValueError`` subclasses
from ``graphopt.errors`` that name the problem and the fix.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import graphopt
from graphopt.cli import main
from graphopt.errors import GraphoptError, InvalidOptionError, UnsupportedModelError

ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


# --------------------------------------------------------------------- helpers
def run_cli(capfd: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """Run the command in-process; ``capfd`` sees the real stderr, where onnxruntime's C++ logger writes."""
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def assert_user_error(code: int, out: str, err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert not any(line.startswith("wrote ") for line in out.splitlines())


def listing(directory: Path) -> list[str]:
    """Every entry, hidden ones included: a left-over temporary file shows up here."""
    return sorted(p.name for p in directory.iterdir())


def export(module: nn.Module, path: Path, shape: tuple[int, ...], **kwargs: object) -> Path:
    torch.manual_seed(0)
    torch.onnx.export(module.eval(), (torch.randn(*shape),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], opset_version=17, **kwargs)
    return path


def small_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real models: a small ResNet exported by torch (as a user's file), once with its weights also listed
    as graph inputs (``keep_initializers_as_inputs``, which makes onnxruntime warn), and small graphs
    of the element types and control flow onnxruntime or random inputs handle differently."""
    directory = tmp_path_factory.mktemp("models")
    export(small_resnet(), directory / "resnet.onnx", (1, 3, 32, 32))
    export(small_resnet(), directory / "resnet_inputs.onnx", (1, 3, 32, 32), keep_initializers_as_inputs=True)
    v = helper.make_tensor_value_info

    def save(name: str, nodes: list, inputs: list, outputs: list, domains: tuple = ()) -> None:
        opsets = [helper.make_opsetid("", 21), *(helper.make_opsetid(d, 1) for d in domains)]
        onnx.save(helper.make_model(helper.make_graph(nodes, name, inputs, outputs), opset_imports=opsets),
                  str(directory / f"{name}.onnx"))

    to_float = [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT), helper.make_node("Relu", ["c"], ["y"])]
    save("bfloat16_in", to_float, [v("x", TensorProto.BFLOAT16, [2, 3])], [v("y", TensorProto.FLOAT, [2, 3])])
    save("float8_in", to_float, [v("x", TensorProto.FLOAT8E4M3FN, [2, 3])], [v("y", TensorProto.FLOAT, [2, 3])])
    save("bfloat16_relu", [helper.make_node("Relu", ["x"], ["y"])], [v("x", TensorProto.BFLOAT16, [2, 3])],
         [v("y", TensorProto.BFLOAT16, [2, 3])])  # onnxruntime's CPU kernels have no bfloat16 Relu
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [v("t", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [v("e", TensorProto.FLOAT, [2])])
    save("if_on_bool_scalar", [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
         [v("cond", TensorProto.BOOL, []), v("x", TensorProto.FLOAT, [2])], [v("y", TensorProto.FLOAT, [2])])
    save("custom_domain", [helper.make_node("MyOp", ["x"], ["y"], domain="com.example")],
         [v("x", TensorProto.FLOAT, [2])], [v("y", TensorProto.FLOAT, [2])], domains=("com.example",))
    save("sequence_in", [helper.make_node("SequenceAt", ["s", "i"], ["y"])],
         [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2]), v("i", TensorProto.INT64, [])],
         [v("y", TensorProto.FLOAT, [2])])
    return directory


@pytest.fixture
def resnet(model_dir: Path) -> Path:
    return model_dir / "resnet.onnx"


# ---------------------------------------------------- --check that cannot be done
@pytest.mark.parametrize("model, reason", [
    ("simple/test_gradient_of_add/model.onnx", "onnxruntime cannot load the original model"),  # preview-domain op
    ("pytorch-operator/test_operator_add_broadcast/model.onnx", "onnxruntime cannot load the original model"),
    ("simple/test_expand_shape_model1/model.onnx", "onnxruntime cannot run the original model on random inputs"),
    ("custom_domain", "com.example:MyOp"),
    ("bfloat16_relu", "onnxruntime cannot load the original model"),
    ("sequence_in", "input 's' is a sequence, and random inputs are made for tensors only"),
])
@pytest.mark.parametrize("flag", [["--check", "2"], ["--bench", "--repeat", "2"]])
def test_a_check_that_cannot_be_done_is_one_warning_and_the_model_is_still_written(
        model_dir, tmp_path, capfd, model, reason, flag):
    src = ONNX_DATA / model if "/" in model else model_dir / f"{model}.onnx"
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(capfd, "optimize", src, "-o", out, *flag)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("graphopt: warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"graphopt: warning: {flag[0]} skipped: ")
    assert reason in warnings[0]
    assert all(line.startswith("graphopt: ") for line in err.splitlines()), err  # nothing from onnxruntime
    assert "Traceback" not in err and f"wrote {out}" in stdout
    onnx.load(str(out))


@pytest.mark.parametrize("model", ["bfloat16_in", "float8_in", "if_on_bool_scalar",
                                   "simple/test_strnorm_model_nostopwords_nochangecase/model.onnx"])  # strings
def test_check_makes_random_inputs_for_bfloat16_float8_strings_and_bool_scalars(model_dir, tmp_path, capfd, model):
    src = ONNX_DATA / model if "/" in model else model_dir / f"{model}.onnx"
    code, out, err = run_cli(capfd, "optimize", src, "-o", tmp_path / "out.onnx", "--check", "3")
    assert code == 0, err
    assert "check: 3 random inputs, largest difference 0 abs" in out
    assert "warning" not in err


def test_an_optimized_model_onnxruntime_cannot_load_fails_the_check_and_nothing_is_written(
        resnet, tmp_path, capfd, monkeypatch):
    from graphopt.ir import Graph

    real_to_onnx = Graph.to_onnx

    def broken_to_onnx(self, **kwargs):  # an emitter bug: a node onnxruntime has no kernel for
        model = real_to_onnx(self, **kwargs)
        model.graph.node.append(helper.make_node("NoSuchOp", [model.graph.output[0].name], ["unused"],
                                                 domain="com.example"))
        model.opset_import.append(helper.make_opsetid("com.example", 1))
        return model

    monkeypatch.setattr(Graph, "to_onnx", broken_to_onnx)
    for flag in (["--check", "1"], ["--bench", "--repeat", "1"]):
        code, out, err = run_cli(capfd, "optimize", resnet, "-o", tmp_path / "out.onnx", *flag)
        assert code == 3
        assert err.startswith("graphopt: check failed: onnxruntime cannot load the optimized model") and \
            len(err.strip().splitlines()) == 1, err
        assert listing(tmp_path) == []


# ------------------------------------------------------------ onnxruntime's log
@pytest.mark.parametrize("extra", [["--check", "1"], ["--target", "onnxruntime-cpu", "--check", "1"]])
def test_onnxruntime_warnings_show_only_at_verbose(model_dir, tmp_path, capfd, extra):
    src = model_dir / "resnet_inputs.onnx"  # weights listed as inputs too: onnxruntime warns about each
    code, out, err = run_cli(capfd, "optimize", src, "-o", tmp_path / "out.onnx", *extra)
    assert code == 0, err
    assert err == ""
    code, out, err = run_cli(capfd, "optimize", src, "-o", tmp_path / "out.onnx", "--verbose", *extra)
    assert code == 0, err
    assert "appears in graph inputs and will not be treated as constant" in err


# ----------------------------------------------------------- output locations
def output_cases(tmp: Path, src: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "a_dir.onnx").mkdir()
    (tmp / "link.onnx").symlink_to(src)
    os.link(src, tmp / "hard_link.onnx")
    out = str(tmp / "out.onnx")
    return {
        "-o under /proc": (["-o", "/proc/graphopt-test.onnx"], "-o: cannot write in directory /proc"),
        "-o under /sys": (["-o", "/sys/graphopt-test.onnx"], "-o: cannot write in directory /sys"),
        "-o is a directory": (["-o", str(tmp / "a_dir.onnx")], "is a directory"),
        "-o is a device": (["-o", "/dev/null"], "exists and is not a regular file"),
        "-o links to the input": (["-o", str(tmp / "link.onnx")], "is the input file"),
        "-o is a hard link to the input": (["-o", str(tmp / "hard_link.onnx")], "is the input file"),
        "-o in a missing directory": (["-o", str(tmp / "nope" / "out.onnx")], "does not exist; create it first"),
        "--report unwritable": (["-o", out, "--report", "/proc/report.json"], "--report: cannot write in directory"),
        "--report is -o": (["-o", out, "--report", out], "--report and -o name the same file"),
        "--report is a directory": (["-o", out, "--report", str(tmp)], "is a directory"),
    }


CASES = ["-o under /proc", "-o under /sys", "-o is a directory", "-o is a device", "-o links to the input",
         "-o is a hard link to the input", "-o in a missing directory", "--report unwritable", "--report is -o", "--report is a directory"]


@pytest.mark.parametrize("case", CASES)
def test_an_output_location_that_cannot_be_written_is_refused_before_any_work(resnet, tmp_path, capfd, case):
    before = resnet.read_bytes()
    argv, message = output_cases(tmp_path, resnet)[case]
    entries = listing(tmp_path)
    code, out, err = run_cli(capfd, "optimize", resnet, *argv, "--check", "1")
    assert_user_error(code, out, err, message)
    assert out == ""  # refused up front: not even the op table
    assert listing(tmp_path) == entries
    assert resnet.read_bytes() == before
    assert Path("/dev/null").is_char_device()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_a_directory_without_write_permission_is_refused(resnet, tmp_path, capfd):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, out, err = run_cli(capfd, "optimize", resnet, "-o", locked / "out.onnx")
    assert_user_error(code, out, err, f"-o: cannot write in directory {locked} (Permission denied)")
    assert listing(locked) == []


@pytest.mark.parametrize("command, argv, message", [
    ("prune", ["--plan-out", "/proc/plan.json"], "--plan-out: cannot write in directory /proc"),
    ("prune", ["--plan-out", "OUT"], "--plan-out and -o name the same file"),
    ("explain", ["--json", "/proc/x.json"], "--json: cannot write in directory /proc"),
    ("explain", ["--json", "SRC"], "--json SRC is the input file"),
])
def test_prune_and_explain_outputs_are_checked_up_front(resnet, tmp_path, capfd, command, argv, message):
    out = tmp_path / "out.onnx"
    argv = [{"OUT": str(out), "SRC": str(resnet)}.get(a, a) for a in argv]
    message = message.replace("SRC", str(resnet))
    code, stdout, err = run_cli(capfd, command, resnet, *(["-o", out] if command == "prune" else []), *argv)
    assert_user_error(code, stdout, err, message)
    assert listing(tmp_path) == []


def test_a_write_that_fails_midway_writes_nothing(resnet, tmp_path, capfd, monkeypatch):
    import errno

    import graphopt.cli

    def disk_full(model, path):
        path.write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(graphopt.cli, "save_model", disk_full)
    (tmp_path / "out.onnx").write_bytes(b"previous result")
    code, out, err = run_cli(capfd, "optimize", resnet, "-o", tmp_path / "out.onnx",
                             "--report", tmp_path / "report.json")
    assert_user_error(code, out, err, "-o: cannot write")
    assert "No space left on device" in err
    assert listing(tmp_path) == ["out.onnx"] and (tmp_path / "out.onnx").read_bytes() == b"previous result"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(resnet, tmp_path, capfd, umask):
    old = os.umask(umask)
    try:
        code, _, err = run_cli(capfd, "optimize", resnet, "-o", tmp_path / "out.onnx",
                               "--report", tmp_path / "report.json")
    finally:
        os.umask(old)
    assert code == 0, err
    assert listing(tmp_path) == ["out.onnx", "report.json"]
    for name in ("out.onnx", "report.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


SLOW_WRITE = textwrap.dedent("""
    import sys, time
    import graphopt.cli as cli

    def slow_save(model, path):
        path.write_bytes(model.SerializeToString()[:100])
        print("WRITING", flush=True)
        time.sleep(120)

    cli.save_model = slow_save
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_write_leaves_nothing_behind(resnet, tmp_path, sig):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, "optimize", str(resnet), "-o",
                             str(out_dir / "out.onnx"), "--report", str(out_dir / "report.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "WRITING":
                break
        assert any(name.startswith(".out.onnx.") for name in listing(out_dir))  # mid-write: the temporary
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig
    assert "Traceback" not in err
    assert listing(out_dir) == []


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize("argv, message", [
    (["--tol", "nan"], "argument --tol: must be a finite number >= 0, got 'nan'"),
    (["--tol", "inf"], "argument --tol: must be a finite number >= 0, got 'inf'"),
    (["--tol", "-1"], "argument --tol: must be a finite number >= 0, got '-1'"),
    (["--tol", "small"], "argument --tol: must be a finite number >= 0, got 'small'"),
    (["--check", "-1"], "argument --check: must be an integer >= 0, got '-1'"),
    (["--check", "2.5"], "argument --check: must be an integer >= 0, got '2.5'"),
    (["--repeat", "0"], "argument --repeat: must be an integer >= 1, got '0'"),
    (["--opset", "99"], "argument --opset: must be an integer from 13 to"),
    (["--opset", "12"], "argument --opset: must be an integer from 13 to"),
    (["--target", "gpu"], "argument --target: invalid choice: 'gpu'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_a_bad_optimize_option_is_one_error_line(resnet, tmp_path, capfd, argv, message):
    code, out, err = run_cli(capfd, "optimize", resnet, "-o", tmp_path / "out.onnx", *argv)
    assert_user_error(code, out, err, message)
    assert "--help`)" in err  # where to read the options
    assert listing(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["prune", "IN", "-o", "OUT", "--ratio", "1"], "argument --ratio: must be a finite number in [0, 1), got '1'"),
    (["prune", "IN", "-o", "OUT", "--ratio", "nan"], "argument --ratio: must be a finite number in [0, 1)"),
    (["prune", "IN", "-o", "OUT", "--ratio", "-0.1"], "argument --ratio: must be a finite number in [0, 1)"),
    (["prune", "IN", "-o", "OUT", "--check", "-2"], "argument --check: must be an integer >= 0"),
    (["explain", "IN", "--expected-calls", "0"], "argument --expected-calls: must be an integer >= 1"),
    (["optimize", "IN"], "the following arguments are required: -o/--output"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_bad_options_of_every_command_are_one_error_line(resnet, tmp_path, capfd, argv, message):
    argv = [{"IN": str(resnet), "OUT": str(tmp_path / "out.onnx")}.get(a, a) for a in argv]
    code, out, err = run_cli(capfd, *argv)
    assert_user_error(code, out, err, message)
    assert listing(tmp_path) == []


# -------------------------------------------------------------------- Python API
@pytest.fixture(scope="module")
def resnet_graph() -> graphopt.Graph:
    torch.manual_seed(0)
    return graphopt.capture(small_resnet().eval(), (torch.randn(1, 3, 32, 32),))


@pytest.mark.parametrize("kwargs, message", [
    ({"level": "O9"}, "unknown level 'O9'; known levels: O0, O1, O2, O3"),
    ({"level": 2}, "unknown level 2"),
    ({"passes": ["no_such_pass"]}, "unknown pass 'no_such_pass'; known passes:"),
    ({"passes": "dce"}, "passes must be a list of pass names or Pass instances"),
    ({"options": {"cse": {"max_size": 1}}}, "pass cse has no option max_size; its options: max_bytes"),
    ({"options": {"fold_bias": {}}}, "options given for passes not in the pipeline: fold_bias"),
    ({"options": [("cse", {})]}, "options must map pass names to {option: value} dicts"),
    ({"options": {"cse": 4}}, "options must map pass names to {option: value} dicts"),
])
def test_optimize_bad_arguments_raise_invalid_option_error(resnet_graph, kwargs, message):
    with pytest.raises(InvalidOptionError) as info:
        graphopt.optimize(resnet_graph.clone(), **kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("not_a_graph, hint", [
    (small_resnet(), "capture it first, graphopt.capture(model, example_inputs)"),
    ("resnet.onnx", "graphopt.load_onnx(path)"),
])
def test_optimize_names_the_step_that_makes_a_graph(not_a_graph, hint):
    with pytest.raises(InvalidOptionError, match="optimize takes a graphopt Graph") as info:
        graphopt.optimize(not_a_graph)
    assert hint in str(info.value)


class DataDependentBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if x.sum() > 0 else -x


class NonzeroCount(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(int((x > 0).sum()))


class DistinctMaskLengths(nn.Module):
    """Lumina2's pattern: lengths read from a mask, then put in a Python set (torch.export raises TypeError)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = [n + 4 for n in (x.reshape(2, -1) > 0).sum(dim=1).tolist()]
        return x * max(lengths) * len(set(lengths))


@pytest.mark.parametrize("model", [DataDependentBranch(), NonzeroCount(), DistinctMaskLengths()])
def test_capture_of_data_dependent_control_flow_says_to_use_torch_compile(model):
    with pytest.raises(UnsupportedModelError) as info:
        graphopt.capture(model, (torch.randn(8),))
    message = str(info.value)
    assert "torch.export cannot capture data-dependent control flow" in message
    assert 'torch.compile(model, backend="graphopt")' in message and "torch.cond" in message


@pytest.mark.parametrize("inputs, message", [
    (lambda: (torch.randn(1, 4, 32, 32),), "ResNet fails on the example inputs (RuntimeError: "),
    (lambda: (torch.randn(1, 3, 32, 32), torch.randn(1)), "ResNet fails on the example inputs (TypeError: "),
    (lambda: (), "ResNet fails on the example inputs (TypeError: "),
    (lambda: ("image.png",), "ResNet fails on the example inputs (TypeError: "),
    (lambda: torch.randn(1, 3, 32, 32), "example_inputs is a sequence of the forward's arguments, got Tensor"),
])
def test_capture_with_wrong_example_inputs_names_them(inputs, message):
    model = small_resnet().train()  # batch norm in training mode: a failed check must not move its statistics
    stats = [b.clone() for b in model.buffers()]
    with pytest.raises(InvalidOptionError) as info:
        graphopt.capture(model, inputs())
    assert message in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))


@pytest.mark.parametrize("dynamic, message", [
    ({"image": {0: "batch"}}, "dynamic names 'image', which is not a parameter of ResNet.forward (x)"),
    ({3: {0: "batch"}}, "dynamic key 3 is not an input"),
    ({0: {7: "batch"}}, "dynamic[0] names dims [7], but that input has rank 4"),
    ({0: ["batch"]}, "dynamic[0] maps dims to symbol names"),
])
def test_capture_with_a_bad_dynamic_spec_names_it(dynamic, message):
    with pytest.raises(InvalidOptionError) as info:
        graphopt.capture(small_resnet().eval(), (torch.randn(1, 3, 32, 32),), dynamic=dynamic)
    assert message in str(info.value)


def test_capture_keeps_real_failures_as_they_are(monkeypatch):
    """A failure of torch.export on a model that runs eagerly is not the user's: it is not dressed up as one."""
    def broken_export(*args, **kwargs):
        raise RuntimeError("torch.export internal failure")

    monkeypatch.setattr(torch.export, "export", broken_export)
    with pytest.raises(RuntimeError, match="torch.export internal failure") as info:
        graphopt.capture(small_resnet().eval(), (torch.randn(1, 3, 32, 32),))
    assert not isinstance(info.value, GraphoptError)


def test_capture_refuses_what_is_not_a_module():
    with pytest.raises(InvalidOptionError, match="capture takes an nn.Module, got function"):
        graphopt.capture(lambda x: x.relu(), (torch.randn(2),))


@pytest.mark.parametrize("options, message", [
    ({"levle": "O2"}, "unknown graphopt option 'levle'"),
    ({"level": "O9"}, "unknown level 'O9'"),
    ([("level", "O2")], "graphopt's options are a dict"),
])
def test_check_options_validates_torch_compile_options_at_once(options, message):
    with pytest.raises(InvalidOptionError, match=message):
        graphopt.check_options(options)


def test_torch_compile_raises_graphopt_error_unwrapped_at_the_first_call():
    compiled = torch.compile(nn.Linear(4, 4), backend="graphopt", options={"levle": "O2"})
    with pytest.raises(ValueError, match="unknown graphopt option 'levle'") as info:
        compiled(torch.randn(2, 4))
    assert isinstance(info.value, InvalidOptionError)
    assert type(info.value).__name__ == "InvalidOptionError"
    torch.compiler.reset()
