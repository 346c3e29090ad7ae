"""The IR core: a ``Graph`` of ``Node``s that consume and produce ``Value``s.

Use-def chains are explicit and kept up to date by every mutation
(``Node.replace_input``, ``Value.replace_all_uses_with``, ``Graph.remove_node``),
so a pass never has to rebuild them. Node order is the execution order; the
verifier checks that it is topological. The order is a doubly linked list (as
torch.fx keeps it) and each value's uses an insertion-ordered set, so inserting,
removing and rewiring a node cost O(1) and a pass that visits each node once
runs in linear time.

Constants (parameters, buffers, ONNX initializers) are values with ``data``: a
torch tensor shared with the model it came from, never copied.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .types import ScalarType, TensorType, Type

if TYPE_CHECKING:
    import networkx
    import onnx

    from .registry import OpDef


class Value:
    """An SSA value: a graph input, a constant, or the output of one node."""

    __slots__ = ("name", "type", "producer", "index", "data", "is_parameter", "meta", "graph", "_uses")
    _uses: dict[tuple[Node, int], None]

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
        self._uses = {}

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    def uses(self) -> list[tuple[Node, int]]:
        """(node, input index) pairs that read this value, in insertion order."""
        return list(self._uses)

    def users(self) -> list[Node]:
        """Distinct nodes that read this value."""
        return list(dict.fromkeys(n for n, _ in self._uses))

    @property
    def is_graph_output(self) -> bool:
        return self.graph is not None and any(out is self for out in self.graph.outputs)

    @property
    def sole_user(self) -> Node | None:
        """The one node that reads this value, when exactly one does and it is no graph output: a node
        a rewrite may absorb without leaving the value computed for someone else."""
        users = self.users()
        return users[0] if len(users) == 1 and not self.is_graph_output else None

    def can_be_replaced_by(self, other: Value) -> bool:
        """Whether every use of this value may read ``other`` instead.

        A graph output may only move to a value that a node produces and no other
        output holds: an emitted ONNX model names each output once, never after an
        input or an initializer.
        """
        return not self.is_graph_output or (other.producer is not None and not other.is_graph_output)

    def replace_by(self, other: Value) -> None:
        """Replace this value by ``other`` everywhere; a graph output keeps its name, so the model's
        interface is unchanged (the two values swap names)."""
        was_output = self.is_graph_output
        self.replace_all_uses_with(other)
        if was_output:
            self.name, other.name = other.name, self.name

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

    @property
    def is_trainable(self) -> bool:
        """A parameter fine-tuning could change, which passes must keep a value of its own.

        Only floating-point tensors have gradients, so integer parameters (shape and
        index tensors) are as fixed as any constant; and an ONNX model is an
        inference artifact whose initializers are all constants.
        """
        if not self.is_parameter or self.data is None or not (self.data.is_floating_point() or self.data.is_complex()):
            return False
        return self.graph is None or self.graph.meta.get("source") != "onnx"

    def same_type_as(self, other: Value) -> bool:
        """Equal dtype and equal, known shape: then ``other`` can stand for this value."""
        return isinstance(self.type, TensorType) and self.type.shape is not None and self.type == other.type

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One operation. ``op`` names an entry of the op registry."""

    __slots__ = ("op", "_inputs", "outputs", "attrs", "meta", "graph", "name", "_prev", "_next")

    def __init__(self, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None,
                 name: str = ""):
        self.op = op
        self._inputs: list[Value | None] = []
        self.outputs: list[Value] = []
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.meta: dict[str, Any] = {}
        self.graph: Graph | None = None
        self.name = name
        self._prev: Node | _Root | None = None
        self._next: Node | _Root | None = None
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
            v._uses[(self, len(self._inputs))] = None
        self._inputs.append(v)

    def replace_input(self, i: int, v: Value | None) -> None:
        old = self._inputs[i]
        if old is v:
            return
        if old is not None:
            del old._uses[(self, i)]
        if v is not None:
            v._uses[(self, i)] = None
        self._inputs[i] = v

    def set_inputs(self, inputs: Sequence[Value | None]) -> None:
        self._drop_uses()
        self._inputs = []
        for v in inputs:
            self._append_input(v)

    def _drop_uses(self) -> None:
        for i, v in enumerate(self._inputs):
            if v is not None:
                del v._uses[(self, i)]

    def users(self) -> list[Node]:
        return list(dict.fromkeys(u for out in self.outputs for u in out.users()))

    @property
    def is_pure(self) -> bool:
        """Whether this node may be removed, merged or evaluated ahead of time (its op's purity, which
        may depend on the node's attributes)."""
        opdef = self.opdef
        return opdef.pure_when(self) if opdef.pure_when is not None else opdef.pure

    @property
    def yields_host_scalars(self) -> bool:
        """Every output is a host scalar (a size query, SymInt arithmetic), none a tensor."""
        return bool(self.outputs) and all(isinstance(out.type, ScalarType) for out in self.outputs)

    @property
    def is_unused(self) -> bool:
        """No node and no graph output reads any of its outputs."""
        return not any(out._uses or out.is_graph_output for out in self.outputs)

    def __repr__(self) -> str:
        return f"<Node {self.name}: {self.op}>"


