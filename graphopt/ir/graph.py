"""The IR core: a ``Graph`` of ``Node``s that consume and produce ``Value``s.

Use-def chains are explicit and kept up to date by every mutation
(``Node.replace_input``, ``Value.replace_all_uses_with``, ``Graph.remove_node``),
so a pass never has to rebuild them. Node order is the execution order; the
verifier checks that it is topological.

Constants (parameters, buffers, ONNX initializers) are values with ``data``: a
torch tensor shared with the model it came from, never copied.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .types import TensorType, Type

if TYPE_CHECKING:
    import networkx
    import onnx

    from .registry import OpDef


class Value:
    """An SSA value: a graph input, a constant, or the output of one node."""

    __slots__ = ("name", "type", "producer", "index", "data", "is_parameter", "meta", "graph", "_uses")

    def __init__(self, name: str, type: Type, producer: Node | None = None, index: int = 0,
                 graph: Graph | None = None):
        self.name = name
        self.graph = graph
        self.type = type
        self.producer = producer
        self.index = index
        self.data: torch.Tensor | None = None
        self.is_parameter = False
        self.meta: dict[str, Any] = {}
        self._uses: list[tuple[Node, int]] = []

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    def uses(self) -> list[tuple[Node, int]]:
        """(node, input index) pairs that read this value, in insertion order."""
        return list(self._uses)

    def users(self) -> list[Node]:
        """Distinct nodes that read this value."""
        return list(dict.fromkeys(n for n, _ in self._uses))

    def replace_all_uses_with(self, other: Value) -> int:
        """Point every reader (and graph output slot) of ``self`` at ``other``."""
        count = 0
        for node, i in list(self._uses):
            node.replace_input(i, other)
            count += 1
        if self.graph is not None:
            for k, out in enumerate(self.graph.outputs):
                if out is self:
                    self.graph.outputs[k] = other
                    count += 1
        return count

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One operation. ``op`` names an entry of the op registry."""

    __slots__ = ("op", "_inputs", "outputs", "attrs", "meta", "graph", "name")

    def __init__(self, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None,
                 name: str = ""):
        self.op = op
        self._inputs: list[Value | None] = []
        self.outputs: list[Value] = []
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.meta: dict[str, Any] = {}
        self.graph: Graph | None = None
        self.name = name
        for v in inputs:
            self._append_input(v)

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise ValueError(f"node {self.name} ({self.op}) has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    @property
    def opdef(self) -> OpDef:
        from .registry import get_op

        return get_op(self.op)

    def _append_input(self, v: Value | None) -> None:
        if v is not None:
            v._uses.append((self, len(self._inputs)))
        self._inputs.append(v)

    def replace_input(self, i: int, v: Value | None) -> None:
        old = self._inputs[i]
        if old is v:
            return
        if old is not None:
            old._uses.remove((self, i))
        if v is not None:
            v._uses.append((self, i))
        self._inputs[i] = v

    def set_inputs(self, inputs: Sequence[Value | None]) -> None:
        self._drop_uses()
        self._inputs = []
        for v in inputs:
            self._append_input(v)

    def _drop_uses(self) -> None:
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.remove((self, i))

    def users(self) -> list[Node]:
        return list(dict.fromkeys(u for out in self.outputs for u in out.users()))

    def __repr__(self) -> str:
        return f"<Node {self.name}: {self.op}>"


class Graph:
    """A dataflow graph with named inputs, outputs, constants and ordered nodes."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.constants: dict[str, Value] = {}
        self.meta: dict[str, Any] = {}
        self._nodes: list[Node] = []
        self._names: set[str] = set()
        self._node_names: set[str] = set()
        self._counter = itertools.count()

    # ----------------------------------------------------------------- naming
    def unique_name(self, hint: str = "v", _taken: set[str] | None = None) -> str:
        """A value name not used in this graph, derived from ``hint``."""
        taken = self._names if _taken is None else _taken
        hint = hint or "v"
        candidate = hint
        while candidate in taken:
            candidate = f"{hint}_{next(self._counter)}"
        taken.add(candidate)
        return candidate

    # ------------------------------------------------------------- construction
    def add_input(self, name: str, type: Type) -> Value:
        v = Value(self.unique_name(name), type, graph=self)
        self.inputs.append(v)
        return v

    def add_constant(self, data: torch.Tensor, name: str = "const", parameter: bool = False) -> Value:
        v = Value(self.unique_name(name), TensorType.of(data), graph=self)
        v.data = data
        v.is_parameter = parameter
        self.constants[v.name] = v
        return v

    def add_node(self, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None, *,
                 output_types: Sequence[Type] | None = None, name: str | None = None,
                 output_names: Sequence[str] | None = None, before: Node | None = None,
                 after: Node | None = None, meta: dict[str, Any] | None = None) -> Node:
        """Create a node and insert it (at the end, or next to an anchor).

        Output types are inferred from the op registry unless given.
        """
        node = Node(op, inputs, attrs, name=self.unique_name(name or op.rsplit(".", 1)[-1], self._node_names))
        node.graph = self
        node.meta.update(meta or {})
        if output_types is None:
            from .registry import infer_types

            try:
                output_types = infer_types(node)
            except Exception:
                node._drop_uses()  # the node never joins the graph: its inputs must not list it
                raise
        names = list(output_names or [])
        for k, t in enumerate(output_types):
            hint = names[k] if k < len(names) else (node.name if len(output_types) == 1 else f"{node.name}_{k}")
            node.outputs.append(Value(self.unique_name(hint), t, node, k, graph=self))
        if before is not None:
            self._nodes.insert(self._nodes.index(before), node)
        elif after is not None:
            self._nodes.insert(self._nodes.index(after) + 1, node)
        else:
            self._nodes.append(node)
        return node

    def remove_node(self, node: Node) -> None:
        """Detach a node whose outputs are no longer used."""
        for out in node.outputs:
            if out._uses or any(o is out for o in self.outputs):
                raise ValueError(f"cannot remove {node.name} ({node.op}): output %{out.name} is still used")
        node._drop_uses()
        node._inputs = []
        self._nodes.remove(node)
        node.graph = None

    def remove_unused_constants(self) -> int:
        used = {id(v) for n in self._nodes for v in n.inputs if v is not None}
        used |= {id(v) for v in self.outputs}
        dead = [k for k, v in self.constants.items() if id(v) not in used]
        for k in dead:
            del self.constants[k]
        return len(dead)

    # ------------------------------------------------------------------ access
    @property
    def nodes(self) -> list[Node]:
        """A snapshot of the nodes in execution order (safe to mutate the graph while iterating)."""
        return list(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes))

    def __len__(self) -> int:
        return len(self._nodes)

    def find(self, op: str) -> list[Node]:
        return [n for n in self._nodes if n.op == op]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self._nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.constants.values()
        for n in self._nodes:
            yield from n.outputs

    def sort(self) -> None:
        """Reorder nodes topologically, keeping the current order where it is already valid."""
        ready = {id(v) for v in self.inputs} | {id(v) for v in self.constants.values()}
        pending = list(self._nodes)
        ordered: list[Node] = []
        while pending:
            progress = []
            rest = []
            for n in pending:
                if all(v is None or id(v) in ready or v.producer is None for v in n.inputs):
                    progress.append(n)
                    ready.update(id(o) for o in n.outputs)
                else:
                    rest.append(n)
            if not progress:
                raise ValueError(f"graph {self.name} has a cycle through {rest[0].name}")
            ordered.extend(progress)
            pending = rest
        self._nodes = ordered

    # --------------------------------------------------------------- analyses
    def verify(self, check_types: bool = False) -> None:
        from .verifier import verify

        verify(self, check_types)

    def to_networkx(self) -> networkx.MultiDiGraph:
        from .analysis import to_networkx

        return to_networkx(self)

    def structural_hash(self) -> str:
        from .analysis import structural_hash

        return structural_hash(self)

    def clone(self) -> Graph:
        from .analysis import clone

        return clone(self)

    def __str__(self) -> str:
        from .printer import format_graph

        return format_graph(self)

    # ---------------------------------------------------------------- emitters
    def to_torch(self) -> torch.fx.GraphModule:
        from graphopt.emitters.torch import emit_torch

        return emit_torch(self)

    def to_onnx(self, **kwargs: Any) -> onnx.ModelProto:
        from graphopt.emitters.onnx import emit_onnx

        return emit_onnx(self, **kwargs)
