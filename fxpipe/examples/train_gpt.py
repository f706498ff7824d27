"""The main job: compile a small GPT, print its plan, train it under PipeDream-2BW on a shipped text.

The recipe is a real run's: bf16 autocast with fp32 master weights, global-norm gradient clipping,
and a linear-warmup + cosine learning-rate schedule; a held-out batch is evaluated before and after.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import fxpipe
from fxpipe.examples.gpt import GPT, CharData, GPTConfig, lm_loss

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fxpipe demo", description=__doc__)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--schedule", default="2bw", choices=fxpipe.ir.SCHEDULES)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="bf16", choices=fxpipe.precision.PRECISIONS)
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="clip by the global L2 norm (0: off)")
    ap.add_argument("--warmup", type=int, default=30, help="linear warmup steps before the cosine decay")
    args = ap.parse_args(argv)
    for flag in ("steps", "stages", "microbatches", "batch", "block"):
        if getattr(args, flag) < 1:
            raise fxpipe.ConfigError(f"--{flag} {getattr(args, flag)} must be >= 1")
    if not args.lr > 0:
        raise fxpipe.ConfigError(f"--lr {args.lr} must be > 0")

    torch.manual_seed(args.seed)
    data = CharData()
    model = GPT(GPTConfig(vocab=data.vocab, block=args.block, d=128, n_layer=4, n_head=4))
    g = torch.Generator().manual_seed(args.seed)
    x, y = data.batch(args.batch, args.block, g)
    t0 = time.perf_counter()
    pipe = fxpipe.compile(model, (x,), num_stages=args.stages, num_microbatches=args.microbatches,
                          schedule=args.schedule, loss_fn=lm_loss, precision=args.precision,
                          max_grad_norm=args.max_grad_norm or None, lr_scheduler=lambda opt: warmup_cosine(
                              opt, args.warmup, max(args.steps, 1)),
                          optimizer=lambda ps: torch.optim.AdamW(ps, lr=args.lr, weight_decay=0.0))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"fxpipe demo: GPT with {n_params / 1e6:.2f} M parameters, {data.vocab}-character vocabulary, "
          f"{len(data.data):,} characters of text; compiled in {time.perf_counter() - t0:.2f} s")
    print(pipe.plan.summary())
    print(f"training: {args.precision}, clip at global norm {args.max_grad_norm or 'off'}, lr {args.lr:g} with "
          f"{args.warmup} warmup steps then cosine to 10%")
    print()
    held_x, held_y = data.batch(args.batch, args.block, torch.Generator().manual_seed(args.seed + 1))
    held_before = pipe.evaluate(held_x, held_y).item()
    losses = []
    quiet = os.environ.get("FXPIPE_QUIET") == "1"
    bar = tqdm(range(args.steps), desc=f"training ({args.schedule})", disable=quiet, file=sys.stdout,
               mininterval=0.5)
    t1 = time.perf_counter()
    for step in bar:
        x, y = data.batch(args.batch, args.block, g)
        loss = pipe.step(x, y).item()
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        if quiet and step % 25 == 0:
            print(f"step {step:4d}  loss {loss:.4f}")
    elapsed = time.perf_counter() - t1
    k = max(1, min(20, len(losses) // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"loss: first {k} steps {first:.3f} -> last {k} steps {last:.3f} "
          f"({args.steps} steps, {args.steps * args.batch / elapsed:.1f} samples/s)")
    norm = pipe.last_grad_norm
    print(f"held-out batch: {held_before:.3f} -> {pipe.evaluate(held_x, held_y).item():.3f}"
          + (f"; last gradient norm {norm:.3f}" if norm is not None else ""))
    return 0 if last < first else 1


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine decay to 10% of the peak at ``steps``."""
    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        frac = min(1.0, (t - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


if __name__ == "__main__":
    raise SystemExit(main())
