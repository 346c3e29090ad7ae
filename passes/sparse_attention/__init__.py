"""Head-kind sparse attention for video diffusion transformers (lossy; metric: PSNR against dense attention).

``grid`` holds the video token grid and the band masks, ``kernels`` the band
attention, ``profile`` the online head classification, ``runtime`` the module
an attention becomes, and ``rewrite`` the op and the ``sparse_video_attention``
pass. ``graphopt.diffusers`` installs it on a pipeline.
"""
from . import rewrite  # noqa: F401  (registers the op and the pass)
