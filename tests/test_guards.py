"""graphopt.frozen_module_guards: fewer Dynamo guards per call, the ones users rely on kept."""
from __future__ import annotations

import torch

from graphopt import frozen_module_guards
from graphopt._torch_private import guards_module_attribute
from graphopt.models import MODEL_CASES


def counting_backend(compiled_graphs: list[torch.fx.GraphModule]):
    def backend(gm: torch.fx.GraphModule, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward
    return backend


def test_drops_the_module_guards_and_keeps_the_input_guards():
    model, inputs = MODEL_CASES["torchvision.mobilenet_v2"].build()
    seen, kept = [], []

    def recording(entries):
        keep = frozen_module_guards(entries)
        seen.extend(entries)
        kept.extend(e for e, k in zip(entries, keep) if k)
        return keep

    compiled = torch.compile(model, backend=counting_backend([]), options={"guard_filter_fn": recording})
    with torch.no_grad():
        compiled(*inputs)
    assert len(seen) > 1000, "Dynamo guards every submodule attribute MobileNetV2 reads"
    assert len(kept) < 0.1 * len(seen)
    assert any(e.guard_type == "TENSOR_MATCH" and not guards_module_attribute(e) for e in kept), "the input"
    assert {e.guard_type for e in kept} >= {"GRAD_MODE", "GLOBAL_STATE"}


def test_train_eval_switches_and_new_shapes_still_recompile():
    model, (x,) = MODEL_CASES["torchvision.resnet18"].build()
    graphs: list[torch.fx.GraphModule] = []
    compiled = torch.compile(model, backend=counting_backend(graphs), dynamic=False,
                             options={"guard_filter_fn": frozen_module_guards})
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


def test_graphopt_with_frozen_guards_matches_eager_and_sees_a_replaced_parameter():
    model, inputs = MODEL_CASES["torchvision.mobilenet_v2"].build()
    compiled = torch.compile(model, backend="graphopt", options={"guard_filter_fn": frozen_module_guards})
    with torch.no_grad():
        expected = model(*inputs)
        torch.testing.assert_close(compiled(*inputs), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled(*inputs), expected, rtol=1e-4, atol=1e-5)
        model.classifier[1].weight = torch.nn.Parameter(torch.randn_like(model.classifier[1].weight))
        torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)  # a new parameter
