"""The torch front end: ATen-level ``torch.fx`` graphs into the IR.

Two entry points share one node importer:

* ``capture(model, example_inputs)`` runs ``torch.export`` and lowers the program to
  core ATen, keeping a few composite ops whole (``linear``, ``matmul``, attention,
  the norms, ...) because each is one canonical IR op, and rebuilding them from
  their decompositions would be a pass's guesswork.
* ``from_fx(gm)`` imports the ATen graphs AOTAutograd hands a ``torch.compile``
  backend, where parameters are ordinary inputs.

ATen ops in ``aten_table.TABLE`` become canonical ops; every other call (and
every argument form the canonical op cannot express) becomes ``torch.opaque``,
which keeps the original callable, so capture never fails on an unknown op.
Output types come from the fake values torch recorded on each fx node.
"""
from __future__ import annotations

import inspect
import operator
from collections.abc import Sequence
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, OutputKind

from .. import _torch_private
from ..errors import GraphoptError, InvalidOptionError, UnsupportedModelError
from ..ir import Graph, OpaqueType, ScalarType, TensorType, Type, Value, get_op
from ..ir.ops.opaque import Arg
from .aten_table import TABLE, NotCanonical

aten = torch.ops.aten

# Composite ops kept whole by capture: each maps to one canonical op.
PRESERVED_COMPOSITES = (
    aten.linear.default, aten.matmul.default, aten.einsum.default, aten.scaled_dot_product_attention.default,
    aten.layer_norm.default, aten.group_norm.default, aten.rms_norm.default, aten.softmax.int,
    aten.log_softmax.int, aten.silu.default, aten.mish.default, aten.hardswish.default, aten.hardsigmoid.default,
    aten.softplus.default, aten.celu.default, aten.selu.default, aten.roll.default, aten.tril.default,
    aten.triu.default, aten.upsample_bicubic2d.vec, aten._upsample_nearest_exact2d.vec,
    aten.upsample_linear1d.vec, aten.adaptive_avg_pool2d.default,
)

# Runtime shape guards: the IR types already say what they check.
_RUNTIME_CHECKS = {
    aten._assert_scalar.default, aten._assert_tensor_metadata.default, aten.sym_constrain_range_for_size.default,
    aten.sym_constrain_range.default, aten._assert_async.msg,
}

# Host-side integer arithmetic that is dead once the shapes it fed became static attributes.
_SYMBOLIC_TARGETS = (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
                     aten.sym_storage_offset.default)


def decomposition_table() -> Any:
    """Core ATen decompositions minus the composites in ``PRESERVED_COMPOSITES``."""
    table = torch.export.default_decompositions()
    for op in PRESERVED_COMPOSITES:
        table.pop(op, None)
    return table


# ------------------------------------------------------------------ capture
def capture(model: torch.nn.Module, example_inputs: Sequence[Any], dynamic: dict | None = None) -> Graph:
    """Export ``model`` on ``example_inputs`` and import the core-ATen program.

    ``dynamic`` maps an input (its position, or its ``forward`` parameter name) to
    ``{dim: symbol name}``; one name used on several inputs is one symbol. Those
    dims become symbolic (``"batch"``, ``"2*batch"``) in the IR types. A name
    ending in ``?`` (``"batch?"``) asks for a dim that is symbolic where the
    program allows it and static where it does not (``torch.export.Dim.AUTO``):
    the dims export finds equal to the first such dim are named ``batch``.
    Parameters, buffers and lifted constants become graph constants that share the
    model's tensors. Buffer and input mutations are not part of the graph: capture
    is for inference.
    """
    if not isinstance(model, torch.nn.Module):
        raise InvalidOptionError(f"capture takes an nn.Module, got {type(model).__name__}; "
                                 f"wrap a function in an nn.Module whose forward calls it")
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, Sequence):
        raise InvalidOptionError(f"example_inputs is a sequence of the forward's arguments, got "
                                 f"{type(example_inputs).__name__}; pass (x,) for one tensor")
    args = tuple(example_inputs)
    dynamic_shapes, names = _dynamic_shapes(model, args, dynamic or {})
    try:
        program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    except Exception as e:
        user_error = _capture_error(model, args, e)
        if user_error is None:
            raise
        raise user_error from e
    program = program.run_decompositions(decomposition_table())
    graph = _ExportImporter(program, names, type(model).__name__).run()
    _note_device(graph, args)
    return graph


