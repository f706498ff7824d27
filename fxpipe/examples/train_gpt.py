"""The main job: compile a small GPT, print its plan, train it under PipeDream-2BW on a shipped text."""

from __future__ import annotations

import argparse
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
                          schedule=args.schedule, loss_fn=lm_loss,
                          optimizer=lambda ps: torch.optim.AdamW(ps, lr=args.lr, weight_decay=0.0))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"fxpipe demo: GPT with {n_params / 1e6:.2f} M parameters, {data.vocab}-character vocabulary, "
          f"{len(data.data):,} characters of text; compiled in {time.perf_counter() - t0:.2f} s")
    print(pipe.plan.summary())
    print()
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
    return 0 if last < first else 1


if __name__ == "__main__":
    raise SystemExit(main())
