"""ONNX front end: an ONNX ``ModelProto`` into the IR (older opsets converted to 13 first).

Each ONNX node becomes canonical IR ops when its attributes and inputs fit a
canonical op exactly (the table in ``onnx_table``); anything else becomes an
``onnx.opaque`` node that carries the NodeProto verbatim and runs through
onnxruntime, so every model loads, executes and round-trips.

A canonical mapping is checked before it is kept: the IR's own type inference
of the new node must agree with ONNX shape inference, else the node stays opaque.
"""
from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from graphopt.errors import UnsupportedModelError
from graphopt.ir import Graph, Node, OpaqueType, OpDef, TensorType, Type, Value, get_op, register_op
from graphopt.ir.registry import OPS

from . import onnx_checks as checks
from .onnx_checks import DEFAULT_DOMAINS, outer_names

MIN_OPSET = 13

# ------------------------------------------------------------------ dtypes
_P = onnx.TensorProto
ONNX_TO_TORCH: dict[int, torch.dtype] = {
    _P.FLOAT: torch.float32, _P.DOUBLE: torch.float64, _P.FLOAT16: torch.float16, _P.BFLOAT16: torch.bfloat16,
    _P.INT8: torch.int8, _P.INT16: torch.int16, _P.INT32: torch.int32, _P.INT64: torch.int64,
    _P.UINT8: torch.uint8, _P.UINT16: torch.uint16, _P.UINT32: torch.uint32, _P.UINT64: torch.uint64,
    _P.BOOL: torch.bool, _P.COMPLEX64: torch.complex64, _P.COMPLEX128: torch.complex128,
    _P.FLOAT8E4M3FN: torch.float8_e4m3fn, _P.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    _P.FLOAT8E5M2: torch.float8_e5m2, _P.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
    _P.FLOAT8E8M0: torch.float8_e8m0fnu,
}
TORCH_TO_ONNX: dict[torch.dtype, int] = {t: o for o, t in ONNX_TO_TORCH.items()}
# dtypes canonical ops are mapped for: torch implements every op on them
CANONICAL_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16,
                              torch.int32, torch.int64, torch.uint8, torch.bool})


