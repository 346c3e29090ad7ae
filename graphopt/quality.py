"""Quality metrics that every lossy pass (step caching, pruning, quantization) is judged by.

``psnr`` / ``ssim`` compare an optimized model's images or videos with the
unoptimized reference from the same seed (torchmetrics' implementations, so the
numbers match what papers on diffusion caching report). Images are [B, C, H, W];
videos [B, F, C, H, W] are scored per frame and the frames averaged. The
``per_sample=True`` form returns one value per sample, which is what checks such
as "a sample in a batch equals the same sample run alone" need.

``ClassifierScore`` judges samples with no reference at all: accuracy of a
classifier on class-conditional samples, and the Fréchet distance between
Gaussian fits of its features (Heusel et al. 2017, "GANs Trained by a Two
Time-Scale Update Rule", with a task classifier in place of Inception).
"""
from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .errors import InvalidOptionError


def _frames(output: torch.Tensor, reference: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Both inputs as [B·F, C, H, W] float frames, and F (1 for images)."""
    if not isinstance(output, torch.Tensor) or not isinstance(reference, torch.Tensor):
        raise InvalidOptionError(f"{metric} takes two tensors, got {type(output).__name__} and {type(reference).__name__}")
    if output.shape != reference.shape:
        raise InvalidOptionError(f"{metric}: output shape {tuple(output.shape)} does not match reference shape "
                                 f"{tuple(reference.shape)}; compare samples of the same size and count")
    if output.dim() not in (4, 5):
        raise InvalidOptionError(f"{metric} takes images [B, C, H, W] or videos [B, F, C, H, W], got shape "
                                 f"{tuple(output.shape)}")
    frames = output.shape[1] if output.dim() == 5 else 1
    flat = (-1, *output.shape[-3:])
    return output.detach().float().reshape(flat), reference.detach().float().reshape(flat), frames


def _per_frame_psnr(output: torch.Tensor, reference: torch.Tensor, data_range: float) -> torch.Tensor:
    return peak_signal_noise_ratio(output, reference, data_range=data_range, reduction="none", dim=(1, 2, 3))


def psnr(output: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, per_sample: bool = False):
    """Peak signal-to-noise ratio in dB; ``inf`` where output equals reference.

    Images: one PSNR over the whole batch (mean squared error over all pixels),
    which is what ``peak_signal_noise_ratio(output, reference, data_range)``
    gives. Videos: that per frame index, averaged over frames. ``per_sample``:
    a list with each sample's PSNR (a video's averaged over its frames).
    """
    out, ref, frames = _frames(output, reference, "psnr")
    if per_sample:
        values = _per_frame_psnr(out, ref, data_range).reshape(-1, frames).mean(dim=1)
        return [float(v) for v in values]
    if frames == 1:
        return float(peak_signal_noise_ratio(out, ref, data_range=data_range))
    out, ref = out.reshape(-1, frames, *out.shape[1:]), ref.reshape(-1, frames, *ref.shape[1:])
    return float(np.mean([float(peak_signal_noise_ratio(out[:, f], ref[:, f], data_range=data_range))
                          for f in range(frames)]))


def ssim(output: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, per_sample: bool = False):
    """Structural similarity (Wang et al. 2004), 1.0 where output equals reference.

    Images: mean over images, as ``structural_similarity_index_measure`` gives.
    Videos: mean over all frames. ``per_sample``: a list with each sample's SSIM
    (a video's averaged over its frames).
    """
    out, ref, frames = _frames(output, reference, "ssim")
    values = structural_similarity_index_measure(out, ref, data_range=data_range, reduction="none")
    values = values.reshape(-1, frames).mean(dim=1)
    return [float(v) for v in values] if per_sample else float(values.mean())


def frechet_distance(features: np.ndarray, reference_features: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D]."""
    from scipy import linalg

    mean, reference_mean = features.mean(axis=0), reference_features.mean(axis=0)
    # ReLU features have dead units and few samples, so the covariances are singular; a tiny ridge keeps sqrtm stable.
    ridge = 1e-6 * np.eye(features.shape[1])
    cov, reference_cov = np.cov(features, rowvar=False) + ridge, np.cov(reference_features, rowvar=False) + ridge
    covmean, _ = linalg.sqrtm(cov @ reference_cov, disp=False)
    covmean = covmean.real  # sqrtm of a product of PSD matrices has round-off imaginary parts
    return float(((mean - reference_mean) ** 2).sum() + np.trace(cov + reference_cov - 2 * covmean))


class ClassifierScore:
    """Scores generated images with a classifier that has ``forward`` (logits) and ``features``.

    ``graphopt.digits.load_digits_classifier()`` is the one shipped for the digits pipeline.
    """

    def __init__(self, classifier: torch.nn.Module):
        if not hasattr(classifier, "features"):
            raise InvalidOptionError(f"{type(classifier).__name__} has no features(x) method; ClassifierScore needs "
                                     "one that returns penultimate-layer features")
        self.classifier = classifier.eval()

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels) -> float:
        """Fraction of ``images`` classified as the class they were generated for."""
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.numel() != images.shape[0]:
            raise InvalidOptionError(f"accuracy: {images.shape[0]} images but {labels.numel()} labels; "
                                     "give one label per image")
        predicted = self.classifier(images.float()).argmax(dim=1)
        return float((predicted == labels.to(predicted.device)).float().mean())

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.classifier.features(images.float()).double().cpu().numpy()

    def frechet_distance(self, images: torch.Tensor, reference_images: torch.Tensor) -> float:
        """Fréchet distance between classifier features of ``images`` and of ``reference_images`` (0 = same fit)."""
        if images.shape[1:] != reference_images.shape[1:]:
            raise InvalidOptionError(f"frechet_distance: image shape {tuple(images.shape[1:])} does not match "
                                     f"reference shape {tuple(reference_images.shape[1:])}")
        if min(images.shape[0], reference_images.shape[0]) < 2:
            raise InvalidOptionError("frechet_distance needs at least 2 images on each side to fit a covariance")
        return frechet_distance(self.features(images), self.features(reference_images))
