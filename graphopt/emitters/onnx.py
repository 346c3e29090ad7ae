"""ONNX emitter: an IR graph into an ONNX ``ModelProto`` for a target opset.

Canonical ops are lowered by the table in ``onnx_table`` (per-opset forms and
decompositions); ``onnx.opaque`` nodes go back verbatim; ``torch.opaque`` nodes
are exported one by one with ``torch.onnx.export`` and spliced in. IR value
names become ONNX names, and graph input and output names are preserved.
"""
from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch

from graphopt.frontends.onnx import TORCH_TO_ONNX, ir_type_to_onnx, torch_to_numpy
from graphopt.ir import Graph, Node, ScalarType, TensorType, Value
from graphopt.ir.graph import register_emitter

DEFAULT_OPSET = 18
TARGETS = ("onnx", "onnxruntime", "onnxruntime-cpu")
"""What the model is for: any ONNX runtime (standard ops only); onnxruntime (its contrib ops too); or
onnxruntime's CPU provider on this machine (also its NCHWc blocked convolutions). The target's pipeline
(``graphopt.passes.targets``) rewrites the IR into those ops; the emitter writes what the IR holds."""
ONNXRUNTIME_OPS = "ort."
"""Prefix of the IR ops only onnxruntime runs (``onnxruntime_ops``, ``onnxruntime_nchwc``)."""
MIN_OPSET = 13
TWO_GB = 2**31


class EmitError(ValueError):
    """The graph holds something the target opset cannot express; the message names the node."""


def emit_onnx(graph: Graph, opset: int | None = None, external_data_threshold: int = TWO_GB,
              target: str = "onnx") -> onnx.ModelProto:
    """Lower ``graph`` to an ONNX model for ``opset`` (default: the loaded model's opset, else 18).

    ``target="onnx"`` refuses the onnxruntime-only ops (``ort.*``) that the
    ``onnxruntime`` and ``onnxruntime-cpu`` pipelines write into the graph
    (``graphopt.passes.targets.optimize_for_target``); with those targets they
    are written as onnxruntime's contrib and NCHWc ops.

    ``external_data_threshold`` is kept for ``save_onnx``: the proto returned here
    always holds its initializers inline.
    """
    onnx_meta = graph.meta.get("onnx", {})
    if opset is None:
        opset = onnx_meta.get("opset_imports", {}).get("", DEFAULT_OPSET)
    if opset < MIN_OPSET:
        raise EmitError(f"cannot emit opset {opset}: graphopt emits opset {MIN_OPSET} and up")
    if target not in TARGETS:
        raise EmitError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    return OnnxEmitter(graph, opset, target).run()


def save_onnx(model: onnx.ModelProto | Graph, path: str | os.PathLike, external_data_threshold: int = TWO_GB,
              **emit_kwargs: Any) -> Path:
    """Write a model (or a graph, emitted first) atomically; weights go to external data past the threshold."""
    proto = emit_onnx(model, **emit_kwargs) if isinstance(model, Graph) else model
    path = Path(path)
    total = sum(_initializer_bytes(t) for t in proto.graph.initializer)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if total > external_data_threshold:
            data_name = f"{path.name}.data"
            data_tmp = path.parent / f".{data_name}.tmp"
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_tmp.name, size_threshold=1024)
            _point_external_data(tmp, data_tmp.name, data_name)
            os.replace(data_tmp, path.parent / data_name)
        else:
            onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _point_external_data(model_path: str, old: str, new: str) -> None:
    """Rename the external-data location recorded in a saved model (written under a temporary name)."""
    model = onnx.load(model_path, load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(model, model_path)


def _initializer_bytes(t: onnx.TensorProto) -> int:
    return len(t.raw_data) if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).nbytes


def tensor_proto(data: torch.Tensor, name: str) -> onnx.TensorProto:
    """An ONNX tensor from a torch tensor, raw bytes for every dtype."""
    if data.dtype not in TORCH_TO_ONNX:
        raise EmitError(f"constant {name}: dtype {data.dtype} has no ONNX equivalent")
    array = torch_to_numpy(data)
    proto = onnx.TensorProto(name=name, data_type=TORCH_TO_ONNX[data.dtype], dims=list(data.shape))
    proto.raw_data = array.tobytes()
    return proto


