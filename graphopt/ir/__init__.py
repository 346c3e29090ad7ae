"""graphopt's intermediate representation: one graph IR for torch.fx and ONNX models."""
from .graph import Graph, Node, Value
from .registry import OPS, AttrSpec, OpDef, get_op, infer_types, node_bytes, node_flops, op, register_op
from .region import inline, outline
from .types import Dim, OpaqueType, ScalarType, TensorType, Type
from .verifier import VerificationError, verify

__all__ = [
    "AttrSpec", "Dim", "Graph", "Node", "OPS", "OpDef", "OpaqueType", "ScalarType", "TensorType", "Type", "Value",
    "VerificationError", "get_op", "infer_types", "inline", "node_bytes", "node_flops", "op", "outline",
    "register_op", "verify",
]
