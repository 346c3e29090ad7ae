"""Train the digits judge (``graphopt.digits.DigitsClassifier``) and write ``graphopt/data/digits_classifier.safetensors``.

It scores generated digits (``graphopt.quality.ClassifierScore``): accuracy
against the requested class and Fréchet distance of its penultimate features.
Training sees small random shifts so it does not key on the exact pixel grid of
the bicubic upscale, which generated digits only approximate.

    python examples/train_digits_classifier.py     # seconds on 2 cores
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from graphopt import digits


def random_shift(images: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero padding = background)."""
    padded = F.pad(images, (max_shift,) * 4)
    size = images.shape[-1]
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,)).tolist()
    return padded[..., dy:dy + size, dx:dx + size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = digits.digits_images()
    images = images / 2 + 0.5  # the classifier sees pipeline outputs, which are in [0, 1]
    order = torch.randperm(images.shape[0])
    held_out, train = order[:360], order[360:]

    classifier = digits.DigitsClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3)
    for _ in range(args.epochs):
        classifier.train()
        for batch in train[torch.randperm(train.numel())].split(64):
            loss = F.cross_entropy(classifier(random_shift(images[batch])), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    classifier.eval()
    with torch.no_grad():
        accuracy = (classifier(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    print(f"held-out accuracy {accuracy:.4f} on {held_out.numel()} digits")
    digits.CLASSIFIER_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(digits.CLASSIFIER_WEIGHTS))
    print(f"wrote {digits.CLASSIFIER_WEIGHTS} ({digits.CLASSIFIER_WEIGHTS.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
