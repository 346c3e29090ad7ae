"""Built-in passes (installed as ``graphopt.passes``), one module per family.

Importing this package registers the passes and the named pipelines.
"""
from graphopt.pass_manager import register_pipeline

from . import canonicalize, cleanup, constant_folding  # noqa: F401
from .cleanup import CLEANUP_PIPELINE

register_pipeline("O1", CLEANUP_PIPELINE)
