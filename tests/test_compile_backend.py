"""``torch.compile(backend="graphopt")``: outputs and gradients equal eager, options, fallback, entry point."""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphopt.backends.lower import LowerRegions
from graphopt.compile_backend import graphopt_backend

VALID_OPTIONS = "level, passes, pass_options, verify, fallback, report"


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv1(x)))
        y = F.relu(self.conv2(y))
        return self.head(y.mean(dim=(2, 3)))


class TransformerBlock(nn.Module):
    """Pre-norm attention and MLP with residuals."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


def conv_case() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return SmallConvNet(), torch.randn(2, 3, 16, 16)


def transformer_case() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TransformerBlock(), torch.randn(2, 8, 32)


CASES = {"conv": conv_case, "transformer": transformer_case}


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def compile_graphopt(model: nn.Module, **options) -> nn.Module:
    """Compile with graphopt at O2 (the rewrites; the default O3 lowers on top and has tests of its own below);
    a graph graphopt fails on raises (``fallback=False``) unless asked otherwise."""
    return torch.compile(model, backend="graphopt", options={"fallback": False, "level": "O2", **options})


QUICK_LOWERING = {"lower_regions": {"backends": ["onnxruntime", "torch"], "repeats": 2}}
"""The default level with only the candidates that compile in about a second, to keep these tests fast."""


def compile_default(model: nn.Module, **options) -> nn.Module:
    """Compile with graphopt's default level (O3), lowering to onnxruntime or torch."""
    return torch.compile(model, backend="graphopt", options={"fallback": False, "pass_options": QUICK_LOWERING,
                                                             **options})


