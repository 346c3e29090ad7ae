"""The torch emitter: an IR graph as a ``torch.fx.GraphModule``.

Each node becomes one ``call_function`` of its op's torch implementation (the
module-level functions of ``graphopt.ir.ops``, or torch's own), ``torch.opaque``
calls its original target, and several results are read with ``getitem``.
Constants become attributes at their dotted names (``layer1.0.conv1.weight``),
parameters as ``nn.Parameter`` so the emitted module can be fine-tuned, the rest
as buffers. A region becomes a submodule (its body, emitted the same way) at its
label, and state nodes call the module's ``graphopt_state`` (``GraphState``),
which the module and all its regions share. A batch norm that owns its statistics becomes a ``BatchNorm`` module
at its layer's name, so ``train()`` normalises with batch statistics and updates
them, as the source model did. The module is returned in eval mode, the mode the
graph was captured in. Nothing names a device: the module runs where its tensors are.
"""
from __future__ import annotations

import itertools
import operator
import re
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import _torch_private
from ..ir import Graph, Node, Value
from ..ir.graph import register_emitter
from ..ir.ops.opaque import fill
from .state import GraphState

STATE_ATTRIBUTE = "graphopt_state"


def emit_torch(graph: Graph) -> fx.GraphModule:
    """A GraphModule computing ``graph``; it returns the captured model's output structure when known."""
    return TorchEmitter(graph).run()