class _Root:
    """The sentinel that closes a graph's circular node list: ``_next`` is the first node, ``_prev`` the last."""

    __slots__ = ("_prev", "_next")

    def __init__(self) -> None:
        self._prev: Node | _Root = self
        self._next: Node | _Root = self


class Graph:
    """A dataflow graph with named inputs, outputs, constants and ordered nodes."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.constants: dict[str, Value] = {}
        self.meta: dict[str, Any] = {}
        self._root = _Root()
        self._count = 0
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

        ``attrs`` are checked against the op's schema: unknown names are refused,
        defaults filled in and negative dims made positive, so ``node.attrs[k]``
        holds every attribute. Output types are inferred unless given.
        """
        from .registry import get_op

        attrs = get_op(op).complete_attrs(inputs, attrs or {})
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
            self._link(node, before._prev)
        elif after is not None:
            self._link(node, after)
        else:
            self._link(node, self._root._prev)
        return node

    def remove_node(self, node: Node) -> None:
        """Detach a node whose outputs are no longer used."""
        for out in node.outputs:
            if out._uses or any(o is out for o in self.outputs):
                raise ValueError(f"cannot remove {node.name} ({node.op}): output %{out.name} is still used")
        node._drop_uses()
        node._inputs = []
        self._unlink(node)
        node.graph = None
        self._names.difference_update(out.name for out in node.outputs)

    def remove_constant(self, v: Value) -> bool:
        """Drop constant ``v`` if nothing reads it; whether it was dropped."""
        if self.constants.get(v.name) is not v or v._uses or v.is_graph_output:
            return False
        del self.constants[v.name]
        self._names.discard(v.name)
        return True

    def is_free(self, name: str) -> bool:
        """Whether no value of this graph holds ``name``."""
        return name not in self._names

    def rename(self, v: Value, name: str) -> str:
        """Give ``v`` a name derived from ``name`` that no other value of this graph holds; the name given."""
        if v.name == name:
            return name
        old = v.name
        v.name = self.unique_name(name)
        self._names.discard(old)
        if self.constants.get(old) is v:
            self.constants = {(v.name if k == old else k): c for k, c in self.constants.items()}
        return v.name

    def remove_unused_constants(self) -> int:
        used = {id(v) for n in self._walk() for v in n.inputs if v is not None}
        used |= {id(v) for v in self.outputs}
        dead = [k for k, v in self.constants.items() if id(v) not in used]
        for k in dead:
            del self.constants[k]
            self._names.discard(k)
        return len(dead)

    # ------------------------------------------------------------------ access
    @property
    def nodes(self) -> list[Node]:
        """A snapshot of the nodes in execution order (safe to mutate the graph while iterating)."""
        return list(self._walk())

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return self._count

    def find(self, op: str, nested: bool = False) -> list[Node]:
        """The nodes of ``op`` in execution order; ``nested``: also those inside the bodies of region nodes
        (any attribute that holds a graph), depth first."""
        found = []
        for n in self._walk():
            if n.op == op:
                found.append(n)
            if nested:
                for body in n.attrs.values():
                    if isinstance(body, Graph):
                        found.extend(body.find(op, nested=True))
        return found

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self._walk():
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.constants.values()
        for n in self._walk():
            yield from n.outputs

    def sort(self) -> None:
        """Reorder nodes topologically, keeping the current order where it is already valid."""
        ready = {id(v) for v in self.inputs} | {id(v) for v in self.constants.values()}
        pending = self.nodes
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
        self.reorder(ordered)

    def reorder(self, order: Sequence[Node]) -> None:
        """Put this graph's nodes in ``order`` (a permutation of them; the verifier checks it is topological)."""
        if len(order) != self._count or any(n.graph is not self for n in order):
            raise ValueError(f"reorder of graph {self.name} needs each of its {self._count} nodes once")
        self._root._prev = self._root._next = self._root
        self._count = 0
        for n in order:
            self._link(n, self._root._prev)

    # ---------------------------------------------------------- the node list
    def _link(self, node: Node, prev: Node | _Root) -> None:
        nxt = prev._next
        node._prev, node._next = prev, nxt
        prev._next = node
        nxt._prev = node
        self._count += 1

    def _unlink(self, node: Node) -> None:
        node._prev._next = node._next
        node._next._prev = node._prev
        node._prev = node._next = None
        self._count -= 1

    def _walk(self) -> Iterator[Node]:
        n = self._root._next
        while n is not self._root:
            nxt = n._next
            yield n
            n = nxt

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
        return _emitter("torch")(self)

    def to_onnx(self, **kwargs: Any) -> onnx.ModelProto:
        return _emitter("onnx")(self, **kwargs)


EMITTERS: dict[str, Callable[..., Any]] = {}
"""Emitters by format, registered by the modules above this floor (``graphopt.emitters``), so that
``Graph.to_torch()`` reads well without the IR importing what is built on it."""


def register_emitter(fmt: str, emit: Callable[..., Any]) -> None:
    EMITTERS[fmt] = emit


def _emitter(fmt: str) -> Callable[..., Any]:
    try:
        return EMITTERS[fmt]
    except KeyError:
        raise RuntimeError(f"no {fmt} emitter is registered; import graphopt (it registers them)") from None