def tensor_to_torch(proto: onnx.TensorProto, base_dir: str | None = None) -> torch.Tensor:
    """An ONNX tensor as a torch tensor; dtypes numpy lacks travel as raw bits."""
    dtype = ONNX_TO_TORCH.get(proto.data_type)
    if dtype is None:
        raise TypeError(f"tensor {proto.name!r}: ONNX dtype {_P.DataType.Name(proto.data_type)} has no torch dtype")
    array = numpy_helper.to_array(proto, base_dir or "")
    if array.dtype.kind in "biufc" and array.dtype.type.__module__ == "numpy":
        return _from_numpy(array)
    return _from_numpy(array.view(f"uint{array.dtype.itemsize * 8}")).view(dtype)


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """A torch copy with ordinary strides (numpy gives empty arrays zero strides)."""
    t = torch.from_numpy(np.array(a, copy=True, order="C"))
    return torch.empty(t.shape, dtype=t.dtype) if t.numel() == 0 else t


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy array for onnxruntime; bfloat16 and float8 become ml_dtypes arrays."""
    t = t.detach().cpu().contiguous()
    if t.dtype in _ML_DTYPES:
        import ml_dtypes

        bits = t.view(torch.uint16 if t.element_size() == 2 else torch.uint8).numpy()
        return bits.view(getattr(ml_dtypes, _ML_DTYPES[t.dtype]))
    return t.numpy()


def numpy_to_torch(a: Any) -> Any:
    if isinstance(a, list):
        return [numpy_to_torch(x) for x in a]
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "biufcV":
        return a
    if a.dtype.type.__module__ != "numpy":  # ml_dtypes
        name = a.dtype.name
        dtype = next(t for t, n in _ML_DTYPES.items() if n == name)
        return _from_numpy(a.view(f"uint{a.dtype.itemsize * 8}")).view(dtype)
    return _from_numpy(a)


_ML_DTYPES = {torch.bfloat16: "bfloat16", torch.float8_e4m3fn: "float8_e4m3fn",
              torch.float8_e4m3fnuz: "float8_e4m3fnuz", torch.float8_e5m2: "float8_e5m2",
              torch.float8_e5m2fnuz: "float8_e5m2fnuz", torch.float8_e8m0fnu: "float8_e8m0fnu"}


def onnx_type_to_ir(tp: onnx.TypeProto | None, fresh_dim: Any) -> Type | None:
    """IR type of an ONNX TypeProto; None when ONNX does not know the element type."""
    if tp is None or not tp.HasField("tensor_type"):
        if tp is not None and tp.WhichOneof("value") is not None:
            return OpaqueType(f"onnx:{onnx.helper.printable_type(tp)}")
        return None
    tt = tp.tensor_type
    if tt.elem_type == 0:
        return None
    dtype = ONNX_TO_TORCH.get(tt.elem_type)
    if dtype is None:
        return OpaqueType(f"onnx:{onnx.helper.printable_type(tp)}")
    if not tt.HasField("shape"):
        return TensorType(dtype, None)
    dims: list[int | str] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(fresh_dim())
    return TensorType(dtype, tuple(dims))


# ------------------------------------------------------------ onnx.opaque
_SESSIONS: OrderedDict[tuple, Any] = OrderedDict()
_SESSION_CACHE_SIZE = 256


def _single_node_model(node_bytes: bytes, input_types: Sequence[onnx.TypeProto | None], implicit: Sequence[str],
                       implicit_types: Sequence[onnx.TypeProto], opsets: tuple, functions: tuple,
                       ir_version: int) -> onnx.ModelProto:
    """A one-node model: inputs ``in{i}``, outer-scope names kept, outputs ``out{k}``."""
    node = onnx.NodeProto.FromString(node_bytes)
    names = [f"in{i}" if t is not None else "" for i, t in enumerate(input_types)]
    del node.input[:]
    node.input.extend(names)
    outs = [f"out{k}" if o else "" for k, o in enumerate(node.output)]
    del node.output[:]
    node.output.extend(outs)
    graph = onnx.helper.make_graph(
        [node], "single",
        [onnx.helper.make_value_info(n, t) for n, t in zip(names, input_types) if t is not None]
        + [onnx.helper.make_value_info(n, t) for n, t in zip(implicit, implicit_types)],
        [onnx.ValueInfoProto(name=o) for o in outs if o])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets],
                                   functions=[onnx.FunctionProto.FromString(f) for f in functions])
    model.ir_version = ir_version
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {vi.name: vi for vi in inferred.graph.value_info}
    for out in model.graph.output:
        if out.name in known:
            out.type.CopyFrom(known[out.name].type)
    return model


def runtime_type_proto(x: Any) -> onnx.TypeProto:
    """The ONNX type of a runtime value (torch tensor, numpy array, list for sequences)."""
    if isinstance(x, torch.Tensor):
        return onnx.helper.make_tensor_type_proto(TORCH_TO_ONNX[x.dtype], list(x.shape))
    if isinstance(x, np.ndarray):
        elem = _P.STRING if x.dtype.kind in "OUS" else onnx.helper.np_dtype_to_tensor_dtype(x.dtype)
        return onnx.helper.make_tensor_type_proto(elem, list(x.shape))
    if isinstance(x, list):
        inner = runtime_type_proto(x[0]) if x else onnx.helper.make_tensor_type_proto(_P.FLOAT, None)
        return onnx.helper.make_sequence_type_proto(inner)
    raise TypeError(f"onnx.opaque cannot pass a {type(x).__name__} to onnxruntime")


def _to_ort(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch_to_numpy(x)
    if isinstance(x, list):
        return [_to_ort(e) for e in x]
    return x


def onnx_opaque(*inputs: Any, node: bytes, domain: str = "", op_type: str = "", implicit: tuple = (),
                opsets: tuple = (), functions: tuple = (), ir_version: int = 8) -> Any:
    """Run one ONNX node in onnxruntime (CPU, one thread); inputs after the node's own are outer-scope values."""
    num_own = len(inputs) - len(implicit)
    own, outer = inputs[:num_own], inputs[num_own:]
    if any(isinstance(x, torch.Tensor) and x.device.type == "meta" for x in inputs):
        raise TypeError(f"onnx.opaque {op_type}: types come from ONNX shape inference, not meta tensors")
    types = [None if x is None else runtime_type_proto(x) for x in own]
    outer_types = [runtime_type_proto(x) for x in outer]
    key = (node, tuple(None if t is None else t.SerializeToString() for t in types),
           tuple(t.SerializeToString() for t in outer_types), opsets)
    session = _SESSIONS.get(key)
    if session is None:
        from graphopt.backends._onnxruntime import inference_session

        model = _single_node_model(node, types, implicit, outer_types, opsets, functions, ir_version)
        session = inference_session(model, threads=1, inter_op_threads=1, log_severity=3)
        _SESSIONS[key] = session
        if len(_SESSIONS) > _SESSION_CACHE_SIZE:
            _SESSIONS.popitem(last=False)
    else:
        _SESSIONS.move_to_end(key)
    feeds = {f"in{i}": _to_ort(x) for i, x in enumerate(own) if x is not None}
    feeds.update({name: _to_ort(x) for name, x in zip(implicit, outer)})
    results = [numpy_to_torch(r) for r in session.run(None, feeds)]
    return results[0] if len(results) == 1 else tuple(results)


