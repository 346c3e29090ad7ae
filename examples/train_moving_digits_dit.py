"""Train graphopt's moving-digits video DiT (``graphopt.moving_digits``) on CPU; writes
``graphopt/data/moving_digits_dit.safetensors`` (``--variant long``: ``moving_digits_dit_long.safetensors``).

The recipe of ``train_digits_dit.py`` (rectified flow, logit-normal σ, class
dropout for classifier-free guidance) on clips of a digit moving across a
canvas; every batch draws fresh trajectories, so the model learns motion, not
a fixed set of clips.

    python examples/train_moving_digits_dit.py     # 8000 steps or 25 minutes, whichever ends first
    python examples/train_moving_digits_dit.py --variant long --max-minutes 40
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from graphopt import moving_digits as md
from graphopt.digits import NO_CLASS, digits_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--class-dropout", type=float, default=0.12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=25.0,
                        help="wall-clock budget: the learning-rate decay follows whichever of steps or time runs out "
                             "first, so a slow machine still ends on a decayed rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=sorted(md.VARIANTS), default="short")
    args = parser.parse_args()
    variant = md.VARIANTS[args.variant]

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = digits_images(md.DIGIT)
    transformer, class_embedding = md.build_modules(variant.config)
    parameters = list(transformer.parameters()) + list(class_embedding.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    started = time.time()
    smoothed, trained = None, 0
    progress = tqdm(range(args.steps), desc=f"moving digits DiT ({variant.name})")
    for step in progress:
        done = step / args.steps
        if args.max_minutes:
            done = max(done, (time.time() - started) / (60 * args.max_minutes))
        if done >= 1:
            break
        for group in optimizer.param_groups:  # linear warmup, then linear decay to 5%
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup) * max(0.05, 1 - done)
        index = torch.randint(0, images.shape[0], (args.batch_size,))
        clips = md.moving_clips(images[index], frames=variant.frames, canvas=variant.canvas)
        x0, label = md.pack_video(clips), labels[index].clone()
        label[torch.rand(args.batch_size) < args.class_dropout] = NO_CLASS
        sigma = torch.sigmoid(torch.randn(args.batch_size))
        noise = torch.randn_like(x0)
        s = sigma[:, None, None, None, None]
        tokens, _ = class_embedding(label)
        velocity = transformer(hidden_states=(1 - s) * x0 + s * noise, timestep=sigma * 1000,
                               encoder_hidden_states=tokens, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        progress.set_postfix(loss=f"{smoothed:.4f}")
        trained += 1

    md.save_moving_digits_pipeline(transformer, class_embedding, variant.config, variant.weights)
    size_kb = variant.weights.stat().st_size / 1024
    print(f"trained {trained} steps in {time.time() - started:.0f} s, final loss (EMA) {smoothed:.4f}; "
          f"wrote {variant.weights} ({size_kb:.0f} KiB)")


if __name__ == "__main__":
    main()
