"""The built-in model zoo: every case builds, runs, and gives finite, reproducible outputs.

Cases registered with ``slow=True`` carry ``pytest.mark.slow``; the torch.export
check of every case is also marked slow (it takes about a minute in all).
"""

from __future__ import annotations

import pytest
import torch

from graphopt.models import MODEL_CASES, ModelCase, demo_cases, get_case

from graphopt.testing import assert_close_outputs, flatten_outputs

pytest.importorskip("torchvision")
pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")


CASES = [
    pytest.param(c.name, id=c.name, marks=[pytest.mark.slow] if c.slow else [])
    for c in MODEL_CASES.values()
]


@pytest.fixture(scope="module", params=CASES)
def built(request):
    """(name, model, inputs, reference outputs), built once per case.

    A module-scoped parametrized fixture makes pytest group the tests by case, so
    only one model is alive at a time.
    """
    name = request.param
    model, inputs = get_case(name).build()
    with torch.no_grad():
        out = model(*inputs)
    return name, model, inputs, out


# -- registry ---------------------------------------------------------------


def test_registry_is_well_formed():
    assert len(MODEL_CASES) >= 25
    for name, case in MODEL_CASES.items():
        assert isinstance(case, ModelCase)
        assert case.name == name
        assert name.startswith(case.family + ".")
        assert case.family in {"torchvision", "timm", "transformers", "diffusers"}
    assert {c.family for c in MODEL_CASES.values()} == {"torchvision", "timm", "transformers", "diffusers"}


def test_get_case_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as info:
        get_case("torchvision.no_such_model")
    message = str(info.value)
    assert "no_such_model" in message
    assert "torchvision.resnet18" in message and "diffusers.dit" in message


def test_demo_cases():
    demos = demo_cases()
    assert [c.family for c in demos] == ["torchvision", "timm", "diffusers"]
    assert "resnet" in demos[0].name and "vit" in demos[1].name and "dit" in demos[2].name
    assert all(not c.slow for c in demos)


def test_import_is_lazy():
    import os
    import subprocess
    import sys

    import graphopt.models

    root = os.path.dirname(os.path.dirname(os.path.abspath(graphopt.models.__file__)))

    code = (
        "import sys, graphopt.models; "
        "bad = [m for m in ('timm', 'transformers', 'diffusers', 'torchvision') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# -- every case ---------------------------------------------------------------


def test_case_builds_and_runs(built):
    name, model, inputs, out = built
    assert not model.training, "build() must return the model in eval mode"
    assert isinstance(inputs, tuple) and inputs
    assert all(isinstance(t, torch.Tensor) for t in inputs), "inputs must be positional tensors"
    outs = flatten_outputs(out)
    assert outs, "model returned no tensors"
    assert isinstance(out, torch.Tensor) or (
        isinstance(out, tuple) and all(isinstance(t, torch.Tensor) for t in out)
    ), f"forward must return a tensor or a tuple of tensors, got {type(out).__name__}"
    for i, t in enumerate(outs):
        assert torch.isfinite(t).all(), f"output {i} of {name} has non-finite values"


def test_case_is_deterministic(built):
    name, _, inputs, out = built
    model2, inputs2 = get_case(name).build()
    assert len(inputs2) == len(inputs)
    for a, b in zip(inputs, inputs2):
        assert torch.equal(a, b), "example inputs differ between builds"
    with torch.no_grad():
        out2 = model2(*inputs2)
    assert_close_outputs(out, out2, rtol=1e-5, what=f"{name} rebuilt")


@pytest.mark.slow
def test_case_exports(built):
    name, model, inputs, out = built
    program = torch.export.export(model, inputs)
    with torch.no_grad():
        got = program.module()(*inputs)
    assert_close_outputs(out, got, rtol=1e-4, what=f"{name} exported")