def _opaque_infer(node: Node) -> list[Type]:
    """Output types of an onnx.opaque node from ONNX shape inference on its one-node model."""
    proto = onnx.NodeProto.FromString(node.attrs["node"])
    num_own = len(node.inputs) - len(node.attrs.get("implicit", ()))
    types = [None if v is None else ir_type_to_onnx(v) for v in node.inputs[:num_own]]
    outer = [ir_type_to_onnx(v) for v in node.inputs[num_own:]]
    model = _single_node_model(node.attrs["node"], types, node.attrs.get("implicit", ()), outer,
                               node.attrs.get("opsets", ()), node.attrs.get("functions", ()),
                               node.attrs.get("ir_version", 8))
    counter = itertools.count()
    found = {o.name: o.type for o in model.graph.output}
    result = []
    for k, name in enumerate(proto.output):
        t = onnx_type_to_ir(found.get(f"out{k}"), lambda: f"_u{next(counter)}")
        result.append(t if t is not None else OpaqueType("onnx:unknown"))
    return result


def ir_type_to_onnx(v: Value) -> onnx.TypeProto:
    """The ONNX type of an IR value (ONNX-only types were kept in ``meta['onnx_type']``)."""
    if "onnx_type" in v.meta:
        return onnx.TypeProto.FromString(v.meta["onnx_type"])
    t = v.type
    if isinstance(t, TensorType):
        if t.dtype not in TORCH_TO_ONNX:
            raise TypeError(f"%{v.name}: dtype {t.dtype} has no ONNX equivalent")
        shape = None if t.shape is None else [d if isinstance(d, int) else str(d) for d in t.shape]
        return onnx.helper.make_tensor_type_proto(TORCH_TO_ONNX[t.dtype], shape)
    raise TypeError(f"%{v.name}: type {t} has no ONNX equivalent")


_IMPURE_ONNX_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                              "Multinomial", "Bernoulli", "Dropout", "If", "Loop", "Scan"})
"""Standard ONNX ops that draw random numbers or run subgraphs; every other one is a function of its inputs."""


def _opaque_is_pure(node: Node) -> bool:
    """A standard ONNX op that neither draws random numbers nor runs a subgraph; custom domains are not trusted."""
    return node.attrs["domain"] in ("", "ai.onnx") and node.attrs["op_type"] not in _IMPURE_ONNX_OPS


if "onnx.opaque" not in OPS:
    register_op(OpDef("onnx.opaque", onnx_opaque, category="opaque", pure=False, pure_when=_opaque_is_pure,
                      infer=_opaque_infer,
                      num_outputs=lambda attrs: len(onnx.NodeProto.FromString(attrs["node"]).output),
                      doc=onnx_opaque.__doc__ or ""))


