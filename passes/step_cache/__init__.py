"""Step caching for diffusion sampling (lossy; metric: PSNR against the uncached output of the same seed).

``blocks`` finds a denoiser's repeated blocks by dataflow, ``rewrite`` wraps
them in one ``step_cache`` node (the pass), ``policies`` decide per step what
is recomputed, ``runtime`` is the module the node becomes, and ``calibrate``
fits policies to a quality budget. ``graphopt.diffusers`` installs it on a
pipeline.
"""
from . import rewrite  # noqa: F401  (registers the op and the pass)
