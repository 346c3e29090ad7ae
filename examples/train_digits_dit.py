"""Train graphopt's digits DiT (``graphopt.digits``) on CPU and write ``graphopt/data/digits_dit.safetensors``.

Rectified flow (Liu et al. 2022; Esser et al. 2024) in the convention of
diffusers' ``FlowMatchEulerDiscreteScheduler``: x_σ = (1-σ)·x0 + σ·ε, the model
predicts the velocity ε - x0 and is given σ as its timestep (the pipeline passes
t/1000 = σ). σ is drawn logit-normally (SD3's choice, it spends steps on the
middle of the path). Labels are dropped to the "no class" row with probability
``--class-dropout`` so one model gives both branches of classifier-free guidance.

    python examples/train_digits_dit.py            # 1200 steps or 10 minutes, whichever ends first

On a CPU shared with other jobs use ``--threads 1``: OpenMP threads that wait on
each other's time slices made a 2-thread step 40x slower there.
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from graphopt import digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--class-dropout", type=float, default=0.12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=10.0,
                        help="wall-clock budget: the learning-rate decay follows whichever of steps or time runs out "
                             "first, so a slow machine still ends on a decayed rate (the result then depends on speed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = digits.digits_images()
    transformer, class_embedding = digits.build_modules(digits.TRANSFORMER_CONFIG)
    parameters = list(transformer.parameters()) + list(class_embedding.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    img_ids = digits.image_ids(digits.IMAGE_SIZE, digits.IMAGE_SIZE)
    txt_ids = torch.zeros(class_embedding.tokens, 3)

    started = time.time()
    smoothed, trained = None, 0
    progress = tqdm(range(args.steps), desc="digits DiT")
    for step in progress:
        done = step / args.steps
        if args.max_minutes:
            done = max(done, (time.time() - started) / (60 * args.max_minutes))
        if done >= 1:
            break
        for group in optimizer.param_groups:  # linear warmup, then linear decay to 5%
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup) * max(0.05, 1 - done)
        index = torch.randint(0, images.shape[0], (args.batch_size,))
        x0, label = images[index], labels[index].clone()
        label[torch.rand(args.batch_size) < args.class_dropout] = digits.NO_CLASS
        sigma = torch.sigmoid(torch.randn(args.batch_size))
        noise = torch.randn_like(x0)
        s = sigma[:, None, None, None]
        noisy = digits.pack_latents((1 - s) * x0 + s * noise)
        tokens, pooled = class_embedding(label)
        velocity = transformer(hidden_states=noisy, encoder_hidden_states=tokens, pooled_projections=pooled,
                               timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(velocity, digits.pack_latents(noise - x0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        progress.set_postfix(loss=f"{smoothed:.4f}")
        trained += 1

    digits.save_digits_pipeline(transformer, class_embedding, digits.TRANSFORMER_CONFIG)
    size_kb = digits.PIPELINE_WEIGHTS.stat().st_size / 1024
    print(f"trained {trained} steps in {time.time() - started:.0f} s, final loss (EMA) {smoothed:.4f}; "
          f"wrote {digits.PIPELINE_WEIGHTS} ({size_kb:.0f} KiB)")


if __name__ == "__main__":
    main()
