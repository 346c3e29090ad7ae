"""What the ONNX front end checks and converts before it imports a model.

An invalid model must fail on load with one line that says what is wrong and
where, not later with a ``KeyError`` from the importer or, worse, load and be
written back with a node silently lost. graphopt's own structural checks come
first because they name the values and nodes involved (a cycle, a value no one
produces, a value two nodes write, a negative dim); onnx's checker and strict
shape inference then catch the rest (attribute types, unknown ops, wrong
initializer sizes, inputs of the wrong type).

Models older than the opset graphopt imports are converted with onnx's version
converter, as onnxruntime and onnxslim accept them too.
"""
from __future__ import annotations

import heapq
import logging
import re

import onnx
from onnx import version_converter

from graphopt.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
# onnx's checker refuses in-memory protos past protobuf's limit; those are checked structurally only
_PROTO_LIMIT = 2**31 - 1


def node_label(node: onnx.NodeProto, index: int) -> str:
    return f"node {node.name!r} ({node.op_type})" if node.name else f"node #{index} ({node.op_type})"


# ------------------------------------------------------------ structure
def sorted_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto] | None:
    """The top graph's nodes in a topological order, None when they already are in one.

    Raises UnsupportedModelError for a value two nodes write, a value nothing
    produces, a cycle, and a graph output nothing produces.
    """
    defined = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    producer: dict[str, int] = {}
    nodes = list(graph.node)
    for i, node in enumerate(nodes):
        for name in node.output:
            if not name:
                continue
            if name in producer:
                first = producer[name]
                raise UnsupportedModelError(
                    f"value {name!r} is written by two nodes, {node_label(nodes[first], first)} and "
                    f"{node_label(node, i)}; every ONNX value needs exactly one producer")
            if name in defined:
                raise UnsupportedModelError(f"{node_label(node, i)} writes {name!r}, which is already a graph input "
                                            f"or initializer; every ONNX value needs exactly one producer")
            producer[name] = i
    reads = [[name for name in [*node.input, *outer_names(node)] if name] for node in nodes]
    for i, names in enumerate(reads):
        for name in names:
            if name not in defined and name not in producer:
                raise UnsupportedModelError(f"{node_label(nodes[i], i)} reads {name!r}, which no node, graph input "
                                            f"or initializer produces")
    for out in graph.output:
        if out.name not in defined and out.name not in producer:
            raise UnsupportedModelError(f"graph output {out.name!r} is produced by no node, graph input or "
                                        f"initializer")
    order = _topological_order(nodes, reads, producer)
    if order is None:
        raise UnsupportedModelError(f"the graph has a cycle: {_cycle(nodes, reads, producer)}; "
                                    f"an ONNX graph must be acyclic")
    if order == list(range(len(nodes))):
        return None
    return [nodes[i] for i in order]


