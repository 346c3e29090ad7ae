"""How much accuracy each importance criterion keeps: a small CNN on scikit-learn's digits, pruned and fine-tuned.

The CNN (three conv+BN+ReLU blocks, two linear layers) trains on the 8x8 digits
(1797 images, 10 classes; 75/25 split, seeded) for ``--epochs`` on the CPU.
Then, for each of ``--ratios`` and each seed, ``graphopt.prune`` removes that share of the channels with
importance ``l1``, ``l2``, ``taylor`` (gradients of the cross-entropy on one
training batch) and ``random``, and the pruned GraphModule is fine-tuned for
``--finetune-epochs`` (the same budget for each). Every batch has ``BATCH`` images
(the test set is padded) because a captured graph keeps the batch size it was
captured with. Torch-Pruning's L2
``MagnitudePruner`` on the same model is the reference row. Each ratio's table has test
accuracy before pruning, right after it and after fine-tuning, as mean ± std over
the seeds, with the parameters kept. Prints the table and writes it to
``benchmarks/results/prune_accuracy.md``; the defaults take about three minutes
on two cores.

    python benchmarks/prune_accuracy.py [--epochs 8] [--finetune-epochs 2] [--ratios 0.5,0.75] [--seeds 0,1,2,3,4]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from prune_coverage import count_params, torch_pruning_prune
from report import failure_cell, machine

RESULTS = Path(__file__).resolve().parent / "results" / "prune_accuracy.md"
THREADS = 2
BATCH = 64
METHODS = ("l1", "l2", "taylor", "random", "torch-pruning l2")


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test tensors: images (N, 1, 8, 8) scaled to [0, 1], labels (N,)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 32), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - BATCH + 1, BATCH):  # whole batches: captured graphs have a fixed batch
            batch = order[start:start + BATCH]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    padded = torch.cat([x, x[: -len(x) % BATCH]]) if len(x) % BATCH else x
    logits = torch.cat([model(padded[k:k + BATCH]) for k in range(0, len(padded), BATCH)])[: len(x)]
    return (logits.argmax(1) == y).float().mean().item() * 100


@dataclass
class Result:
    method: str
    pruned: list[float] = field(default_factory=list)
    finetuned: list[float] = field(default_factory=list)
    params: int | None = None
    prune_s: list[float] = field(default_factory=list)
    error: str = ""


def prune_with(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ratio: float,
               seed: int) -> nn.Module:
    """A pruned copy of ``model``; taylor scores with the loss on the first training batch."""
    model = copy.deepcopy(model)
    batch = (x[:BATCH],)
    if method == "torch-pruning l2":
        return torch_pruning_prune(model, batch, ratio, importance="l2")
    loss_fn: Callable | None = (lambda out: F.cross_entropy(out, y[:BATCH])) if method == "taylor" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return graphopt.prune(model, batch, ratio=ratio, importance=method, seed=seed, loss_fn=loss_fn)


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return ""
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the dense model (default 8)")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs after pruning (default 2)")
    parser.add_argument("--ratios", default="0.5,0.75", help="comma-separated pruning ratios (default 0.5,0.75)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0,1,2,3,4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    seeds = [int(s) for s in args.seeds.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(0)
    dense = small_cnn()
    train(dense, x_train, y_train, args.epochs, lr=3e-3, seed=0)
    base = accuracy(dense, x_test, y_test)
    tables = []
    for ratio in ratios:
        results = [evaluate(method, dense, (x_train, y_train, x_test, y_test), ratio, seeds, args.finetune_epochs)
                   for method in METHODS]
        tables += ["", f"Ratio {ratio}:", "", *table(results)]
    total = time.perf_counter() - start
    lines = [
        f"digits 8x8 (sklearn), small CNN {count_params(dense):,} params trained {args.epochs} epochs; "
        f"fine-tune {args.finetune_epochs} epochs (Adam 1e-3); seeds {args.seeds}; "
        f"{machine()}, {THREADS} threads; whole run {total:.0f} s",
        "",
        f"Dense test accuracy: {base:.1f}%",
        *tables,
    ]
    text = "\n".join(lines)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(f"# Pruning and accuracy\n\n{text}\n")
    print(text)
    return 0


def evaluate(method: str, dense: nn.Module, data: tuple[torch.Tensor, ...], ratio: float, seeds: list[int],
             finetune_epochs: int) -> Result:
    """Prune ``dense`` with ``method`` once per seed, fine-tune, and collect the accuracies."""
    x_train, y_train, x_test, y_test = data
    result = Result(method)
    for seed in seeds:
        try:
            t0 = time.perf_counter()
            pruned = prune_with(method, dense, x_train, y_train, ratio, seed)
            result.prune_s.append(time.perf_counter() - t0)
            result.params = count_params(pruned)
            result.pruned.append(accuracy(pruned, x_test, y_test))
            train(pruned, x_train, y_train, finetune_epochs, lr=1e-3, seed=seed)
            result.finetuned.append(accuracy(pruned, x_test, y_test))
        except Exception as exc:  # noqa: BLE001 - one row per method, whatever broke
            result.error = failure_cell(exc)
            break
    print(f"ratio {ratio} {method}: done", file=sys.stderr, flush=True)
    return result


def table(results: list[Result]) -> list[str]:
    lines = ["| importance | params after | accuracy pruned % | accuracy fine-tuned % | prune s | error |",
             "|---|---|---|---|---|---|"]
    for r in results:
        params = "" if r.params is None else f"{r.params:,}"
        seconds = f"{statistics.median(r.prune_s):.2f}" if r.prune_s else ""
        lines.append(f"| {r.method} | {params} | {_mean_std(r.pruned)} | {_mean_std(r.finetuned)} | "
                     f"{seconds} | {r.error} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
