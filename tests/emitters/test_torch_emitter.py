"""The torch emitter: runnable, trainable, readable GraphModules with the model's output structure."""
from __future__ import annotations

import collections
import copy
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.emitters.torch import BatchNorm, emit_torch
from graphopt.frontends.torch import capture
from graphopt.ir import Graph, TensorType
from graphopt.ir.ops.opaque import Arg


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.fc.weight.requires_grad_(False)  # a frozen parameter stays frozen

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return {"logits": self.fc(y), "features": (y, y.sum(-1))}


def test_parameters_buffers_and_gradients_match_eager():
    torch.manual_seed(0)
    model, x = Small().eval(), torch.randn(2, 3, 5, 5)
    module = capture(model, (x,)).to_torch()
    params = dict(module.named_parameters())
    assert set(params) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"}
    assert all(isinstance(p, nn.Parameter) for p in params.values())
    assert not params["fc.weight"].requires_grad and params["conv.weight"].requires_grad
    assert {"bn.running_mean", "bn.running_var"} <= set(dict(module.named_buffers()))

    module(x)["logits"].square().sum().backward()
    emitted_grads = {n: p.grad.clone() for n, p in params.items() if p.requires_grad}
    for p in model.parameters():
        p.grad = None
    model(x)["logits"].square().sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(emitted_grads[name], p.grad, atol=1e-6), name


def test_batch_norm_trains_like_the_source_model():
    """Captured in eval mode, emitted in eval mode; train() switches batch norms to batch statistics."""
    import torchvision

    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(4, 3, 32, 32)
    module = capture(model, (x,)).to_torch()
    assert not module.training
    assert sum(isinstance(m, BatchNorm) for m in module.modules()) == 20
    assert isinstance(module.get_submodule("layer2.0.downsample.1"), BatchNorm)
    assert set(module.state_dict()) == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    torch.testing.assert_close(module(x), model(x), rtol=0, atol=0)

    module.train(), model.train()
    torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.get_submodule("layer3.1.bn2").running_var, model.layer3[1].bn2.running_var)
    assert not torch.equal(module.get_submodule("bn1").running_mean, module.get_submodule("layer1.0.bn1").running_mean)


def test_output_structure_follows_the_model():
    model, x = Small().eval(), torch.randn(1, 3, 4, 4)
    out = capture(model, (x,)).to_torch()(x)
    assert set(out) == {"logits", "features"} and isinstance(out["features"], tuple)

    single = capture(nn.ReLU(), (x,)).to_torch()(x)
    assert isinstance(single, torch.Tensor) and torch.equal(single, x.relu())


def test_custom_output_containers_go_through_pytree():
    Pair = collections.namedtuple("Pair", "first second")

    class M(nn.Module):
        def forward(self, x):
            return Pair(x + 1, x * 2)

    x = torch.randn(3)
    out = capture(M(), (x,)).to_torch()(x)
    assert isinstance(out, Pair) and torch.equal(out.second, x * 2)


def test_code_is_readable_and_device_free():
    module = capture(Small().eval(), (torch.randn(1, 3, 4, 4),)).to_torch()
    code = module.code
    assert "torch.relu(" in code and "self.conv.weight" in code
    assert "device" not in code and "<lambda>" not in code


def test_module_pickles_and_deep_copies():
    model, x = Small().eval(), torch.randn(1, 3, 4, 4)
    module = capture(model, (x,)).to_torch()
    for clone in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        assert torch.equal(clone(x)["logits"], module(x)["logits"])


def test_hand_built_graph_returns_a_tuple():
    """Without an out_spec (graphs from ONNX or built by hand) the outputs come back as a tuple."""
    g = Graph("hand")
    x = g.add_input("x", TensorType(torch.float32, (2, 6)))
    table = g.add_constant(torch.arange(4.0), "table")
    parts = g.add_node("split", [x], {"dim": 1, "sizes": [2, 4]}).outputs
    total = g.add_node("add", [parts[1], table]).output
    whole = g.add_node("split", [x], {"dim": 0, "sizes": [2]}).outputs[0]
    index = torch.tensor([3, 0])
    picked = g.add_node("torch.opaque", [total], {"target": torch.index_select, "args": (Arg(0), 1, index)},
                        output_types=[TensorType(torch.float32, (2, 2))]).output
    g.outputs = [picked, whole]
    g.verify()
    module = emit_torch(g)
    data = torch.randn(2, 6)
    out = module(data)
    assert isinstance(out, tuple) and len(out) == 2
    assert torch.equal(out[0], (data[:, 2:] + torch.arange(4.0))[:, [3, 0]])
    assert torch.equal(out[1], data)
    assert "table" in dict(module.named_buffers())
