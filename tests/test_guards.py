"""graphopt.frozen_module_guards and frozen_model_guards: fewer Dynamo guards per call, the ones users rely on kept."""
from __future__ import annotations

import pytest
import torch

from graphopt import frozen_model_guards, frozen_module_guards
from graphopt._torch_private import guards_module_attribute
from graphopt.models import MODEL_CASES


def counting_backend(compiled_graphs: list[torch.fx.GraphModule]):
    def backend(gm: torch.fx.GraphModule, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward
    return backend


FILTERS = [frozen_module_guards, frozen_model_guards]


def kept_guards(name: str, guard_filter) -> tuple[list, list]:
    """All guards Dynamo builds for a zoo model, and those ``guard_filter`` keeps."""
    model, inputs = MODEL_CASES[name].build()
    seen, kept = [], []

    def recording(entries):
        keep = guard_filter(entries)
        seen.extend(entries)
        kept.extend(e for e, k in zip(entries, keep) if k)
        return keep

    compiled = torch.compile(model, backend=counting_backend([]), options={"guard_filter_fn": recording})
    with torch.no_grad():
        compiled(*inputs)
    return seen, kept


def test_drops_the_module_guards_and_keeps_the_input_guards():
    seen, kept = kept_guards("torchvision.mobilenet_v2", frozen_module_guards)
    assert len(seen) > 1000, "Dynamo guards every submodule attribute MobileNetV2 reads"
    assert len(kept) < 0.1 * len(seen)
    assert any(e.guard_type == "TENSOR_MATCH" and not guards_module_attribute(e) for e in kept), "the input"
    assert {e.guard_type for e in kept} >= {"GRAD_MODE", "GLOBAL_STATE"}


def test_frozen_model_guards_also_drop_the_globals():
    _, module_kept = kept_guards("transformers.bert", frozen_module_guards)
    _, kept = kept_guards("transformers.bert", frozen_model_guards)
    assert sum(e.is_global for e in module_kept) > 100, "BERT's code reads many globals"
    assert not any(e.is_global for e in kept)
    assert [(e.name, e.guard_type) for e in module_kept if not e.is_global] == [(e.name, e.guard_type) for e in kept]
    assert sum(e.guard_type == "TENSOR_MATCH" for e in kept) == 2, "input ids and attention mask"
    assert {e.guard_type for e in kept} >= {"GRAD_MODE", "GLOBAL_STATE"}


@pytest.mark.parametrize("guard_filter", FILTERS)
def test_train_eval_switches_and_new_shapes_still_recompile(guard_filter):
    model, (x,) = MODEL_CASES["torchvision.resnet18"].build()
    graphs: list[torch.fx.GraphModule] = []
    compiled = torch.compile(model, backend=counting_backend(graphs), dynamic=False,
                             options={"guard_filter_fn": guard_filter})
    with torch.no_grad():
        compiled(x)
        compiled(x)
        assert len(graphs) == 1
        model.train()
        compiled(x.repeat(2, 1, 1, 1))
        assert len(graphs) == 2, "the training flag is guarded"
        model.eval()
        compiled(x)
        assert len(graphs) == 2, "the eval graph is reused"
        compiled(x.repeat(2, 1, 1, 1))
        assert len(graphs) == 3, "the input shape is guarded"


@pytest.mark.parametrize("guard_filter", FILTERS)
def test_graphopt_with_frozen_guards_matches_eager_and_sees_a_replaced_parameter(guard_filter):
    model, inputs = MODEL_CASES["torchvision.mobilenet_v2"].build()
    compiled = torch.compile(model, backend="graphopt", options={"level": "O2", "guard_filter_fn": guard_filter})
    with torch.no_grad():
        expected = model(*inputs)
        torch.testing.assert_close(compiled(*inputs), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled(*inputs), expected, rtol=1e-4, atol=1e-5)
        model.classifier[1].weight = torch.nn.Parameter(torch.randn_like(model.classifier[1].weight))
        torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)  # a new parameter