def _capture_error(model: torch.nn.Module, args: tuple, error: Exception) -> GraphoptError | None:
    """The user error behind a failed ``torch.export``, or None where it is not one of those (a bug to show).

    Known user problems: control flow or shapes that depend on tensor values, a dynamic-shape
    spec the model contradicts, and example inputs the model itself fails on (checked by
    running it eagerly, its buffers restored after).
    """
    name = type(model).__name__
    kind = _torch_private.export_failure_kind(error)
    reason = _first_line(error)
    if kind == "data-dependent":
        return UnsupportedModelError(
            f"torch.export cannot capture data-dependent control flow or shapes in {name} ({reason}); "
            f"compile it with torch.compile(model, backend=\"graphopt\"), which splits the graph there, "
            f"or rewrite the branch with torch.cond")
    if kind == "export":
        return UnsupportedModelError(f"torch.export cannot capture {name}: {reason}")
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.no_grad():
            model(*args)
    except Exception as eager:
        return InvalidOptionError(f"{name} fails on the example inputs ({type(eager).__name__}: "
                                  f"{_first_line(eager)}); pass example_inputs its forward accepts, "
                                  f"in the order of its parameters")
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _note_device(graph: Graph, example_inputs: Sequence[Any]) -> None:
    """Record where the example inputs live (``graph.meta["device"]``): where lowered kernels must run."""
    tensors = [x for x in _torch_private.tree_flatten(list(example_inputs))[0] if isinstance(x, torch.Tensor)]
    if tensors:
        graph.meta["device"] = str(tensors[0].device)


def _dynamic_shapes(model: torch.nn.Module, args: tuple, dynamic: dict) -> tuple[tuple | None, dict[int, dict]]:
    """torch.export ``dynamic_shapes`` for ``dynamic``, and the same spec keyed by input position."""
    if not dynamic:
        return None, {}
    params = list(inspect.signature(model.forward).parameters)
    by_position: dict[int, dict[int, str]] = {}
    for key, dims in dynamic.items():
        if isinstance(key, str) and key not in params:
            raise InvalidOptionError(f"dynamic names {key!r}, which is not a parameter of "
                                     f"{type(model).__name__}.forward ({', '.join(params)})")
        position = params.index(key) if isinstance(key, str) else key
        if not isinstance(position, int) or not 0 <= position < len(args):
            raise InvalidOptionError(f"dynamic key {key!r} is not an input: use a position below {len(args)} "
                                     f"or a parameter name of forward")
        if not isinstance(dims, dict) or not all(isinstance(d, int) and isinstance(n, str) for d, n in dims.items()):
            raise InvalidOptionError(f"dynamic[{key!r}] maps dims to symbol names, e.g. {{0: 'batch'}}; got {dims!r}")
        rank = args[position].dim() if isinstance(args[position], torch.Tensor) else 0
        if not all(0 <= d < rank for d in dims):
            raise InvalidOptionError(f"dynamic[{key!r}] names dims {sorted(dims)}, but that input has rank {rank}")
        by_position[position] = dict(dims)
    symbols = {name: torch.export.Dim.AUTO if name.endswith("?") else torch.export.Dim(name)
               for dims in by_position.values() for name in dims.values()}
    shapes = tuple({d: symbols[name] for d, name in by_position[k].items()} if k in by_position else None
                   for k in range(len(args)))
    kinds = [p.kind for p in inspect.signature(model.forward).parameters.values()]
    if kinds and kinds[0] is inspect.Parameter.VAR_POSITIONAL:
        shapes = (shapes,)  # forward(*args): torch.export wants the spec nested like the arguments
    return shapes, by_position


