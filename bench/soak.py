"""Resident memory of a long 2-rank 2bw run under the distributed executor (gloo), per rank.

Usage::

    python bench/soak.py [--steps 2000] [--every 200] [--width 256] [--layers 4] [--batch 64] [--m 4]
                         [--model mlp|gpt]

Launches 2 ranks as torchrun would (RANK / WORLD_SIZE / MASTER_* in each process's
environment, one thread each), trains the same batch ``--steps`` times with schedule
"2bw" and never drains in between (no save, state_dict or report), so everything the
executor keeps from one step to the next shows as growth.  Each rank prints its
resident set size (VmRSS of /proc/self/status) every ``--every`` steps; the summary
is the growth from step ``--every`` (after warm-up: allocator pools, gloo buffers)
to the last step, per rank, and FAIL when it is 2% or more on any rank.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    """This process's resident set size in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    import fxpipe

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank = int(os.environ["RANK"])
    if args.model == "gpt":          # the demo GPT (tied embedding: 2bw all-reduces at every update)
        from fxpipe.examples.gpt import GPT, GPTConfig, lm_loss

        model = GPT(GPTConfig(vocab=96, block=32, d=args.width, n_layer=args.layers, n_head=4))
        x = torch.randint(0, 96, (args.batch, 32))
        y = torch.randint(0, 96, (args.batch, 32))
        loss_fn = lm_loss
    else:
        mods: list[nn.Module] = []
        for _ in range(args.layers):
            mods += [nn.Linear(args.width, args.width), nn.Tanh()]
        model = nn.Sequential(*mods)
        x = torch.randn(args.batch, args.width)
        y = torch.randn(args.batch, args.width)
        loss_fn = F.mse_loss
    pipe = fxpipe.compile(model, (x,), num_stages=2, num_microbatches=args.m, schedule="2bw",
                          loss_fn=loss_fn, executor="distributed",
                          optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9))
    rows = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        pipe.step(x, y)
        if step % args.every == 0:
            pending = len(pipe._executor._sends)
            rows.append({"step": step, "rss_mib": rss_mib(), "pending_sends": pending,
                         "seconds": time.perf_counter() - t0})
            print(f"rank {rank} step {step:6d} rss {rows[-1]['rss_mib']:9.1f} MiB  pending sends {pending}",
                  flush=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(rows))
    import torch.distributed as dist

    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--model", choices=("mlp", "gpt"), default="mlp")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < args.every * 2:
        ap.error(f"--steps {args.steps} must be at least 2 x --every {args.every} to measure growth")
    if args.worker:
        worker(args)
        return 0
    out = tempfile.mkdtemp(prefix="fxpipe_soak_")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    t0 = time.time()
    for r in range(2):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--out", out,
                                       *[a for a in sys.argv[1:]]], env=env))
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, args.timeout - (time.time() - t0))))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if codes != [0, 0]:
        print(f"soak: ranks exited with {codes}", file=sys.stderr)
        return 1
    print(f"\n{args.model} width {args.width}, batch {args.batch} = {args.m} microbatches, 2 ranks x 1 thread, "
          f"2bw, {args.steps} steps; RSS in MiB")
    data = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    print(f"{'step':>6}  " + "  ".join(f"{'rank ' + str(r):>10}" for r in range(2)) + "  pending sends (r0, r1)")
    for a, b in zip(*data):
        print(f"{a['step']:6d}  {a['rss_mib']:10.1f}  {b['rss_mib']:10.1f}  {a['pending_sends']}, {b['pending_sends']}")
    worst = 0.0
    for r, rows in enumerate(data):
        first, last = rows[0]["rss_mib"], rows[-1]["rss_mib"]
        growth = (last - first) / first * 100
        worst = max(worst, growth)
        print(f"rank {r}: {first:.1f} -> {last:.1f} MiB from step {rows[0]['step']} to {rows[-1]['step']}: "
              f"{growth:+.2f}%  ({rows[-1]['seconds'] / rows[-1]['step'] * 1e3:.2f} ms/step)")
    verdict = "OK" if worst < 2.0 else "FAIL"
    print(f"soak: worst growth {worst:+.2f}% (limit < 2%) -> {verdict}; wall {time.time() - t0:.0f} s")
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
