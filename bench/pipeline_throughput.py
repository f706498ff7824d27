"""Samples/s of one process vs a 2-stage pipeline (2 ranks, gloo), one thread per process.

Usage::

    python bench/pipeline_throughput.py [--rounds 3] [--steps 12] [--width 1024] [--layers 8]
                                        [--batch 256] [--m 8] [--malloc default|tuned]

Every measurement runs in fresh processes, and the configurations are interleaved
round by round (1 process with 1 thread, 1 process with 2 threads, 2 stages under
2bw, 2 stages under flush), because this shared 2-core VM's speed drifts by 20-40%
from one minute to the next: ratios are taken within a round and the median over
rounds is printed with its range.

'ideal' is the 2-stage throughput if each rank computed without pause at the speed
it actually had inside the pipeline (microbatch / max_s compute_s, from the
executor's own per-rank measurements, pipe.report()); 'busy' is the fraction of
each rank's wall time spent computing.  A 2-stage speed-up below 2x is then split
into what the pipeline lost (bubbles, waiting: busy < 100%) and what the hardware
lost (each rank computing slower than one process alone: 'stage slowdown').

``--malloc tuned`` (the default) sets glibc's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
in every process, the single-process baseline included, so freed gradient buffers are
reused instead of being unmapped and page-faulted back in each backward; on this
machine that made a 2-rank run 8-13% faster in a direct A/B.  ``--malloc default`` measures
glibc's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


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


def run_single(a: argparse.Namespace, out: Path, threads: int) -> None:
    """The whole model in one process: plain PyTorch, gradient accumulation over m microbatches."""
    torch.set_num_threads(threads)
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
    (out / f"single{threads}.json").write_text(json.dumps({"samples_per_s": a.steps * a.batch / dt,
                                                          "seconds_per_microbatch": dt / (a.steps * a.m)}))


def run_rank(a: argparse.Namespace, schedule: str, out: Path) -> None:
    """One rank of the 2-stage pipeline (RANK / WORLD_SIZE in the environment)."""
    torch.set_num_threads(1)
    from dist_worker import build

    x, y = data(a.width, a.batch)
    pipe = build(make_model(a.width, a.layers), x, stages=2, m=a.m, schedule=schedule,
                 loss_fn=nn.functional.mse_loss, optimizer=opt, executor="distributed")
    for _ in range(2):
        pipe.step(x, y)
    pipe.state_dict()          # drains: every rank starts the clock together
    t0 = time.perf_counter()
    compute = 0.0
    for _ in range(a.steps):
        pipe.step(x, y)
        ex = pipe._executor
        compute += sum(ex.fwd_seconds) + sum(ex.bwd_seconds)   # this rank's last m microbatches
    pipe.state_dict()          # drain the last batch's backwards/update so the work is complete
    dt = time.perf_counter() - t0
    rank = int(os.environ["RANK"])
    (out / f"{schedule}-{rank}.json").write_text(json.dumps({
        "samples_per_s": a.steps * a.batch / dt, "busy": compute / dt,
        "compute_per_microbatch": compute / (a.steps * a.m)}))


def _spawn(a: argparse.Namespace, mode: str, out: Path, env: dict[str, str], world: int) -> None:
    args = [sys.executable, __file__, "--rank-mode", mode, "--out", str(out), "--steps", str(a.steps),
            "--width", str(a.width), "--layers", str(a.layers), "--batch", str(a.batch), "--m", str(a.m)]
    if world == 1:
        procs = [subprocess.Popen(args, env=env)]
    else:
        from dist_worker import free_port

        port = str(free_port())
        procs = [subprocess.Popen(args, env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                 for r in range(world)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        raise SystemExit(f"{mode} run failed: exit codes {codes}")


def _rng(xs: list[float], fmt: str) -> str:
    return f"{format(statistics.median(xs), fmt)} [{format(min(xs), fmt)}-{format(max(xs), fmt)}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    p.add_argument("--rank-mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank_mode:
        out = Path(a.out)
        if a.rank_mode.startswith("single"):
            run_single(a, out, int(a.rank_mode[len("single"):]))
            return
        run_rank(a, a.rank_mode, out)
        import torch.distributed as dist

        dist.destroy_process_group()
        return

    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in TUNED_MALLOC:
        env.pop(k, None)
    if a.malloc == "tuned":
        env.update(TUNED_MALLOC)
    runs: dict[str, list[dict]] = {k: [] for k in ("single1", "single2", "2bw", "flush")}
    t_start = time.perf_counter()
    for _ in range(a.rounds):
        for mode in runs:
            with tempfile.TemporaryDirectory() as tmp:
                e = dict(env, OMP_NUM_THREADS="2") if mode == "single2" else env
                _spawn(a, mode, Path(tmp), e, 1 if mode.startswith("single") else 2)
                if mode.startswith("single"):
                    runs[mode].append(json.loads((Path(tmp) / f"{mode}.json").read_text()))
                else:
                    ranks = [json.loads((Path(tmp) / f"{mode}-{r}.json").read_text()) for r in range(2)]
                    runs[mode].append({"samples_per_s": min(r["samples_per_s"] for r in ranks),
                                       "busy": [r["busy"] for r in ranks],
                                       "compute": [r["compute_per_microbatch"] for r in ranks]})
    mb = a.batch // a.m
    d = 2
    print(f"MLP {a.layers}x{a.width}, batch {a.batch} = {a.m} microbatches of {mb}, float32, 1 thread per "
          f"pipeline process, {a.steps} timed steps, {a.rounds} interleaved rounds, malloc {a.malloc}; "
          f"median [min-max] over rounds")
    base = [r["samples_per_s"] for r in runs["single1"]]
    print(f"{'run':<26}{'samples/s':>24}{'vs 1 proc 1 thread':>28}")
    for mode, label in (("single1", "1 process, 1 thread"), ("single2", "1 process, 2 threads"),
                        ("2bw", "2 stages, 2bw"), ("flush", "2 stages, flush")):
        sps = [r["samples_per_s"] for r in runs[mode]]
        print(f"{label:<26}{_rng(sps, ',.0f'):>24}{_rng([s / b for s, b in zip(sps, base)], '.2f'):>28}")
    two = [s["samples_per_s"] for s in runs["single2"]]
    print(f"2bw vs 1 process with 2 threads (same total threads): "
          f"{_rng([r['samples_per_s'] / t for r, t in zip(runs['2bw'], two)], '.2f')}")
    print(f"2bw / flush: {_rng([x['samples_per_s'] / y['samples_per_s'] for x, y in zip(runs['2bw'], runs['flush'])], '.3f')}"
          f"; (m + d - 1) / m = {(a.m + d - 1) / a.m:.3f}")
    for mode in ("2bw", "flush"):
        ideal = [mb / max(r["compute"]) for r in runs[mode]]
        slow = [sum(r["compute"]) / s["seconds_per_microbatch"] for r, s in zip(runs[mode], runs["single1"])]
        print(f"{mode:>5}: busy rank0 {_rng([r['busy'][0] * 100 for r in runs[mode]], '.0f')}%, "
              f"rank1 {_rng([r['busy'][1] * 100 for r in runs[mode]], '.0f')}%; of ideal "
              f"{_rng([r['samples_per_s'] / i for r, i in zip(runs[mode], ideal)], '.2f')}; stage slowdown "
              f"(sum of in-pipeline stage compute / 1-process time) {_rng(slow, '.2f')}")
    print(f"wall {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