class _ExportImporter:
    def __init__(self, program: torch.export.ExportedProgram, dynamic: dict[int, dict[int, str]], name: str):
        self.program = program
        self.dynamic = dynamic
        self.graph = Graph(name)

    def run(self) -> Graph:
        program, graph = self.program, self.graph
        importer = FxImporter(graph, program.graph_module)
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
        specs = program.graph_signature.input_specs
        importer.symbol_names = self._symbol_names(
            [n for n, spec in zip(placeholders, specs) if spec.kind == InputKind.USER_INPUT])
        for node, spec in zip(placeholders, specs):
            if spec.kind == InputKind.USER_INPUT:
                importer.add_input(node)
            else:
                importer.env[node] = self._lifted(spec)
        for node in program.graph.nodes:
            if node.op in ("call_function", "get_attr"):
                importer.convert(node)
        output = next(n for n in program.graph.nodes if n.op == "output")
        user_outputs = [arg for arg, spec in zip(output.args[0], program.graph_signature.output_specs)
                        if spec.kind == OutputKind.USER_OUTPUT]
        importer.set_outputs(user_outputs)
        importer.finish()
        graph.meta["source"] = "torch"
        graph.meta["torch"] = {"in_spec": program.call_spec.in_spec, "out_spec": program.call_spec.out_spec,
                               **graph.meta.get("torch", {})}
        return graph

    def _lifted(self, spec: Any) -> Any:
        """The graph constant (or custom object) behind a lifted placeholder; the tensor is shared."""
        program = self.program
        if spec.kind == InputKind.PARAMETER:
            return self.graph.add_constant(program.state_dict[spec.target], spec.target, parameter=True)
        if spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            data = program.state_dict.get(spec.target)
            if data is None:
                data = program.constants[spec.target]
            return self.graph.add_constant(data, spec.target)
        return program.constants.get(spec.target)

    def _symbol_names(self, user_inputs: list[fx.Node]) -> dict[Any, Any]:
        """Map export's symbols (``s0``) to the names the user gave them (``batch``)."""
        names: dict[Any, Any] = {}
        for position, dims in self.dynamic.items():
            if position >= len(user_inputs):
                continue
            val = user_inputs[position].meta.get("val")
            for d, name in dims.items():
                if isinstance(val, torch.Tensor) and isinstance(val.shape[d], torch.SymInt):
                    expr = _torch_private.sym_expr(val.shape[d])
                    named = sympy.Symbol(name.rstrip("?"))
                    if isinstance(expr, sympy.Symbol) and expr not in names and named not in names.values():
                        names[expr] = named  # an automatic dim export kept apart keeps export's name
        return names


