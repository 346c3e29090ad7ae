"""Emitters: the IR written back as a torch.fx module or an ONNX model; importing registers both with the IR."""
from . import onnx, torch  # noqa: F401
