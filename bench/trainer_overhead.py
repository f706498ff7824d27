"""Executor overhead: the plain PyTorch loop vs fxpipe with 1 and 2 stages in one process, fp32 and bf16.

The same GPT (fxpipe.examples.gpt, the demo's model), the same batch, m microbatches, AdamW:

* plain: ``for each microbatch: (loss / m).backward()`` under the same autocast, then ``opt.step()``
* fxpipe-1 / fxpipe-2: ``pipe.step(x, y)`` with num_stages=1 / 2, schedule="flush" (the same math)

Rounds are interleaved (every variant once per round, in turn, the order reversed every other
round so no variant always follows the same one); each variant's time per step is the median
[min-max] over rounds, and its ratio to the plain loop of the same precision is printed side by
side.  Threads are pinned (``torch.set_num_threads``); every variant is warmed up by two steps.
Wall-clock and process CPU time are both printed: on a shared machine the CPU time is the one
other processes disturb less.

    .venv/bin/python bench/trainer_overhead.py --rounds 5 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fxpipe
from fxpipe.examples.gpt import GPT, CharData, GPTConfig, lm_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    data = CharData()
    cfg = GPTConfig(vocab=data.vocab, block=a.block, d=128, n_layer=4, n_head=4)
    x, y = data.batch(a.batch, a.block, torch.Generator().manual_seed(0))
    adam = lambda ps: torch.optim.AdamW(ps, lr=1e-3)  # noqa: E731

    def plain(precision: str):
        model = GPT(cfg)
        opt = adam(model.parameters())

        def step() -> None:
            for xm, ym in zip(x.chunk(a.m), y.chunk(a.m)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = lm_loss(model(xm), ym)
                (loss / a.m).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def piped(stages: int, precision: str):
        pipe = fxpipe.compile(GPT(cfg), (x,), num_stages=stages, num_microbatches=a.m, schedule="flush",
                              loss_fn=lm_loss, optimizer=adam, precision=precision)
        return lambda: pipe.step(x, y)

    variants = {}
    for prec in ("fp32", "bf16"):
        variants[("plain", prec)] = plain(prec)
        variants[("fxpipe-1", prec)] = piped(1, prec)
        variants[("fxpipe-2", prec)] = piped(2, prec)
    for fn in list(variants.values()) * 2:           # warm up
        fn()
    times: dict = {k: [] for k in variants}
    cpu: dict = {k: [] for k in variants}
    order = list(variants.items())
    for r in range(a.rounds):
        for k, fn in (order if r % 2 == 0 else order[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(a.steps):
                fn()
            times[k].append((time.perf_counter() - t0) / a.steps)
            cpu[k].append((time.process_time() - c0) / a.steps)
    print(f"GPT d=128 4 layers, batch {a.batch} x {a.block} tokens, m={a.m}, {a.threads} thread(s), "
          f"{a.rounds} interleaved rounds x {a.steps} steps; seconds per step, median [min-max]")
    for what, table in (("wall clock", times), ("process CPU time", cpu)):
        print(f"-- {what}")
        print(f"{'variant':10s} {'fp32':>28s} {'ratio':>7s}   {'bf16':>28s} {'ratio':>7s}")
        for name in ("plain", "fxpipe-1", "fxpipe-2"):
            cells = []
            for prec in ("fp32", "bf16"):
                ts = table[(name, prec)]
                ratio = statistics.median(ts) / statistics.median(table[("plain", prec)])
                cells.append(f"{statistics.median(ts):9.4f} [{min(ts):.4f}-{max(ts):.4f}] {ratio:7.3f}")
            print(f"{name:10s} {cells[0]:>36s}   {cells[1]:>36s}")


if __name__ == "__main__":
    main()