# ------------------------------------------------------------------ from_fx
def from_fx(gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None,
            constants: dict[int, torch.Tensor] | None = None) -> Graph:
    """Import an ATen-level fx graph (AOTAutograd's): placeholders are the graph inputs.

    Types come from ``node.meta["val"]``; a graph without them is first run on fake
    copies of ``example_inputs``. The output structure (a tuple, a list, ``None``
    entries) is kept in ``graph.meta["torch"]["out_spec"]``. ``constants`` maps
    placeholder positions to the tensors they always receive (frozen parameters):
    those become graph constants instead of inputs.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs is not None and any("val" not in n.meta for n in placeholders):
        _torch_private.propagate_fake_values(gm, example_inputs)
    graph = Graph(type(gm).__name__)
    importer = FxImporter(graph, gm)
    constants = constants or {}
    for k, node in enumerate(placeholders):
        if k in constants:
            importer.env[node] = graph.add_constant(constants[k], node.name, parameter=True)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node not in importer.env:
                importer.add_input(node)
        elif node.op in ("call_function", "get_attr"):
            importer.convert(node)
        elif node.op == "output":
            leaves, spec = _torch_private.tree_flatten(node.args[0])
            importer.set_outputs(leaves)
            graph.meta["torch"] = {"in_spec": None, "out_spec": spec, **graph.meta.get("torch", {})}
        else:
            raise NotImplementedError(f"from_fx: {node.op} nodes ({node.name}) are not ATen-level")
    importer.finish()
    graph.meta["source"] = "torch"
    if example_inputs is not None:
        _note_device(graph, example_inputs)
    return graph


# ------------------------------------------------------------ node importer
class FxImporter:
    """Converts fx nodes one at a time into ``graph``; ``env`` maps each fx node to what it became.

    An env entry is a ``Value``, a list of values (a node with several results;
    ``None`` for results the canonical op does not produce), or a Python object
    (a submodule of a higher-order op, a custom object) that opaque calls receive as is.
    """

    def __init__(self, graph: Graph, module: torch.nn.Module | None = None):
        self.graph = graph
        self.module = module
        self.env: dict[fx.Node, Any] = {}
        self.symbol_names: dict[Any, Any] = {}

    # ----------------------------------------------------------------- types
    def dim(self, d: Any) -> int | str:
        if isinstance(d, int):
            return d
        expr = _torch_private.sym_expr(d)
        if expr.is_number:
            return int(expr)
        return str(expr.xreplace(self.symbol_names))

    def type_of(self, val: Any) -> Type:
        if isinstance(val, torch.Tensor):
            return TensorType(val.dtype, tuple(self.dim(d) for d in val.shape))
        if isinstance(val, (bool, torch.SymBool)):
            return ScalarType(torch.bool)
        if isinstance(val, (int, torch.SymInt)):
            return ScalarType(torch.int64)
        if isinstance(val, (float, torch.SymFloat)):
            return ScalarType(torch.float64)
        return OpaqueType(type(val).__name__)

    def value(self, node: fx.Node) -> Any:
        return self.env[node]

    # ------------------------------------------------------- graph interface
    def add_input(self, node: fx.Node) -> None:
        self.env[node] = self.graph.add_input(node.name, self.type_of(node.meta.get("val")))

    def set_outputs(self, args: Sequence[Any]) -> None:
        """Graph outputs from fx output leaves; literal leaves (``None``, numbers) are kept in the meta."""
        literals = {}
        for k, arg in enumerate(args):
            if isinstance(arg, fx.Node):
                self.graph.outputs.append(self.env[arg])
            else:
                literals[k] = arg
        if literals:
            self.graph.meta.setdefault("torch", {})["out_literals"] = literals

    def finish(self) -> None:
        _drop_dead_symbolic_nodes(self.graph)

    def convert(self, node: fx.Node) -> None:
        if node.op == "get_attr":
            self._get_attr(node)
        elif node.target is operator.getitem:
            self._getitem(node)
        elif node.target in _RUNTIME_CHECKS:
            return
        elif not (node.target in TABLE and self._canonical(node)):
            self._opaque(node)

    def _get_attr(self, node: fx.Node) -> None:
        obj = self.module
        for name in node.target.split("."):
            obj = getattr(obj, name)
        if isinstance(obj, torch.Tensor):
            obj = self.graph.add_constant(obj, node.target, parameter=isinstance(obj, torch.nn.Parameter))
        self.env[node] = obj

    def _getitem(self, node: fx.Node) -> None:
        source, index = node.args
        entry = self.env[source]
        if isinstance(entry, list) and isinstance(index, int):
            self.env[node] = entry[index]
        else:
            self._opaque(node)

    def _canonical(self, node: fx.Node) -> bool:
        """Run the table's handler; on ``NotCanonical`` undo what it built and report failure."""
        node_count, constants = len(self.graph), set(self.graph.constants)
        try:
            result = TABLE[node.target](NodeContext(self, node), bind_arguments(node))
        except NotCanonical:
            for created in reversed(self.graph.nodes[node_count:]):
                self.graph.remove_node(created)
            for name in set(self.graph.constants) - constants:
                del self.graph.constants[name]
            return False
        is_sequence = isinstance(node.meta.get("val"), (list, tuple))
        self.env[node] = [result] if is_sequence and isinstance(result, Value) else result
        return True

    def _opaque(self, node: fx.Node) -> None:
        inputs: list[Value] = []
        positions: dict[int, int] = {}

        def template(a: Any) -> Any:
            if isinstance(a, fx.Node):
                entry = self.env[a]
                if isinstance(entry, list):
                    return tuple(template_value(e) for e in entry)
                return template_value(entry)
            if isinstance(a, (list, tuple)):
                return type(a)(template(x) for x in a)
            if isinstance(a, dict):
                return {k: template(x) for k, x in a.items()}
            return a

        def template_value(entry: Any) -> Any:
            if not isinstance(entry, Value):
                return entry
            if id(entry) not in positions:
                positions[id(entry)] = len(inputs)
                inputs.append(entry)
            return Arg(positions[id(entry)])

        attrs: dict[str, Any] = {"target": node.target, "args": template(tuple(node.args)),
                                 "kwargs": template(dict(node.kwargs))}
        val = node.meta.get("val")
        several = isinstance(val, (list, tuple)) and len(val) != 1
        types = [self.type_of(v) for v in val] if several else [self.type_of(val)]
        if several:
            attrs["num_outputs"] = len(types)
        ir_node = self.graph.add_node("torch.opaque", inputs, attrs, output_types=types, name=node.name,
                                      meta=source_meta(node))
        self.env[node] = list(ir_node.outputs) if several else ir_node.output


