"""Samples/s of one process vs a 2-stage pipeline (2 ranks, gloo), one thread per process.

Usage::

    python bench/pipeline_throughput.py [--steps 12] [--width 512] [--layers 8] [--batch 256] [--m 8]

Prints one table: the whole model in one process (plain PyTorch training loop,
gradient accumulation over m microbatches), then fxpipe's distributed executor with
2 stages under 2bw and flush; for each the speed-up over one process and the
fraction of the ideal (microbatch / max_s T_s, T_s = measured fwd+bwd time of
stage s per microbatch, one thread), and 2bw/flush against (m + d - 1) / m.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def make_model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods)


def data(width: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)


def opt(ps):  # noqa: ANN001, ANN201
    return torch.optim.SGD(ps, lr=1e-3, momentum=0.9)


def run_single(a: argparse.Namespace) -> dict:
    model = make_model(a.width, a.layers)
    x, y = data(a.width, a.batch)
    o = opt(model.parameters())

    def step() -> None:
        for xm, ym in zip(x.chunk(a.m), y.chunk(a.m)):
            (nn.functional.mse_loss(model(xm), ym) / a.m).backward()
        o.step()
        o.zero_grad()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    dt = time.perf_counter() - t0
    # per-stage fwd+bwd time of one microbatch for the ideal (same contiguous 2-way cut as the pipeline)
    from dist_worker import build

    pipe = build(make_model(a.width, a.layers), x, stages=2, m=a.m, schedule="flush",
                 loss_fn=nn.functional.mse_loss, optimizer=opt, executor="local")
    xm = x.chunk(a.m)[0]
    stage_t = []
    h = xm
    for st in pipe.stages:
        hin = h.detach().requires_grad_(st is not pipe.stages[0])
        for _ in range(3):
            out = st(hin)[0]
            out.sum().backward()
        t1 = time.perf_counter()
        for _ in range(10):
            out = st(hin)[0]
            out.sum().backward()
        stage_t.append((time.perf_counter() - t1) / 10)
        h = out.detach()
    return {"samples_per_s": a.steps * a.batch / dt, "stage_seconds": stage_t}


def run_rank(a: argparse.Namespace, schedule: str, out: Path) -> None:
    from dist_worker import build

    x, y = data(a.width, a.batch)
    pipe = build(make_model(a.width, a.layers), x, stages=2, m=a.m, schedule=schedule,
                 loss_fn=nn.functional.mse_loss, optimizer=opt, executor="distributed")
    for _ in range(2):
        pipe.step(x, y)
    pipe.state_dict()          # drains: every rank starts the clock together
    t0 = time.perf_counter()
    for _ in range(a.steps):
        pipe.step(x, y)
    pipe.state_dict()          # drain the last batch's backwards/update so the work is complete
    dt = time.perf_counter() - t0
    rank = int(os.environ["RANK"])
    (out / f"{schedule}-{rank}.json").write_text(json.dumps({"samples_per_s": a.steps * a.batch / dt}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--rank-mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.rank_mode:
        run_rank(a, a.rank_mode, Path(a.out))
        import torch.distributed as dist

        dist.destroy_process_group()
        return

    import subprocess

    from dist_worker import free_port

    single = run_single(a)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in ("2bw", "flush"):
            port = free_port()
            procs = []
            for r in range(2):
                env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           OMP_NUM_THREADS="1", LOCAL_RANK=str(r))
                procs.append(subprocess.Popen([sys.executable, __file__, "--rank-mode", schedule, "--out", tmp,
                                               "--steps", str(a.steps), "--width", str(a.width), "--layers",
                                               str(a.layers), "--batch", str(a.batch), "--m", str(a.m)], env=env))
            codes = [pr.wait(timeout=600) for pr in procs]
            if any(codes):
                raise SystemExit(f"{schedule} run failed: exit codes {codes}")
            rows[schedule] = min(json.loads((Path(tmp) / f"{schedule}-{r}.json").read_text())["samples_per_s"]
                                 for r in range(2))
    mb = a.batch // a.m
    ideal = mb / max(single["stage_seconds"])
    base = single["samples_per_s"]
    d = 2
    print(f"MLP {a.layers}x{a.width}, batch {a.batch} = {a.m} microbatches of {mb}, float32, 1 thread per process, "
          f"{a.steps} timed steps")
    print(f"stage fwd+bwd per microbatch (s): {', '.join(f'{t:.4f}' for t in single['stage_seconds'])}; "
          f"ideal 2-stage = {ideal:,.0f} samples/s")
    print(f"{'run':<24}{'samples/s':>12}{'vs 1 proc':>11}{'of ideal':>10}")
    print(f"{'1 process (whole model)':<24}{base:>12,.0f}{1.0:>10.2f}x{base / ideal:>10.2f}")
    for s in ("2bw", "flush"):
        print(f"{'2 stages, ' + s:<24}{rows[s]:>12,.0f}{rows[s] / base:>10.2f}x{rows[s] / ideal:>10.2f}")
    print(f"2bw / flush = {rows['2bw'] / rows['flush']:.3f}; (m + d - 1) / m = {(a.m + d - 1) / a.m:.3f}")


if __name__ == "__main__":
    main()
