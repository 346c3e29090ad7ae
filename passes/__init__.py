"""Built-in passes (installed as ``graphopt.passes``), one module per family.

Importing this package registers the passes and the named pipelines:

- ``O1``: cleanup (``cleanup.CLEANUP_PIPELINE``).
- ``O2``: O1, then operator recognition and fusion, then layout, then the
  fusion-group annotations the lowering stage reads. The manager repeats the
  whole list until nothing changes, so a rewrite that exposes cleanup gets it.
- ``O3`` (registered by ``graphopt.backends.lower``): O2, then ``lower_regions``.
- ``target:onnx``, ``target:onnxruntime``, ``target:onnxruntime-cpu``: what
  ``--target`` adds before emission (``targets``).

``channels_last`` is exact but not in O2: its benefit depends on the backend's
convolution kernels, so it is asked for by name.
"""
from graphopt.pass_manager import register_pipeline

from . import attention, canonicalize, cleanup, constant_folding, fusion, fusion_groups, horizontal, layout, patterns  # noqa: F401
from . import sparse_attention, step_cache  # noqa: F401  (lossy: asked for by name, never in a level)
from . import targets  # noqa: F401  (after the passes above: the target pipelines read fusion's helpers)
from .cleanup import CLEANUP_PIPELINE

# Patterns first (the fusions read canonical ops); attention before bias folding, which
# would otherwise absorb the exporters' scale multiplies; horizontal fusion last, once
# ONNX MatMul+Add siblings are linear with their final biases. The passes declare this order
# (``requires``/``ensures``) and registering a pipeline checks it.
FUSION_PIPELINE = ["recognize_patterns", "fuse_attention", "fuse_linear", "fold_batch_norm", "fold_bias",
                   "fuse_horizontal"]
LAYOUT_PIPELINE = ["sink_transposes", "fold_token_permutations"]

register_pipeline("O1", CLEANUP_PIPELINE)
register_pipeline("O2", [*CLEANUP_PIPELINE, *FUSION_PIPELINE, *LAYOUT_PIPELINE, *CLEANUP_PIPELINE,
                         "mark_fusion_groups"])