def bind_arguments(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    args, kwargs = node.args, node.kwargs
    bound: dict[str, Any] = {}
    for k, arg in enumerate(_torch_private.schema_arguments(node.target)):
        if k < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[k]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


def source_meta(node: fx.Node) -> dict[str, Any]:
    """Where an IR node came from: the ATen target, the nn.Module path, the Python stack."""
    target = node.target
    meta: dict[str, Any] = {"source": str(target) if _torch_private.is_op_overload(target)
                            else getattr(target, "__name__", str(target))}
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        meta["module"] = path
    if node.meta.get("stack_trace"):
        meta["stack_trace"] = node.meta["stack_trace"]
    return meta


def _drop_dead_symbolic_nodes(graph: Graph) -> None:
    """Remove unused host-integer computations (``sym_size``, SymInt arithmetic) left by static mappings."""
    for node in reversed(graph.nodes):
        if (node.op == "torch.opaque" and all(isinstance(o.type, ScalarType) and not o.uses()
                                              and o not in graph.outputs for o in node.outputs)
                and _is_symbolic_target(node.attrs["target"])):
            graph.remove_node(node)


def _is_symbolic_target(target: Any) -> bool:
    return target in _SYMBOLIC_TARGETS or getattr(target, "__module__", None) in ("_operator", "operator", "math")


# ------------------------------------------------------------ handler context
class NodeContext:
    """What a conversion handler of ``aten_table`` sees of one fx node (see that module's docstring)."""

    def __init__(self, importer: FxImporter, node: fx.Node):
        self.importer = importer
        self.graph = importer.graph
        self.node = node
        self.val = node.meta.get("val")
        _, self.target_name, self.overload_name = str(node.target).split(".")
        if self.val is None:
            raise NotCanonical

    # ----------------------------------------------------------- operands
    def tensor(self, arg: Any) -> Value:
        if not isinstance(arg, fx.Node):
            raise NotCanonical
        v = self.importer.value(arg)
        if not isinstance(v, Value) or not isinstance(v.type, TensorType) or v.type.shape is None:
            raise NotCanonical
        return v

    def optional(self, arg: Any) -> Value | None:
        return None if arg is None else self.tensor(arg)

    def tensors(self, args: Sequence[Any]) -> list[Value]:
        return [self.tensor(a) for a in args]

    def operands(self, *args: Any) -> list[Value]:
        """Tensors as they are, Python scalars as 0-d constants that promote as the scalar did."""
        tensors = {k: self.tensor(a) for k, a in enumerate(args) if isinstance(a, fx.Node)}
        like = next(iter(tensors.values()), None)
        return [tensors[k] if k in tensors else self.scalar(a, like=like) for k, a in enumerate(args)]

    def scalar(self, value: Any, like: Value | None = None, dtype: torch.dtype | None = None) -> Value:
        """A 0-d constant for a Python scalar operand.

        Next to a tensor of dtype D it takes ``result_type(D, value)``: D itself when
        the scalar's kind (bool < int < float) does not exceed D's, else the default
        dtype of that kind; either way the node's result dtype is torch's.
        """
        value = self.number(value)
        if dtype is None:
            dtype = (self.out_dtype if like is None
                     else torch.result_type(torch.empty((), dtype=like.type.dtype), value))
        try:
            data = torch.tensor(value, dtype=dtype)
        except (RuntimeError, OverflowError):
            raise NotCanonical from None
        return self.graph.add_constant(data, f"{self.node.name}_scalar")

    def number(self, arg: Any) -> int | float | bool:
        if not isinstance(arg, (int, float, bool)):
            raise NotCanonical
        return arg

    def ints(self, arg: Any) -> list[int]:
        values = list(arg)
        if not all(isinstance(v, int) for v in values):
            raise NotCanonical
        return values

    # ------------------------------------------------------- symbolic sizes
    def _dim_of(self, arg: fx.Node) -> int | str:
        val = arg.meta.get("val")
        if not isinstance(val, (int, torch.SymInt)):
            raise NotCanonical
        return self.importer.dim(val)

    def shape(self, arg: Sequence[Any]) -> list[int]:
        """A reshape target: one symbolic entry is inferred (-1) from the others."""
        symbolic = [k for k, s in enumerate(arg) if not isinstance(s, int)]
        if not symbolic:
            return list(arg)
        if len(symbolic) > 1 or -1 in arg:
            raise NotCanonical
        return [-1 if k == symbolic[0] else s for k, s in enumerate(arg)]

    def expand_shape(self, x: Value, arg: Sequence[Any]) -> list[int]:
        """An expand target: a symbolic entry equal to the input's own dim becomes -1 (keep)."""
        offset = len(arg) - x.type.rank
        shape = []
        for k, s in enumerate(arg):
            if isinstance(s, int):
                shape.append(s)
            elif k >= offset and self._dim_of(s) == x.type.shape[k - offset]:
                shape.append(-1)
            else:
                raise NotCanonical
        return shape

    def end_index(self, x: Value, dim: int, arg: Any) -> int:
        """A slice end; a symbolic end equal to the dim's size means 'to the end'."""
        if arg is None:
            return 2**63 - 1
        if isinstance(arg, int):
            return arg
        if isinstance(arg, fx.Node) and self._dim_of(arg) == x.type.shape[dim]:
            return 2**63 - 1
        raise NotCanonical

    # ----------------------------------------------------------------- facts
    @property
    def out_dtype(self) -> torch.dtype:
        first = self.val[0] if isinstance(self.val, (list, tuple)) else self.val
        return first.dtype

    @property
    def on_cpu(self) -> bool:
        first = self.val[0] if isinstance(self.val, (list, tuple)) else self.val
        return first.device.type == "cpu"

    def device_of(self, arg: fx.Node) -> torch.device:
        return arg.meta["val"].device

    def producer_of(self, value: Value) -> Any:
        return value.producer

    def only_first_output(self) -> None:
        """Require that only result 0 of a multi-result op is read (the others are training state)."""
        if not isinstance(self.val, (list, tuple)):
            return
        for user in self.node.users:
            if user.target is not operator.getitem or user.args[1] != 0:
                raise NotCanonical

    # ------------------------------------------------------------------ emit
    def emit(self, op: str, inputs: Sequence[Value | None], **attrs: Any) -> Value | list[Value]:
        """The node that stands for the fx node; its types are the fx node's fake values."""
        vals = list(self.val) if isinstance(self.val, (list, tuple)) else [self.val]
        count = get_op(op).output_count(attrs)
        if count > len(vals):
            raise NotCanonical
        types = [self.importer.type_of(v) for v in vals[:count]]
        node = self.graph.add_node(op, inputs, attrs, output_types=types, name=op, meta=source_meta(self.node))
        if len(node.outputs) == 1 and not isinstance(self.val, (list, tuple)):
            return node.output
        return list(node.outputs)

    def inner(self, op: str, inputs: Sequence[Value | None], **attrs: Any) -> Value:
        """An intermediate node of a multi-node mapping, typed by inference."""
        return self.graph.add_node(op, inputs, attrs, name=op, meta=source_meta(self.node)).output
