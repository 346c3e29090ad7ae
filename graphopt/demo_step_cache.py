"""``graphopt demo``'s diffusion part: the trained digits DiT sampled uncached, then with step caching
calibrated to PSNR >= 30 dB, with the speed-up, the quality and a PNG of both image grids side by side."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

BUDGET = {"psnr": 30.0}
CALIBRATION = {"class_labels": [0, 3, 5, 8], "seed": 7}


@dataclass
class StepCacheRow:
    steps: int
    samples: int
    plan: str
    skipped: float
    uncached_s: float
    cached_s: float
    psnr: float
    ssim: float
    accuracy_uncached: float
    accuracy_cached: float
    image: Path


def run_step_cache_demo(quick: bool = False, image: Path = Path("graphopt-demo-step-cache.png")) -> StepCacheRow:
    """Sample 2 (``quick``: 1) of each digit, 50 (``quick``: 20) steps, uncached and cached; time both."""
    from . import diffusers as gd
    from .digits import load_digits_classifier, load_digits_pipeline
    from .quality import ClassifierScore, psnr, ssim

    pipe = load_digits_pipeline()
    steps = 20 if quick else 50
    labels = list(range(10)) * (1 if quick else 2)

    def sample() -> tuple[torch.Tensor, float]:
        """The images and the seconds they took, after a 2-step run of the same batch: one-off work (the
        cached pipeline's capture for this batch size, first-call allocations) is not sampling time."""
        pipe(labels, num_inference_steps=2)
        start = time.perf_counter()
        images = pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
        return images, time.perf_counter() - start

    reference, uncached_s = sample()
    gd.optimize(pipe, step_cache="auto", quality=BUDGET, calibration={**CALIBRATION, "num_inference_steps": steps})
    cached, cached_s = sample()
    plan = pipe.graphopt.plan
    skipped = pipe.graphopt.denoiser.skipped_fraction()
    gd.restore(pipe)
    score = ClassifierScore(load_digits_classifier())
    target = torch.tensor(labels)
    _save_grids(reference, cached, image)
    return StepCacheRow(steps, len(labels), ", ".join(f"{k}={v}" for k, v in plan.spec.items()), skipped,
                        uncached_s, cached_s, psnr(cached, reference), ssim(cached, reference),
                        score.accuracy(reference, target), score.accuracy(cached, target), image)


def format_step_cache_row(row: StepCacheRow) -> str:
    from .cli import format_table

    header = ("sampler", "steps", "samples", "seconds", "speed-up", "blocks skipped", "PSNR dB", "SSIM",
              "classifier accuracy")
    cells = [("uncached", str(row.steps), str(row.samples), f"{row.uncached_s:.1f}", "1.00x", "-", "-", "-",
              f"{row.accuracy_uncached:.2f}"),
             ("step_cache auto", str(row.steps), str(row.samples), f"{row.cached_s:.1f}",
              f"{row.uncached_s / row.cached_s:.2f}x", f"{row.skipped:.0%}", f"{row.psnr:.1f}", f"{row.ssim:.3f}",
              f"{row.accuracy_cached:.2f}")]
    return "\n".join([format_table(header, cells),
                      f"step_cache: trained digits DiT (FLUX transformer), calibrated to PSNR >= "
                      f"{BUDGET['psnr']:g} dB on 4 other samples; plan: {row.plan}. Both grids: {row.image}"])


def _save_grids(reference: torch.Tensor, cached: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, 2, figsize=(10, 2.8 if len(reference) <= 10 else 4.5))
    for ax, images, title in ((axes[0], reference, "uncached"), (axes[1], cached, "step_cache (auto, PSNR >= 30)")):
        ax.imshow(make_grid(images, nrow=10, padding=2, pad_value=1.0)[0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