@pytest.mark.parametrize("case", CASES)
def test_inference_matches_eager(case):
    model, x = CASES[case]()
    model.eval()
    with torch.no_grad():
        expected = model(x)
        got = compile_graphopt(model)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_training_step_gradients_match_eager(case):
    model, x = CASES[case]()
    model.train()
    reference = copy.deepcopy(model)
    expected_loss = reference(x).square().mean()
    expected_loss.backward()

    loss = compile_graphopt(model)(x).square().mean()
    loss.backward()

    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")
    for (name, b), (_, b_ref) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"buffer {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_low_precision_inference_matches_eager_loosely(case, dtype):
    model, x = CASES[case]()
    model, x = model.eval().to(dtype), x.to(dtype)
    with torch.no_grad():
        expected = model(x)
        got = compile_graphopt(model)(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_report_lists_the_passes_run_on_forward_and_backward(tmp_path):
    report = tmp_path / "report.json"
    model, x = conv_case()
    compile_graphopt(model, report=str(report))(x).sum().backward()

    graphs = {g["graph"].split(".")[-1]: g for g in json.loads(report.read_text())["graphs"]}
    assert graphs.keys() == {"forward", "backward"}
    for entry in graphs.values():
        assert "fallback" not in entry
        assert {"fold_constants", "eliminate_noops", "cse", "dce"} <= {r["name"] for r in entry["passes"]}
        assert entry["nodes_after"] <= entry["nodes_before"]


def test_passes_rewrite_the_graph(tmp_path):
    """A constant subexpression and a duplicated one: O1 must fold and merge them."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        scale = torch.ones(4) * 2.0 + 1.0
        return torch.sin(x) * scale + torch.sin(x)

    report = tmp_path / "report.json"
    x = torch.randn(3, 4)
    got = compile_graphopt(fn, report=str(report))(x)
    torch.testing.assert_close(got, fn(x))
    (entry,) = json.loads(report.read_text())["graphs"]
    assert {"fold_constants", "cse"} <= set(entry["passes_fired"])
    assert entry["nodes_after"] < entry["nodes_before"]


def test_extra_passes_and_verify_are_accepted():
    model, x = transformer_case()
    model.eval()
    with torch.no_grad():
        got = compile_graphopt(model, level="O0", passes=["dce", "cse"], pass_options={"dce": {}}, verify=True)(x)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def traced_linear() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(nn.Linear(4, 4))


@pytest.mark.parametrize("options, message", [
    ({"bogus": 1}, f"unknown graphopt option 'bogus'; valid options: {VALID_OPTIONS}"),
    ({"level": "O9"}, "unknown level 'O9'"),
    ({"passes": ["no_such_pass"]}, "unknown pass 'no_such_pass'"),
    ({"passes": "dce"}, "must be a list of pass names"),
    ({"pass_options": {"dce": {"no_such_option": 1}}}, "has no option no_such_option"),
    ({"verify": "yes"}, "'verify' must be a bool"),
    ({"freeze": 1}, "'freeze' must be a bool"),
    ({"level": "O3", "pass_options": {"lower_regions": {"backends": ["nope"]}}}, "unknown backend nope"),
    ({"level": "O3", "pass_options": {"lower_regions": {"cost_model": "oracle"}}}, "unknown cost_model 'oracle'"),
])
def test_bad_options_raise_value_error(options, message):
    with pytest.raises(ValueError, match=message):
        graphopt_backend(traced_linear(), [torch.randn(2, 4)], options=options)


def test_unknown_option_surfaces_through_torch_compile():
    model = nn.Linear(4, 4)
    with pytest.raises(Exception, match=f"valid options: {VALID_OPTIONS}"):
        torch.compile(model, backend="graphopt", options={"bogus": 1})(torch.randn(2, 4))


def test_graphopt_failure_falls_back_to_the_unoptimized_graph(monkeypatch, caplog):
    import graphopt.frontends.torch

    def broken_from_fx(gm, example_inputs, constants=None):
        raise RuntimeError("injected front-end failure")

    monkeypatch.setattr(graphopt.frontends.torch, "from_fx", broken_from_fx)
    model, x = conv_case()
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="graphopt.compile_backend"):
        loss = compile_graphopt(model, fallback=True)(x).sum()
        loss.backward()
    expected = reference(x).sum()
    expected.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.conv1.weight.grad, reference.conv1.weight.grad, rtol=1e-5, atol=1e-5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("injected front-end failure" in w and "running it unoptimized" in w for w in warnings)


def test_failure_raises_when_fallback_is_off(monkeypatch):
    import graphopt.frontends.torch

    def broken_from_fx(gm, example_inputs, constants=None):
        raise RuntimeError("injected front-end failure")

    monkeypatch.setattr(graphopt.frontends.torch, "from_fx", broken_from_fx)
    with pytest.raises(Exception, match="injected front-end failure"):
        compile_graphopt(nn.Linear(4, 4), fallback=False)(torch.randn(2, 4))


def test_backend_name_resolves_through_the_entry_point_in_a_fresh_interpreter():
    code = ("import torch; m=torch.nn.Linear(4,4); "
            "print(torch.compile(m, backend='graphopt', options={'level': 'O2'})(torch.randn(2,4)).shape)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch.Size([2, 4])"
    assert "could not optimize" not in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES)
def test_cuda_training_step_matches_eager(case):
    model, x = CASES[case]()
    model, x = model.cuda().train(), x.cuda()
    reference = copy.deepcopy(model)
    expected = reference(x).square().mean()
    expected.backward()
    loss = compile_graphopt(model)(x).square().mean()
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("freeze", [True, False])
def test_inference_graphs_freeze_parameters_so_batch_norm_folds(freeze, tmp_path):
    model, x = conv_case()
    model.eval()
    report = tmp_path / "report.json"
    with torch.no_grad():
        expected = model(x)
        got = compile_graphopt(model, freeze=freeze, report=str(report))(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    entry, = json.loads(report.read_text())["graphs"]
    assert entry["graph"].endswith("inference")
    frozen = entry["frozen_inputs"]
    assert (frozen > 0) if freeze else (frozen == 0)
    assert ("fold_batch_norm" in entry["passes_fired"]) == freeze


@pytest.mark.parametrize("guards", ["all", "frozen_module_guards"])
def test_frozen_graph_is_not_reused_with_another_instances_weights(guards, tmp_path):
    """Dynamo hands a graph compiled for one instance the parameters of another instance of the class."""
    import graphopt

    models = [conv_case()[0].eval(), SmallConvNet().eval()]  # same class, other weights
    x = torch.randn(2, 3, 16, 16)
    report = tmp_path / "report.json"
    options = {"report": str(report)}
    if guards == "frozen_module_guards":
        options["guard_filter_fn"] = graphopt.frozen_module_guards
    compiled = [compile_graphopt(m, **options) for m in models]
    with torch.no_grad():
        for _ in range(2):
            for model, fn in zip(models, compiled):
                torch.testing.assert_close(fn(x), model(x), rtol=1e-5, atol=1e-5)
    entries = json.loads(report.read_text())["graphs"]
    assert len(entries) == 2 and all(e["frozen_inputs"] > 0 for e in entries)  # one variant per instance, reused


def test_training_graphs_keep_parameters_as_inputs(tmp_path):
    model, x = conv_case()
    report = tmp_path / "report.json"
    compile_graphopt(model, report=str(report))(x).sum().backward()
    entries = json.loads(report.read_text())["graphs"]
    assert {e["graph"].rsplit(".", 1)[1] for e in entries} == {"forward", "backward"}
    assert all(e["frozen_inputs"] == 0 for e in entries)


# ------------------------------------------------------------------ the default level: O3
@pytest.mark.parametrize("case", CASES)
def test_default_level_lowers_regions_and_reports_its_compile_time(case, tmp_path, caplog):
    model, x = CASES[case]()
    model.eval()
    report = tmp_path / "report.json"
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="graphopt.compile_backend"):
        expected = model(x)
        got = compile_default(model, report=str(report))(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    entry, = json.loads(report.read_text())["graphs"]
    assert "lower_regions" in {r["name"] for r in entry["passes"]}
    assert entry["lowering"] and {d["chosen"] for d in entry["lowering"]} <= {"onnxruntime", "torch", None}
    assert all(d["cost_model"] == "measured" and d["seconds"] > 0 for d in entry["lowering"])
    assert 0 < sum(d["seconds"] for d in entry["lowering"]) <= entry["compile_seconds"]
    lines = [r.getMessage() for r in caplog.records if "graphopt: compiled" in r.getMessage()]
    assert lines == [f"graphopt: compiled {entry['graph']} in {entry['compile_seconds']:.1f} s: "
                     + lines[0].split(" s: ", 1)[1]]
    assert re.search(r"\d+ regions? -> (onnxruntime|torch|eager) x\d", lines[0])


def test_o2_is_one_option_away_and_lowers_nothing(tmp_path):
    model, x = conv_case()
    model.eval()
    report = tmp_path / "report.json"
    with torch.no_grad():
        got = torch.compile(model, backend="graphopt", options={"level": "O2", "report": str(report)})(x)
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    entry, = json.loads(report.read_text())["graphs"]
    assert "lower_regions" not in {r["name"] for r in entry["passes"]} and entry["lowering"] == []
    assert "fold_batch_norm" in entry["passes_fired"]


def test_default_level_trains_with_lowered_forward_and_backward_graphs(tmp_path):
    model, x = conv_case()
    model.train()
    reference = copy.deepcopy(model)
    expected = reference(x).square().mean()
    expected.backward()
    report = tmp_path / "report.json"
    loss = compile_default(model, report=str(report))(x).square().mean()
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5)
    entries = json.loads(report.read_text())["graphs"]
    assert {e["graph"].rsplit(".", 1)[1] for e in entries} == {"forward", "backward"}
    assert all("lower_regions" in {r["name"] for r in e["passes"]} for e in entries)


@pytest.mark.slow
def test_default_options_on_a_real_model_stay_within_the_compile_budget_in_a_fresh_interpreter(tmp_path):
    """Every default candidate (inductor and TVM too), cold caches: the budget, not the backends, bounds
    the compile."""
    code = ("import json, sys, torch; from graphopt.models import get_case\n"
            "model, inputs = get_case('torchvision.resnet18').build()\n"
            "with torch.no_grad():\n"
            "    torch.compile(model, backend='graphopt', options={'report': sys.argv[1]})(*inputs)\n")
    report = tmp_path / "report.json"
    env = {**os.environ, "GRAPHOPT_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code, str(report)], capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr
    entry, = json.loads(report.read_text())["graphs"]
    assert [d["chosen"] for d in entry["lowering"]] and all(d["chosen"] for d in entry["lowering"])
    budget = LowerRegions.compile_budget_s
    assert entry["compile_seconds"] < budget + 60  # loosely: one compile may start just before the budget ends