class BatchNorm(torch.nn.Module):
    """Batch norm over dim 1 of any rank: running statistics in eval mode, batch statistics in train mode.

    The IR keeps only inference batch norm; this gives an emitted module back the
    training behaviour, so fine-tuning it (after pruning) adapts the statistics.
    """

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, running_mean: torch.Tensor,
                 running_var: torch.Tensor, eps: float, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = None if weight is None else _parameter(weight)
        self.bias = None if bias is None else _parameter(bias)
        self.register_buffer("running_mean", running_mean)
        self.register_buffer("running_var", running_var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{self.running_mean.numel()}, eps={self.eps}, momentum={self.momentum}"


def _parameter(data: torch.Tensor) -> torch.nn.Parameter:
    if isinstance(data, torch.nn.Parameter):
        return data
    return torch.nn.Parameter(data, requires_grad=data.is_floating_point() or data.is_complex())


def _identifier(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    return f"_{name}" if not name or name[0].isdigit() else name


class TorchEmitter:
    def __init__(self, graph: Graph, state: GraphState | None = None):
        self.graph = graph
        self.state = GraphState() if state is None else state
        self.uses_state = False
        self.fx = fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[int, fx.Node] = {}
        self.pending_results: dict[int, tuple[fx.Node, int]] = {}
        self.counter = itertools.count()

    def run(self) -> fx.GraphModule:
        for v in self.graph.inputs:
            self.env[id(v)] = self.fx.placeholder(_identifier(v.name))
        for node in self.graph.nodes:
            self._emit_node(node)
        self.fx.output(self._output_structure())
        module = fx.GraphModule(self.root, self.fx, class_name=_identifier(self.graph.name))
        if self.uses_state and not hasattr(module, STATE_ATTRIBUTE):  # only regions read it: fx copied no reference
            module.add_module(STATE_ATTRIBUTE, self.state)
        return module.eval()

    # ------------------------------------------------------------------ values
    def _node_for(self, v: Value) -> fx.Node:
        if id(v) not in self.env:
            if id(v) in self.pending_results:
                call, k = self.pending_results.pop(id(v))
                self.env[id(v)] = self.fx.create_node("call_function", operator.getitem, (call, k), name=v.name)
            elif v.is_constant:
                self.env[id(v)] = self.fx.get_attr(self._register_constant(v))
            else:
                raise ValueError(f"%{v.name} is used before it is defined")
        return self.env[id(v)]

    def _register_constant(self, v: Value) -> str:
        """Attach a constant to the root module under its dotted name (a flat one on a clash)."""
        data = v.data
        if v.is_parameter:
            data = _parameter(data)
        elif isinstance(data, torch.nn.Parameter):
            data = data.detach()
        return self._install_at(v.name, data)

    def _install_at(self, name: str, obj: Any) -> str:
        """Attach ``obj`` at the dotted ``name`` where it is free, else at a fresh flat name; the path used."""
        path = name if re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", name) else _identifier(name)
        if not self._install(path, obj):
            path = self._fresh_attr(_identifier(name))
            self._install(path, obj)
        return path

    def _install(self, path: str, data: Any) -> bool:
        *prefix, field = path.split(".")
        owner = self.root
        for name in prefix:
            child = owner._modules.get(name)
            if child is None:
                if hasattr(owner, name):
                    return False
                child = torch.nn.Module()
                owner.add_module(name, child)
            owner = child
        if hasattr(owner, field):
            return False
        if isinstance(data, torch.nn.Parameter):
            owner.register_parameter(field, data)
        elif isinstance(data, torch.Tensor):
            owner.register_buffer(field, data)
        elif isinstance(data, torch.nn.Module):
            owner.add_module(field, data)
        else:
            setattr(owner, field, data)
        return True

    def _fresh_attr(self, hint: str) -> str:
        name = hint
        while hasattr(self.root, name):
            name = f"{hint}_{next(self.counter)}"
        return name

    def _attribute(self, obj: Any, hint: str) -> fx.Node:
        """A get_attr node for an object an op takes that fx code cannot spell (a tensor, a module)."""
        name = self._fresh_attr(hint)
        self._install(name, obj)
        return self.fx.get_attr(name)

    def _lift(self, template: Any) -> Any:
        if isinstance(template, torch.Tensor):
            return self._attribute(template, "_tensor")
        if isinstance(template, torch.nn.Module):
            return self._attribute(template, "_submodule")
        if isinstance(template, (list, tuple)) and not isinstance(template, torch.Size):
            return type(template)(self._lift(t) for t in template)
        if isinstance(template, dict):
            return {k: self._lift(t) for k, t in template.items()}
        return template

    # ------------------------------------------------------------------- nodes
    def _emit_node(self, node: Node) -> None:
        if node.op == "batch_norm" and self._emit_batch_norm_module(node):
            return
        if node.opdef.torch_module is not None:
            self._emit_submodule(node)
            return
        inputs = tuple(None if v is None else self._node_for(v) for v in node.inputs)
        method = node.opdef.state_method
        if method is not None:
            call = self.fx.create_node("call_method", method, (self._state_node(), node.attrs["key"], *inputs),
                                       name=node.output.name)
            self.env[id(node.output)] = call
            return
        if node.op == "torch.opaque":
            target = node.attrs["target"]
            args = self._lift(fill(tuple(node.attrs["args"]), inputs))
            kwargs = self._lift(fill(dict(node.attrs["kwargs"] or {}), inputs))
        else:
            target, args, kwargs = node.opdef.torch_impl, inputs, self._lift(dict(node.attrs))
        name = node.outputs[0].name if len(node.outputs) == 1 else node.name
        call = self.fx.create_node("call_function", target, tuple(args), kwargs, name=name)
        if _returns_sequence(node):
            for k, out in enumerate(node.outputs):
                self.pending_results[id(out)] = (call, k)
        elif node.outputs:
            self.env[id(node.output)] = call

    def _state_node(self) -> fx.Node:
        self._install_state()
        return self.fx.get_attr(STATE_ATTRIBUTE)

    def _install_state(self) -> None:
        if not self.uses_state:
            self.uses_state = True
            if not self._install(STATE_ATTRIBUTE, self.state):
                raise ValueError(f"the emitted module of {self.graph.name} has a constant at {STATE_ATTRIBUTE!r}")

    def _emit_submodule(self, node: Node) -> None:
        """A region-like node as a submodule at its label; its bodies share this module's state."""
        used_state = []

        def emit_body(graph: Graph) -> fx.GraphModule:
            body = TorchEmitter(graph, self.state)
            module = body.run()
            used_state.append(body.uses_state)
            return module

        module = node.opdef.torch_module(node, emit_body, self.state)
        if any(used_state) or getattr(module, "uses_state", False):
            self._install_state()
        path = self._install_at(node.attrs["label"] or node.name, module)
        call = self.fx.create_node("call_module", path, tuple(self._node_for(v) for v in node.inputs),
                                   name=node.name)
        for k, out in enumerate(node.outputs):  # a submodule returns a tuple
            self.pending_results[id(out)] = (call, k)

    def _emit_batch_norm_module(self, node: Node) -> bool:
        """A ``BatchNorm`` module for a batch norm whose parameters are its own constants.

        It sits at the layer's name (``layer1.0.bn1``, from ``layer1.0.bn1.weight``) so the
        state dict keeps the source model's keys. Statistics that equal constants merged
        (fresh running stats are all zeros and ones) get their own copy, as in the source
        model; shared parameters or computed operands keep the function.
        """
        x, weight, bias, mean, var = node.inputs
        if not all(v is None or (v.is_constant and len(v.users()) == 1) for v in (weight, bias)) or not all(
                v is not None and v.is_constant and v.data.is_floating_point() for v in (mean, var)):
            return False
        stats = [v.data.detach() if len(v.users()) == 1 else v.data.detach().clone() for v in (mean, var)]
        module = BatchNorm(None if weight is None else weight.data, None if bias is None else bias.data, *stats,
                           node.attrs["eps"])
        owner = weight or bias or (mean if len(mean.users()) == 1 else None)
        layer = owner.name.rpartition(".")[0] if owner is not None else ""
        path = self._install_at(layer or node.name, module)
        self.env[id(node.output)] = self.fx.create_node("call_module", path, (self._node_for(x),),
                                                        name=node.output.name)
        return True

    # ----------------------------------------------------------------- outputs
    def _output_structure(self) -> Any:
        """The outputs in the captured structure (``out_spec``), else a tuple."""
        meta = self.graph.meta.get("torch") or {}
        spec, literals = meta.get("out_spec"), dict(meta.get("out_literals") or {})
        results = iter(self._node_for(v) for v in self.graph.outputs)
        if spec is None or spec.num_leaves != len(self.graph.outputs) + len(literals):
            return tuple(results)
        leaves = [literals[k] if k in literals else next(results) for k in range(spec.num_leaves)]
        if _is_plain(spec):
            return _torch_private.tree_unflatten(leaves, spec)
        spec_node = self._attribute(spec, "_out_spec")
        return self.fx.call_function(_torch_private.tree_unflatten, (leaves, spec_node))


def _returns_sequence(node: Node) -> bool:
    """Whether the impl returns a tuple: several results, or a canonical op with a variable count (split)."""
    opdef = node.opdef
    return len(node.outputs) != 1 or (callable(opdef.num_outputs) and opdef.category != "opaque")


def _is_plain(spec: Any) -> bool:
    """Whether a pytree spec is made of tuples, lists and str-keyed dicts only (fx can return those as is)."""
    if spec.is_leaf():
        return True
    if spec.type is dict:
        if not all(isinstance(k, str) for k in spec.context):
            return False
    elif spec.type not in (tuple, list):
        return False
    return all(_is_plain(spec.child(k)) for k in range(spec.num_children))


register_emitter("torch", emit_torch)
