"""graphopt: graph-optimization passes for deep-learning models on one IR for torch.fx and ONNX."""
from . import emitters  # noqa: F401  (registers Graph.to_torch and Graph.to_onnx)
from .api import capture, check_options, explain, load_onnx, optimize, prune
from .guards import frozen_model_guards, frozen_module_guards
from .ir import Graph, Node, TensorType, Value
from .pass_manager import Pass, PassKind, PassManager, PassResult, register_pass, register_pipeline

__version__ = "0.1.0"

__all__ = [
    "Graph", "Node", "Pass", "PassKind", "PassManager", "PassResult", "TensorType", "Value", "capture", "check_options", "explain",
    "frozen_model_guards", "frozen_module_guards", "load_onnx", "optimize", "prune", "register_pass", "register_pipeline",
]