class OnnxEmitter:
    """Builds the ONNX graph node by node, naming every IR value once."""

    def __init__(self, graph: Graph, opset: int, target: str = "onnx"):
        self.graph = graph
        self.opset = opset
        self.target = target
        self.meta = graph.meta.get("onnx", {})
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.names: dict[int, str] = {}
        self.taken: set[str] = {v.name for v in graph.values()}
        self.extra_opsets: dict[str, int] = {}
        self.aliases: dict[str, Value] = {}  # outer-scope names re-created for subgraphs
        self.functions: list[onnx.FunctionProto] = list(self.meta.get("functions", []))
        self.transposed: dict[int, str] = {}  # constant -> its pre-transposed initializer
        self.metadata: dict[str, str] = {}
        self._counter = 0

    # ------------------------------------------------------------ naming
    def fresh(self, hint: str) -> str:
        name = hint
        while name in self.taken:
            self._counter += 1
            name = f"{hint}_{self._counter}"
        self.taken.add(name)
        return name

    def name(self, v: Value | None) -> str:
        return "" if v is None else self.names.get(id(v), v.name)

    # --------------------------------------------------------- building
    def add(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, domain: str = "",
            **attrs: Any) -> list[str]:
        """Append one ONNX node; fresh output names unless given."""
        if isinstance(outputs, int):
            outputs = [self.fresh(f"{op_type.lower()}_out") for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(onnx.helper.make_node(op_type, list(inputs), list(outputs),
                                                name=self.fresh(f"{op_type}_node"), domain=domain or None,
                                                **attrs))
        return list(outputs)

    def add1(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        return self.add(op_type, inputs, [out] if out else 1, **attrs)[0]

    def const(self, data: torch.Tensor | Sequence | float | int, dtype: torch.dtype | None = None,
              hint: str = "const") -> str:
        """A helper constant as an initializer."""
        tensor = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
        if dtype is not None:
            tensor = tensor.to(dtype)
        name = self.fresh(hint)
        self.initializers.append(tensor_proto(tensor, name))
        return name

    def ints(self, values: Sequence[int], hint: str = "ints") -> str:
        return self.const(torch.tensor(list(values), dtype=torch.int64), hint=hint)

    def transposed_constant(self, v: Value) -> str:
        """A 2-D constant as a transposed initializer, made once per constant.

        Lets ``linear`` lower to a plain MatMul with no Transpose node; the original
        initializer is dropped at the end if nothing else reads it.
        """
        if id(v) not in self.transposed:
            self.transposed[id(v)] = self.const(v.data.t().contiguous(), hint=f"{v.name}_t")
        return self.transposed[id(v)]

    def cast(self, name: str, src: torch.dtype, dst: torch.dtype) -> str:
        return name if src == dst else self.add1("Cast", [name], to=TORCH_TO_ONNX[dst])

    # -------------------------------------------------------------- run
    def run(self) -> onnx.ModelProto:
        from . import onnxruntime_nchwc, onnxruntime_ops
        from .onnx_table import EMITTERS

        g = self.graph
        self.rows = {**EMITTERS, **onnxruntime_ops.ROWS, **onnxruntime_nchwc.ROWS}
        output_names = self._plan_outputs()
        for v in g.inputs:
            if "onnx_default" in v.meta:
                self.initializers.append(tensor_proto(v.meta["onnx_default"], v.name))
        for v in g.constants.values():
            self.initializers.append(tensor_proto(v.data, v.name))
        for node in g:
            self._emit_node(node)
        for k, v in enumerate(g.outputs):
            if self.name(v) != output_names[k]:
                self.add("Identity", [self.name(v)], [output_names[k]])
        self._drop_unread_initializers()
        graph = onnx.helper.make_graph(
            self.nodes, self.meta.get("graph_name") or g.name,
            [onnx.helper.make_value_info(v.name, _io_type(v)) for v in g.inputs],
            [onnx.helper.make_value_info(n, _io_type(v)) for n, v in zip(output_names, g.outputs)],
            self.initializers)
        return self._model(graph)

    def _emit_node(self, node: Node) -> None:
        outs = [self.name(o) for o in node.outputs]
        if node.op.startswith(ONNXRUNTIME_OPS) and self.target == "onnx":
            raise EmitError(f"node {node.name}: {node.op} runs in onnxruntime only; emit it with "
                            f"target='onnxruntime' (or 'onnxruntime-cpu')")
        if node.op == "onnx.opaque":
            self._emit_onnx_opaque(node, outs)
        elif node.op == "torch.opaque":
            self._emit_torch_opaque(node, outs)
        elif node.op == "region":
            self._emit_region(node, outs)
        elif node.opdef.state_method is not None or (node.opdef.torch_module is not None and not node.is_pure):
            raise EmitError(f"node {node.name}: {node.op} keeps state across calls, which an ONNX model cannot; "
                            f"emit this graph to torch (graph.to_torch())")
        else:
            emitter = self.rows.get(node.op)
            if emitter is None:
                raise EmitError(f"node {node.name}: IR op {node.op!r} has no ONNX lowering")
            try:
                emitter(self, node, [self.name(v) for v in node.inputs], outs)
            except EmitError:
                raise
            except Exception as e:
                raise EmitError(f"node {node.name} ({node.op}): cannot lower to ONNX opset {self.opset}: "
                                f"{e}") from e

    def _emit_region(self, node: Node, outs: list[str]) -> None:
        """A region's body, written in its place under fresh names: an ONNX graph runs a subgraph only
        under control flow (If, Loop), so a region is inlined as it is emitted."""
        body = node.attrs["body"]
        for inner, outer in zip(body.inputs, node.inputs):
            self.names[id(inner)] = self.name(outer)
        for v in body.constants.values():
            self.names[id(v)] = self.fresh(v.name)
            self.initializers.append(tensor_proto(v.data, self.names[id(v)]))
        for inner in body:
            for v in inner.outputs:
                self.names[id(v)] = self.fresh(v.name)
            self._emit_node(inner)
        for out, inner in zip(outs, body.outputs):
            self.add("Identity", [self.name(inner)], [out])

    def _model(self, graph: onnx.GraphProto) -> onnx.ModelProto:
        opsets = {d: v for d, v in self.meta.get("opset_imports", {}).items() if d not in ("", "ai.onnx")}
        opsets.update(self.extra_opsets)
        opsets[""] = self.opset
        imports = [onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items())]
        model = onnx.helper.make_model(graph, opset_imports=imports, functions=self.functions,
                                       producer_name=self.meta.get("producer_name") or "graphopt",
                                       producer_version=self.meta.get("producer_version") or "")
        model.ir_version = max(self.meta.get("ir_version", 0),
                               onnx.helper.find_min_ir_version_for(imports, ignore_unknown=True), 8)
        for key, value in {**self.meta.get("model_metadata", {}), **self.metadata}.items():
            model.metadata_props.add(key=key, value=value)
        return model

    def _drop_unread_initializers(self) -> None:
        """Remove the graph's constants that no node (or subgraph) reads any more.

        A lowering may write a constant in another form (a pre-transposed linear
        weight, a group-norm weight shaped for broadcasting) instead of reading it.
        """
        read = _names_read(self.nodes) | {self.name(v) for v in self.graph.outputs}
        constants = {self.name(v) for v in self.graph.constants.values()}
        self.initializers = [t for t in self.initializers if t.name not in constants or t.name in read]

    def _plan_outputs(self) -> list[str]:
        """ONNX names of the graph outputs: the loaded model's names where the graph still has them.

        An output value produced by a node takes the wanted name directly; inputs,
        constants and repeated outputs get an Identity in the run.
        """
        g = self.graph
        wanted = list(self.meta.get("output_names", []))
        if len(wanted) != len(g.outputs):
            wanted = [v.name for v in g.outputs]
        claimed: set[int] = set()
        names: list[str] = []
        owners = {v.name: v for v in g.values()}
        for v, want in zip(g.outputs, wanted):
            if want in names:
                want = self.fresh(want)
            owner = owners.get(want)
            if owner is not None and owner is not v:
                self._rename_away(owner)
            self.taken.add(want)
            if v.producer is not None and id(v) not in claimed:
                self.names[id(v)] = want
                claimed.add(id(v))
            names.append(want)
        return names

    def _rename_away(self, v: Value) -> None:
        """Free an ONNX name wanted by an output: the value that holds it takes a fresh one."""
        if v.producer is None:
            raise EmitError(f"graph output name {v.name!r} is taken by a graph input or constant")
        self.names[id(v)] = self.fresh(f"{v.name}_inner")

    # ------------------------------------------------------------ opaque
    def _emit_torch_opaque(self, node: Node, outs: list[str]) -> None:
        """Splice in the ONNX export of one torch call, its internal names made unique."""
        try:
            sub = _export_torch_call(node, self.opset)
        except EmitError:
            raise
        except Exception as e:
            raise EmitError(f"node {node.name}: torch.opaque {_target_name(node)} has no ONNX lowering and "
                            f"torch.onnx.export of it failed: {str(e).strip().splitlines()[0] if str(e) else e}") from e
        renamed = {f"in{i}": self.name(v) for i, v in enumerate(node.inputs)}
        renamed.update({f"out{k}": out for k, out in enumerate(outs)})
        renamed[""] = ""

        def rename(name: str) -> str:
            if name not in renamed:
                renamed[name] = self.fresh(f"{node.name}_{name}")
            return renamed[name]

        for t in sub.graph.initializer:
            t.name = rename(t.name)
            self.initializers.append(t)
        for n in sub.graph.node:
            n.input[:] = [rename(x) for x in n.input]
            n.output[:] = [rename(x) for x in n.output]
            n.name = self.fresh(f"{node.name}_{n.name or n.op_type}")
            self.nodes.append(n)
        for o in sub.opset_import:
            if o.domain not in ("", "ai.onnx"):
                self.extra_opsets.setdefault(o.domain, o.version)

    def _emit_onnx_opaque(self, node: Node, outs: list[str]) -> None:
        proto = onnx.NodeProto.FromString(node.attrs["node"])
        implicit = list(node.attrs.get("implicit", ()))
        own = node.inputs[:len(node.inputs) - len(implicit)]
        for outer_name, v in zip(implicit, node.inputs[len(own):]):
            if self.name(v) == outer_name or self.aliases.get(outer_name) is v:
                continue
            if outer_name in self.taken:  # the subgraph reads the outer value by its original name
                raise EmitError(f"node {node.name}: its subgraph reads %{outer_name}, now another value")
            self.taken.add(outer_name)
            self.aliases[outer_name] = v
            self.add("Identity", [self.name(v)], [outer_name])
        del proto.input[:]
        proto.input.extend(self.name(v) for v in own)
        original = list(proto.output)
        del proto.output[:]
        proto.output.extend(o if orig or node.outputs[k].uses() else "" for k, (o, orig) in
                            enumerate(zip(outs, original)))
        proto.name = proto.name or self.fresh(f"{proto.op_type}_node")
        for domain, version in node.attrs.get("opsets", ()):
            if domain == proto.domain and domain not in ("", "ai.onnx"):
                self.extra_opsets.setdefault(domain, version)
        for f in node.attrs.get("functions", ()):
            fp = onnx.FunctionProto.FromString(f)
            if all((x.domain, x.name) != (fp.domain, fp.name) for x in self.functions):
                self.functions.append(fp)
        self.nodes.append(proto)


def _export_torch_call(node: Node, opset: int) -> onnx.ModelProto:
    """Export one torch.opaque call with TorchScript ONNX export on example tensors of its input types.

    Symbolic dims are exported as dynamic axes so the spliced nodes do not bake in sizes.
    """
    from graphopt.ir.ops.opaque import torch_opaque

    attrs = dict(node.attrs)

    class _Call(torch.nn.Module):
        def forward(self, *xs: Any) -> Any:
            return torch_opaque(*xs, **attrs)

    examples, dynamic_axes = [], {}
    for i, v in enumerate(node.inputs):
        if v is None or not isinstance(v.type, TensorType) or v.type.shape is None:
            raise EmitError(f"node {node.name} (torch.opaque {_target_name(node)}): input {i} needs a tensor type "
                            f"with known rank for export")
        shape = [d if isinstance(d, int) else 2 for d in v.type.shape]
        examples.append(v.data if v.data is not None else _example_tensor(v.type.dtype, shape))
        symbolic = {k: str(d) for k, d in enumerate(v.type.shape) if not isinstance(d, int)}
        if symbolic:
            dynamic_axes[f"in{i}"] = symbolic
    count = len(node.outputs)
    buffer = io.BytesIO()
    torch.onnx.export(_Call(), tuple(examples), buffer, opset_version=opset, dynamo=False,
                      input_names=[f"in{i}" for i in range(len(examples))],
                      output_names=[f"out{k}" for k in range(count)], dynamic_axes=dynamic_axes or None)
    return onnx.load_from_string(buffer.getvalue())


def _example_tensor(dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.zeros(shape, dtype=dtype)


def _target_name(node: Node) -> str:
    target = node.attrs["target"]
    return getattr(target, "__name__", None) or str(target)


def _io_type(v: Value) -> onnx.TypeProto:
    if isinstance(v.type, ScalarType):
        return onnx.helper.make_tensor_type_proto(TORCH_TO_ONNX[v.type.dtype], [])
    if isinstance(v.type, TensorType) or "onnx_type" in v.meta:
        return ir_type_to_onnx(v)
    raise EmitError(f"graph input/output %{v.name} has type {v.type}, which ONNX cannot express")


def _names_read(nodes: Sequence[onnx.NodeProto]) -> set[str]:
    """Every value name the nodes read, including from inside their subgraphs."""
    read: set[str] = set()
    for node in nodes:
        read.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                read |= _names_read(sub.node)
                read.update(o.name for o in sub.output)
    return read


register_emitter("onnx", emit_onnx)
