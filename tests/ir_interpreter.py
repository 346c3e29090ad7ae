"""A reference interpreter for IR graphs: each node's torch implementation, in order.

It depends on nothing but the op registry, so a pass test can compare a graph's
outputs before and after a rewrite without trusting an emitter.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from graphopt.ir import Graph, TensorType
from graphopt.pass_manager import Pass, PassResult


def run_graph(graph: Graph, *inputs: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """The graph's outputs for ``inputs`` (one per graph input, in order).

    Random ops (training dropout) draw from a generator seeded with ``seed``, so
    two runs of the same graph agree.
    """
    if len(inputs) != len(graph.inputs):
        raise TypeError(f"graph {graph.name} takes {len(graph.inputs)} inputs, got {len(inputs)}")
    env = {id(v): x for v, x in zip(graph.inputs, inputs)}
    env.update((id(v), v.data) for v in graph.constants.values())
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for node in graph.nodes:
            result = node.opdef.torch_impl(*(None if v is None else env[id(v)] for v in node.inputs), **node.attrs)
            results = (result,) if len(node.outputs) == 1 else tuple(result)
            env.update(zip((id(out) for out in node.outputs), results))
    return [env[id(v)] for v in graph.outputs]


def random_inputs(graph: Graph, seed: int = 0, symbol_size: int = 3) -> list[torch.Tensor]:
    """Random tensors matching the graph's input types; symbolic dims get ``symbol_size``."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for v in graph.inputs:
        if not isinstance(v.type, TensorType) or v.type.shape is None:
            raise TypeError(f"input %{v.name} has type {v.type}: give its value explicitly")
        shape = [d if isinstance(d, int) else symbol_size for d in v.type.shape]
        dtype = v.type.dtype
        if dtype == torch.bool:
            tensors.append(torch.rand(shape, generator=gen) > 0.5)
        elif dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=gen).to(dtype))
        else:
            tensors.append(torch.randint(-4, 5, shape, generator=gen).to(dtype))
    return tensors


def run_exact(p: Pass, graph: Graph, inputs: Sequence[torch.Tensor] | None = None) -> PassResult:
    """Run pass ``p`` on ``graph`` and assert what an exact pass promises.

    The graph stays valid, ``modified`` is True exactly when the structure
    changed, and the outputs on ``inputs`` (random ones by default) are equal,
    dtype and shape included.
    """
    inputs = list(inputs) if inputs is not None else random_inputs(graph)
    expected = run_graph(graph, *inputs)
    before = graph.structural_hash()
    result = p.call(graph)
    assert result.graph is graph
    graph.verify()
    assert result.modified == (graph.structural_hash() != before), result
    for got, want in zip(run_graph(graph, *inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    return result
