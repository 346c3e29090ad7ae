"""graphopt.testing: the output-comparison helpers."""

from __future__ import annotations

import math

import pytest
import torch

from graphopt.testing import assert_close_outputs, flatten_outputs, max_rel_error


def test_flatten_nested_structures():
    a, b, c = torch.ones(2), torch.zeros(3), torch.arange(4)
    assert flatten_outputs(a)[0] is a
    out = flatten_outputs((a, [b, None], {"x": c}))
    assert [t.shape for t in out] == [a.shape, b.shape, c.shape]
    assert flatten_outputs(None) == []


def test_flatten_model_output():
    transformers = pytest.importorskip("transformers")
    hidden = torch.randn(1, 4, 8)
    mo = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=hidden)
    out = flatten_outputs(mo)
    assert len(out) == 1 and out[0] is hidden


def test_max_rel_error_scales_by_reference():
    ref = (torch.tensor([10.0, -20.0]), torch.tensor([1.0]))
    got = (torch.tensor([10.0, -19.0]), torch.tensor([1.0]))
    assert max_rel_error(ref, got) == pytest.approx(1.0 / 20.0)
    assert max_rel_error(ref, ref) == 0.0
    # all-zero reference: divide by 1e-6, not by zero
    assert max_rel_error(torch.zeros(2), torch.full((2,), 1e-7)) == pytest.approx(0.1)


def test_max_rel_error_special_values():
    nan = float("nan")
    assert max_rel_error(torch.tensor([nan, 1.0]), torch.tensor([nan, 1.0])) == 0.0
    assert math.isinf(max_rel_error(torch.tensor([nan, 1.0]), torch.tensor([0.0, 1.0])))
    assert math.isinf(max_rel_error(torch.tensor([1, 2]), torch.tensor([1, 3])))
    assert max_rel_error(torch.tensor([1, 2]), torch.tensor([1, 2])) == 0.0


def test_structure_mismatch_raises():
    with pytest.raises(AssertionError, match="output count"):
        max_rel_error((torch.ones(1), torch.ones(1)), torch.ones(1))
    with pytest.raises(AssertionError, match="shape"):
        max_rel_error(torch.ones(2), torch.ones(3))


def test_assert_close_outputs_message():
    ref = (torch.ones(2, 2), torch.ones(3))
    got = (torch.ones(2, 2), torch.tensor([1.0, 1.5, 1.0]))
    assert_close_outputs(ref, ref)
    with pytest.raises(AssertionError) as info:
        assert_close_outputs(ref, got, rtol=1e-3, what="toy")
    message = str(info.value)
    assert "toy" in message and "output 1" in message and "(1,)" in message and "1.5" in message
    assert "output 0" not in message


def test_output_difference_is_one_measure_for_tensors_and_arrays():
    """The CLI's --check (numpy outputs of onnxruntime) and the suite (torch outputs) read the same numbers:
    absolute, and relative to the largest expected magnitude; equal infinities agree, strings compare whole."""
    import numpy as np

    from graphopt.testing import output_difference

    ref, got = torch.tensor([10.0, -20.0, float("inf")]), torch.tensor([11.0, -20.0, float("inf")])
    assert output_difference(ref, got) == output_difference(ref.numpy(), got.numpy()) == (1.0, 0.05)
    assert output_difference(np.array(["a", "b"]), np.array(["a", "b"])) == (0.0, 0.0)
    assert output_difference(np.array(["a"]), np.array(["c"]))[1] == float("inf")
    assert output_difference(np.zeros(2), np.zeros(3))[1] == float("inf")