# ----------------------------------------------------------------- loading
def load_onnx(model: str | os.PathLike | bytes | onnx.ModelProto) -> Graph:
    """Load an ONNX model into the IR, checking it first and converting opsets before 13 to 13.

    An invalid model raises UnsupportedModelError naming the defect and where it is.
    """
    proto, base_dir = _read_model(model)
    checks.check_dims(proto.graph)
    order = checks.sorted_nodes(proto.graph)
    if order is not None:  # onnxruntime sorts an unsorted graph too; the importer needs the order
        proto = _copy(proto)
        del proto.graph.node[:]
        proto.graph.node.extend(order)
    from_file = base_dir is not None and order is None  # the file is what the checker should read
    checks.run_checker(proto, os.fspath(model) if from_file else None)
    proto, converted_from = checks.converted(proto, MIN_OPSET)
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in proto.opset_import}
    if base_dir is not None:
        onnx.external_data_helper.load_external_data_for_model(proto, base_dir)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # inference is advisory: a model it rejects still loads, with fewer known types
        inferred = proto
    graph = _Importer(proto, inferred, opsets).run()
    if converted_from is not None:
        graph.meta["onnx"]["converted_from_opset"] = converted_from
    return graph


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _read_model(model: Any) -> tuple[onnx.ModelProto, str | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    if isinstance(model, (bytes, bytearray)):
        try:
            return onnx.ModelProto.FromString(bytes(model)), None
        except Exception as e:
            raise UnsupportedModelError(f"not a valid ONNX model: {e}") from None
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UnsupportedModelError(f"{path} is not a valid ONNX model: {str(e).splitlines()[0] if str(e) else e}") from None
    if not proto.graph.node and not proto.graph.output:
        raise UnsupportedModelError(f"{path} is not a valid ONNX model: it has an empty graph")
    return proto, str(path.parent)


class _Importer:
    """Walks the ONNX graph in order, keeping an environment from ONNX names to IR values."""

    def __init__(self, proto: onnx.ModelProto, inferred: onnx.ModelProto, opsets: dict[str, int]):
        self.proto = proto
        self.opset = opsets.get("", MIN_OPSET)  # a model of custom-domain ops only has no default opset
        self.opsets = tuple(sorted(opsets.items()))
        self.graph = Graph(proto.graph.name or "main")
        self.env: dict[str, Value] = {}
        self._fresh = itertools.count()
        g = inferred.graph
        self.type_protos = {vi.name: vi.type for vi in itertools.chain(g.input, g.value_info, g.output)}
        self.functions = tuple(f.SerializeToString() for f in proto.functions)
        self.function_names = {(f.domain, f.name) for f in proto.functions}

    def fresh_dim(self) -> str:
        return f"_unk{next(self._fresh)}"

    def ir_type(self, name: str) -> Type | None:
        return onnx_type_to_ir(self.type_protos.get(name), self.fresh_dim)

    def run(self) -> Graph:
        g, gp = self.graph, self.proto.graph
        initializers = {t.name: t for t in gp.initializer}
        # before IR version 4 every initializer had to be listed as an input too, and stayed a constant
        # (onnxruntime does not let feeds override it either)
        overridable = self.proto.ir_version >= 4
        for vi in gp.input:
            if vi.name in initializers and not overridable:
                continue
            v = g.add_input(vi.name, onnx_type_to_ir(vi.type, self.fresh_dim) or OpaqueType("onnx:unknown"))
            self._keep_onnx_type(v, vi.type)
            if vi.name in initializers:  # an overridable input: ONNX feeds win over the default
                v.meta["onnx_default"] = tensor_to_torch(initializers.pop(vi.name))
            self.env[vi.name] = v
        for name, t in initializers.items():
            self._add_initializer(t)
        for sparse in gp.sparse_initializer:  # a Constant node keeps the sparse form
            self._import_opaque(onnx.helper.make_node("Constant", [], [sparse.values.name], sparse_value=sparse))
        for n in gp.node:
            self._import_node(n)
        g.outputs = [self.env[o.name] for o in gp.output]
        for o, v in zip(gp.output, g.outputs):
            if v.type == OpaqueType("onnx:unknown"):
                v.type = self.ir_type(o.name) or v.type
        g.meta["source"] = "onnx"
        g.meta["onnx"] = {
            "opset_imports": dict(self.opsets), "ir_version": self.proto.ir_version,
            "producer_name": self.proto.producer_name, "producer_version": self.proto.producer_version,
            "functions": list(self.proto.functions),
            "model_metadata": {p.key: p.value for p in self.proto.metadata_props},
            "output_names": [o.name for o in gp.output], "graph_name": gp.name,
        }
        return g

    def _keep_onnx_type(self, v: Value, tp: onnx.TypeProto) -> None:
        if isinstance(v.type, OpaqueType):
            v.meta["onnx_type"] = tp.SerializeToString()

    def _add_initializer(self, t: onnx.TensorProto) -> None:
        if t.data_type in ONNX_TO_TORCH:
            self.env[t.name] = self.graph.add_constant(tensor_to_torch(t), t.name, parameter=t.name != "" and
                                                      len(t.dims) > 0 and int(np.prod(t.dims)) > 1)
            return
        # strings, 4-bit types: a Constant node carries them as they are
        node = onnx.helper.make_node("Constant", [], [t.name], value=t, name=f"{t.name}_initializer")
        self._import_opaque(node)

    # ------------------------------------------------------------ nodes
    def _import_node(self, n: onnx.NodeProto) -> None:
        outputs = convert_node(_Scope(self.graph, self.opset, self.env, self.ir_type), n)
        if outputs is None:
            self._import_opaque(n)
            return
        for name, v in zip(n.output, outputs):
            self._bind(name, v)

    def _bind(self, name: str, v: Value) -> None:
        """Name an imported value after its ONNX output and keep the more precise ONNX type."""
        if not name:
            return
        expected = self.ir_type(name)
        if v.producer is not None and v.graph is self.graph and self.graph.is_free(name):
            self.graph.rename(v, name)
        if isinstance(expected, TensorType) and expected.shape is not None:
            v.type = expected
        self.env[name] = v

    def _import_opaque(self, n: onnx.NodeProto) -> None:
        implicit = outer_names(n)
        implicit = [name for name in implicit if name in self.env]
        inputs = [self.env[name] if name else None for name in n.input] + [self.env[name] for name in implicit]
        functions = self.functions if (n.domain, n.op_type) in self.function_names else ()
        attrs = {"node": n.SerializeToString(), "domain": n.domain, "op_type": n.op_type,
                 "implicit": tuple(implicit), "opsets": self.opsets, "functions": functions,
                 "ir_version": self.proto.ir_version}
        types = []
        for name in n.output:
            t = self.ir_type(name) if name else None
            types.append(t if t is not None else OpaqueType("onnx:unknown"))
        node = self.graph.add_node("onnx.opaque", inputs, attrs, output_types=types, name=n.name or n.op_type,
                                   output_names=[o or f"{n.op_type}_unused" for o in n.output],
                                   meta={"source": f"{n.name}:{n.op_type}"})
        for name, v in zip(n.output, node.outputs):
            if name:
                if name in self.type_protos:
                    self._keep_onnx_type(v, self.type_protos[name])
                self.env[name] = v


# ------------------------------------------------------------ conversion
class _Scope:
    """Where one ONNX node is converted: the graph, IR values by ONNX name, the
    IR types ONNX inference gave names (``ir_type``), and where new nodes go.

    The importer converts with a scope over its whole environment; a pass that
    retries an ``onnx.opaque`` node converts with a scope over that node alone.
    """

    def __init__(self, graph: Graph, opset: int, env: dict[str, Value],
                 ir_type: Callable[[str], Type | None], before: Node | None = None):
        self.graph = graph
        self.opset = opset
        self.env = env
        self.ir_type = ir_type
        self.before = before
        self.created: list[Node] = []

    def add_node(self, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any], **kwargs: Any) -> Node:
        node = self.graph.add_node(op, inputs, attrs, before=self.before, **kwargs)
        self.created.append(node)
        return node

    def undo(self, constants_before: set[str]) -> None:
        """Remove what a failed conversion added: its nodes, newest first, and its constants."""
        for node in reversed(self.created):
            for out in node.outputs:
                for user, i in out.uses():
                    user.replace_input(i, None)
            self.graph.remove_node(node)
        self.created.clear()
        for name in set(self.graph.constants) - constants_before:
            self.graph.remove_constant(self.graph.constants[name])