def _topological_order(nodes: list[onnx.NodeProto], reads: list[list[str]],
                       producer: dict[str, int]) -> list[int] | None:
    """Kahn's order, smallest index first, so a sorted graph keeps its order; None on a cycle."""
    waiting = [len({producer[n] for n in names if n in producer}) for names in reads]
    users: dict[int, list[int]] = {}
    for i, names in enumerate(reads):
        for j in {producer[n] for n in names if n in producer}:
            users.setdefault(j, []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users.get(i, ()):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    return order if len(order) == len(nodes) else None


def _cycle(nodes: list[onnx.NodeProto], reads: list[list[str]], producer: dict[str, int]) -> str:
    """One cycle, as ``node -> node -> ...`` back to its start.

    Every node no topological order can place reads a value of another such
    node, so walking from one to an unplaced producer must come round.
    """
    placed: set[int] = set()
    changed = True
    while changed:
        changed = False
        for i, names in enumerate(reads):
            if i not in placed and all(producer[n] in placed for n in names if n in producer):
                placed.add(i)
                changed = True
    path = [next(i for i in range(len(nodes)) if i not in placed)]
    seen = {path[0]: 0}
    while True:
        step = next(producer[n] for n in reads[path[-1]] if n in producer and producer[n] not in placed)
        if step in seen:
            return " -> ".join(node_label(nodes[i], i) for i in [*path[seen[step]:], step])
        seen[step] = len(path)
        path.append(step)


def check_dims(graph: onnx.GraphProto) -> None:
    """Declared dims are sizes: a negative one is an error (a symbolic dim has a name)."""
    for kind, infos in (("graph input", graph.input), ("graph output", graph.output),
                        ("value", graph.value_info)):
        for vi in infos:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                for axis, d in enumerate(vi.type.tensor_type.shape.dim):
                    if d.HasField("dim_value") and d.dim_value < 0:
                        raise UnsupportedModelError(
                            f"{kind} {vi.name!r} has dim {d.dim_value} at axis {axis}; a dim is a size >= 0, "
                            f"or a name for a symbolic one")
    for t in graph.initializer:
        if any(d < 0 for d in t.dims):
            raise UnsupportedModelError(f"initializer {t.name!r} has dims {list(t.dims)}; dims are sizes >= 0")


def outer_names(n: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs read from enclosing scopes, in first-use order."""
    found: dict[str, None] = {}
    for a in n.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sub in graphs:
            for name in _free_names(sub):
                found.setdefault(name)
    return list(found)


def _free_names(g: onnx.GraphProto) -> list[str]:
    defined = {vi.name for vi in g.input} | {t.name for t in g.initializer}
    defined |= {t.values.name for t in g.sparse_initializer}
    free: dict[str, None] = {}
    for n in g.node:
        uses = [name for name in n.input if name] + outer_names(n)
        for name in uses:
            if name not in defined:
                free.setdefault(name)
        defined.update(o for o in n.output if o)
    for o in g.output:
        if o.name not in defined:
            free.setdefault(o.name)
    return list(free)


# ------------------------------------------------------------ onnx checker
def run_checker(proto: onnx.ModelProto, path: str | None = None) -> None:
    """onnx's checker and strict shape inference, as one-line UnsupportedModelErrors.

    ``path``, the file ``proto`` was read from, lets the checker read external
    data and models past protobuf's 2 GB. A shape-inference error inside the
    function body onnx expands for an op (test_mvn's MeanVarianceNormalization)
    is onnx's own and only logged.
    """
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    if path is None and (external or proto.ByteSize() > _PROTO_LIMIT):
        logger.info("model has external data or is over 2 GB in memory: onnx's checker skipped, "
                    "structural checks only")
        return
    try:
        onnx.checker.check_model(path if path is not None else proto)
    except onnx.checker.ValidationError as e:
        if not _INCOMPLETE_IO.search(str(e)):
            raise UnsupportedModelError(f"invalid ONNX model: {_one_line(e)}") from None
        _check_nodes_and_initializers(proto)
    try:
        onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as e:
        op = _failing_function_op(str(e))
        if op is not None:
            logger.info("onnx shape inference fails inside the function body of %s; not the model's fault: %s",
                        op, _one_line(e))
            return
        raise UnsupportedModelError(f"invalid ONNX model: shape inference fails: {_one_line(e)}") from None


# onnx's checker wants a full type on every graph input and output; onnxruntime and exporters do without
_INCOMPLETE_IO = re.compile(r"Field '(shape|type|elem_type)' of '(type|value_info)' is required but missing")


def _check_nodes_and_initializers(proto: onnx.ModelProto) -> None:
    """What onnx's checker checks of each node (op, attributes) and initializer, for a model whose graph
    inputs or outputs lack a full type. Nodes with subgraphs and calls of the model's own functions are
    left to onnxruntime: their checks need scopes this walk does not build."""
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = proto.ir_version
    ctx.opset_imports = {o.domain: o.version for o in proto.opset_import}
    functions = {(f.domain, f.name) for f in proto.functions}
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            try:
                onnx.checker.check_tensor(t, ctx)
            except onnx.checker.ValidationError as e:
                raise UnsupportedModelError(f"invalid ONNX model: {_one_line(e)}") from None
    for i, node in enumerate(proto.graph.node):
        subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if subgraphs or (node.domain, node.op_type) in functions:
            continue
        try:
            onnx.checker.check_node(node, ctx, onnx.checker.C.LexicalScopeContext())
        except onnx.checker.ValidationError as e:
            raise UnsupportedModelError(f"invalid ONNX model: {_one_line(e)} ({node_label(node, i)})") from None


def _failing_function_op(message: str) -> str | None:
    """The op whose function body the inference error is in, when it is in one."""
    found = re.findall(r"\(op_type:(\w+)\): \[ShapeInferenceError\] Inference error\(s\)", message)
    if not found:
        return None
    schema = _schema(found[0])
    return found[0] if schema is not None and (schema.has_function or schema.has_context_dependent_function) else None


def _schema(op_type: str) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type)
    except onnx.defs.SchemaError:
        return None


def _one_line(e: Exception) -> str:
    """onnx's multi-line messages as one line: the problem, then the node it names."""
    text = str(e).strip()
    context = re.search(r"Name: (\S*) OpType: (\S+)", text)
    problem = re.sub(r"\s+", " ", text.split("==> Context:")[0]).strip().rstrip(".")
    problem = re.sub(r"\[(ShapeInferenceError|TypeInferenceError)\] (Inference error\(s\): )?", "", problem)
    problem = re.sub(r"elem type: \((\d+)\) vs \((\d+)\)", lambda m: f"elem type: {_dtype(m.group(1))} vs "
                     f"{_dtype(m.group(2))}", problem)
    if context and "OpType:" not in problem:
        problem += f" (node {context.group(1)!r}, {context.group(2)})"
    return problem[:400]


def _dtype(number: str) -> str:
    try:
        return onnx.TensorProto.DataType.Name(int(number))
    except ValueError:
        return number


# ------------------------------------------------------------ conversion
def converted(proto: onnx.ModelProto, target: int) -> tuple[onnx.ModelProto, int | None]:
    """The model at default-domain opset ``target`` and the opset it had, None when no conversion was needed.

    Custom domains are kept as they are; the version converter only moves the
    default domain.
    """
    version = next((o.version for o in proto.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if version is None or version >= target:
        return proto, None
    try:
        result = version_converter.convert_version(proto, target)
    except Exception as e:  # the converter raises RuntimeError or its own C++ errors, with the op in the text
        raise UnsupportedModelError(f"cannot convert the model from ONNX opset {version} to {target}, the oldest "
                                    f"graphopt reads: onnx's version converter says: {_one_line(e)}") from None
    changed = _interface_change(proto.graph, result.graph)
    if changed:  # e.g. Scan-8's batch axis, which the converter drops from the declared inputs
        raise UnsupportedModelError(f"cannot convert the model from ONNX opset {version} to {target}, the oldest "
                                    f"graphopt reads: onnx's version converter changed {changed}")
    logger.info("converted the model from ONNX opset %d to %d with onnx's version converter", version, target)
    return result, version


def _interface_change(before: onnx.GraphProto, after: onnx.GraphProto) -> str | None:
    """How a conversion changed the graph's inputs or outputs (names, element types, ranks), None when it did not."""
    for kind, old, new in (("inputs", before.input, after.input), ("outputs", before.output, after.output)):
        if [vi.name for vi in old] != [vi.name for vi in new]:
            return f"the graph {kind} from {[vi.name for vi in old]} to {[vi.name for vi in new]}"
        for a, b in zip(old, new):
            ta, tb = a.type.tensor_type, b.type.tensor_type
            if ta.elem_type != tb.elem_type:
                return f"the element type of {a.name!r}{_touching(before, a.name)}"
            if ta.HasField("shape") and tb.HasField("shape") and len(ta.shape.dim) != len(tb.shape.dim):
                return (f"the rank of {a.name!r} from {len(ta.shape.dim)} to {len(tb.shape.dim)}"
                        f"{_touching(before, a.name)}")
    return None


def _touching(graph: onnx.GraphProto, name: str) -> str:
    labels = [node_label(n, i) for i, n in enumerate(graph.node) if name in n.input or name in n.output]
    return f" ({', '.join(labels[:3])})" if labels else ""