def convert_node(scope: _Scope, n: onnx.NodeProto) -> list[Value | None] | None:
    """The canonical IR values of an ONNX node's outputs, or None, leaving the graph as it was.

    A mapping is kept only when the IR's type inference of every output agrees
    with the type ONNX inference gave it.
    """
    from .onnx_table import IMPORTERS

    importer = IMPORTERS.get(n.op_type) if n.domain in DEFAULT_DOMAINS else None
    if importer is None or not _fits_canonical(scope, n):
        return None
    constants = set(scope.graph.constants)
    try:
        outputs = importer(NodeContext(scope, n))
    except (NoMatch, TypeError, ValueError, RuntimeError, IndexError, KeyError):
        outputs = None
    if outputs is not None and _types_agree(scope, n, outputs):
        return outputs
    scope.undo(constants)
    return None


def reconvert_opaque(node: Node) -> list[Value | None] | None:
    """Retry the canonical import of an ``onnx.opaque`` node with the inputs it reads now.

    Folding can turn a computed shape input into a constant after loading; then
    the node may map exactly. On success the new nodes stand just before
    ``node`` and the values they produce are returned for the caller to swap
    in; the old output types (ONNX's) are what the new types must agree with.
    """
    proto = onnx.NodeProto.FromString(node.attrs["node"])
    if node.attrs.get("implicit"):
        return None
    env = {name: v for name, v in zip(proto.input, node.inputs) if name and v is not None}
    known = {name: out.type for name, out in zip(proto.output, node.outputs)
             if name and isinstance(out.type, TensorType) and "onnx_type" not in out.meta}
    opset = dict(node.attrs.get("opsets", ())).get("", MIN_OPSET)
    scope = _Scope(node.graph, opset, env, known.get, before=node)
    constants = set(node.graph.constants)
    outputs = convert_node(scope, proto)
    if outputs is not None and any(v is not None and v.producer is None for v in outputs):
        scope.undo(constants)  # a constant or an input cannot take over the outputs of a node
        return None
    return outputs


def _fits_canonical(scope: _Scope, n: onnx.NodeProto) -> bool:
    """Canonical ops need plain tensor inputs of dtypes torch covers, and no subgraphs."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
        return False
    for name in n.input:
        if name and (name not in scope.env or not isinstance(scope.env[name].type, TensorType)
                     or scope.env[name].type.dtype not in CANONICAL_DTYPES):
            return False
    for name in n.output:
        t = scope.ir_type(name) if name else None
        if t is not None and (not isinstance(t, TensorType) or t.dtype not in CANONICAL_DTYPES):
            return False
    return True


def _types_agree(scope: _Scope, n: onnx.NodeProto, outputs: Sequence[Value | None]) -> bool:
    if len(outputs) != len(n.output):
        return False
    for name, v in zip(n.output, outputs):
        if v is None:
            if name:
                return False
            continue
        expected = scope.ir_type(name)
        if expected is None:
            continue
        if not isinstance(v.type, TensorType) or v.type.dtype != expected.dtype:
            return False
        if v.type.shape is not None and expected.shape is not None:
            if len(v.type.shape) != len(expected.shape):
                return False
            if any(isinstance(a, int) and isinstance(b, int) and a != b
                   for a, b in zip(v.type.shape, expected.shape)):
                return False
    return True


class NoMatch(Exception):
    """The ONNX node does not fit a canonical op: keep it opaque."""


class NodeContext:
    """What one importer sees: the node's attributes, inputs, constant inputs, and a node builder."""

    def __init__(self, scope: _Scope, node: onnx.NodeProto):
        self.scope = scope
        self.node = node
        self.opset = scope.opset
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.attrs.get(name, default)
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, onnx.TensorProto):
            return tensor_to_torch(value)
        return value

    def has_input(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] != ""

    def input(self, i: int) -> Value:
        if not self.has_input(i):
            raise NoMatch(f"input {i} is absent")
        return self.scope.env[self.node.input[i]]

    def inputs(self) -> list[Value]:
        return [self.input(i) for i in range(len(self.node.input))]

    def const(self, i: int) -> torch.Tensor:
        """The value of a constant input (an initializer or Constant output), else no match."""
        v = self.input(i)
        if v.data is None:
            raise NoMatch(f"input {i} is not constant")
        return v.data

    def const_ints(self, i: int) -> list[int]:
        return [int(x) for x in self.const(i).reshape(-1).tolist()]

    def shape(self, v: Value) -> tuple:
        if v.type.shape is None:
            raise NoMatch(f"rank of %{v.name} is unknown")
        return v.type.shape

    def rank(self, v: Value) -> int:
        return len(self.shape(v))

    def constant(self, data: torch.Tensor, hint: str = "const") -> Value:
        return self.scope.graph.add_constant(data, hint)

    def op(self, op: str, inputs: Sequence[Value | None], **attrs: Any) -> Value:
        return self.op_multi(op, inputs, **attrs)[0]

    def op_multi(self, op: str, inputs: Sequence[Value | None], **attrs: Any) -> list[Value]:
        meta = {"source": f"{self.node.name}:{self.node.op_type}"}
        try:
            node = self.scope.add_node(op, inputs, attrs, name=self.node.name or None, meta=meta)
        except (TypeError, ValueError, RuntimeError, NotImplementedError):
            # meta inference fails on data-dependent shapes; ONNX inference may know the result
            types = [self.scope.ir_type(name) for name in self.node.output]
            if len(types) != get_op(op).output_count(attrs) or not all(isinstance(t, TensorType) for t in types):
                raise NoMatch(f"cannot type {op}") from None
            node = self.scope.add_node(op, inputs, attrs, output_types=types, name=self.node.name or None,
                                       meta=meta)
        return list(node.outputs)
