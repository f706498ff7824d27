"""fxpipe against the tools a user would pick instead: partitions and throughput, measured.

Usage::

    python bench/peers.py [--rounds 3] [--steps 3] [--models mlp,gpt,cnn] [--depths 2,4] [--tuned-malloc]

Models (each written as an ``nn.Sequential`` of layers, so the real DeepSpeed and torchgpipe
see the same layer list as fxpipe's transcriptions of them):

    mlp   Linear/ReLU with uneven widths 512-2048-512-4096-512-1024-256 (11 layers)
    tiny  the same 11 layers 16 wide (not run by default): a step is nearly all the runtimes'
          own overhead and the messages' latency, so its row compares the runtimes, not the plans
    gpt   nanoGPT-style: [embedding (wte+wpe), 6 blocks, ln_f + head tied to wte] (8 layers),
          nanoGPT's initialisation (std 0.02)
    cnn   4 conv blocks (two with max-pooling) and a linear head, 32x32 inputs (6 layers)

Part 1, stage balance (one process, one thread, the local executor, flush): every plan is
trained and each stage's forward+backward per microbatch is measured; the plans are
interleaved round by round. ``bottleneck`` is the slowest stage, ``balance`` slowest / mean.

    fxpipe        fxpipe.plan, cost_model="profile" (fresh cache), its own cuts inside layers
    fxpipe+replan that plan trained 3 steps, then pipe.replan() from the measured stage times
                  (what compile(..., replan_after=3) switches to)
    ds-uniform    deepspeed.runtime.utils.partition_uniform (the real 0.19.8), layers
    ds-params     deepspeed.runtime.utils.partition_balanced over per-layer parameter counts
    tg-time       torchgpipe.balance.balance_by_time (the real 0.0.7), profiled on this CPU

Part 2, throughput (d gloo ranks, one thread each, ``d`` = 2 or 4): samples/s of fxpipe
(2bw and flush on its own plan) next to torch.distributed.pipelining's ScheduleGPipe and
Schedule1F1B on the equal split a user would write (DeepSpeed's uniform layer split) and on
fxpipe's plan (``pipe.to_torch_pipelining()``). Variants interleave round by round inside
one launch. For the tied GPT, ``to_torch_pipelining`` refuses (PyTorch would train two
copies of the tied weight), so those cells say so.

Numbers are median [min-max] over rounds; the order of the variants rotates by one each round, and
the ``paired`` lines take ratios inside a round (the VM's drift cancels). This VM has 2 cores shared
with other jobs: 4 ranks on 2 cores time-share, so 4-stage throughput mostly measures contention; the stage balance
of part 1 is the cleaner comparison of partitions.
"""

from __future__ import annotations

import argparse
import copy
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
M = 4                      # microbatches per batch


# -- models ---------------------------------------------------------------------------------------
class Embed(nn.Module):
    def __init__(self, vocab: int, block: int, d: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))


class Head(nn.Module):
    def __init__(self, embed: Embed, d: int, vocab: int) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = embed.wte.weight            # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


def build(name: str) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, object]:
    """(model, batch inputs, targets, loss_fn); the same seed every time."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name in ("mlp", "tiny"):
        widths = (512, 2048, 512, 4096, 512, 1024, 256) if name == "mlp" else (16,) * 7
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers), torch.randn(64, widths[0], generator=g), torch.randn(64, widths[-1], generator=g), F.mse_loss
    if name == "gpt":
        from fxpipe.examples.gpt import GPT, Block, GPTConfig

        c = GPTConfig(vocab=96, block=64, d=128, n_layer=6, n_head=4)
        emb = Embed(c.vocab, c.block, c.d)
        model = nn.Sequential(emb, *[Block(c) for _ in range(c.n_layer)], Head(emb, c.d, c.vocab))
        # nanoGPT's initialisation (normal, std 0.02), as fxpipe.examples.gpt.GPT: with PyTorch's default
        # N(0, 1) embedding the tied head gives logits of std ~14, a saturated softmax and 38% denormal
        # floats in the logits' gradient, which made the last stage's backward 1.8x slower than the
        # same ops on normal numbers (and than any per-op profile on random inputs prices it)
        model.apply(GPT._init)
        x = torch.randint(0, c.vocab, (16, c.block), generator=g)
        y = torch.randint(0, c.vocab, (16, c.block), generator=g)

        def lm_loss(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), t.reshape(-1))
        return model, x, y, lm_loss
    if name == "cnn":
        def block(a: int, b: int, pool: bool) -> nn.Sequential:
            mods = [nn.Conv2d(a, b, 3, padding=1), nn.ReLU()]
            return nn.Sequential(*mods, nn.MaxPool2d(2)) if pool else nn.Sequential(*mods)
        model = nn.Sequential(block(3, 32, False), block(32, 64, True), block(64, 64, False), block(64, 128, True),
                              nn.Flatten(), nn.Linear(128 * 8 * 8, 10))
        return model, torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g), F.cross_entropy
    raise SystemExit(f"unknown model {name!r}")


def fmt(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not xs:
        return "-"
    v = [x * scale for x in xs]
    return f"{statistics.median(v):.{digits}f} [{min(v):.{digits}f}-{max(v):.{digits}f}]"


# -- plans ----------------------------------------------------------------------------------------
def layer_plan(model: nn.Sequential, x: torch.Tensor, parts: list[int], d: int, solver: str):
    """An fxpipe Plan cutting the Sequential's layers at DeepSpeed-style boundaries ``parts``."""
    from fxpipe.api import prepare
    from fxpipe.passes.baselines import layer_units
    from fxpipe.passes.coarsen import graph_costs
    from fxpipe.passes.partition import plan_from_assignment

    cg = prepare(model, (x,), num_microbatches=M)
    gc = graph_costs(cg.gm, cg.cost_model)
    units = layer_units(cg.gm, gc)
    assert len(units) == len(model), ([u.key for u in units], len(model))
    stage_of = {}
    for s in range(d):
        for u in units[parts[s]:parts[s + 1]]:
            for v in u.nodes:
                stage_of[gc.names[v]] = s
    return plan_from_assignment(cg.gm, cg.cost_model, stage_of, [False] * d, num_microbatches=M,
                                schedule="flush", solver=solver)


def plans_for(name: str, d: int, cache: Path) -> tuple[dict, list[str]]:
    """name -> Plan for fxpipe and each importable peer; and notes on the peers skipped."""
    import fxpipe
    from fxpipe.passes.baselines import partition_uniform

    model, x, y, _ = build(name)
    os.environ["FXPIPE_CACHE_DIR"] = str(cache)
    plans = {"fxpipe": fxpipe.plan(model, (x,), num_stages=d, num_microbatches=M, schedule="flush",
                                   cost_model="profile", time_limit=5.0)}
    notes = []
    # replan_after in miniature: train 3 steps on fxpipe's plan, re-plan from the measured stage times
    pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=d, num_microbatches=M, schedule="flush",
                          loss_fn=build(name)[3], plan=plans["fxpipe"], cost_model="profile", executor="local",
                          optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-4))
    for _ in range(3):
        pipe.step(x, y)
    plans["fxpipe+replan"] = pipe.replan(time_limit=5.0).plan
    plans["equal"] = layer_plan(model, x, partition_uniform(len(model), d), d, "equal")
    try:
        from deepspeed.runtime.utils import partition_balanced as ds_balanced
        from deepspeed.runtime.utils import partition_uniform as ds_uniform

        plans["ds-uniform"] = layer_plan(model, x, list(ds_uniform(len(model), d)), d, "ds-uniform")
        counts = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in model]
        plans["ds-params"] = layer_plan(model, x, [int(v) for v in ds_balanced(counts, d)], d, "ds-params")
    except ImportError as e:
        notes.append(f"deepspeed not importable ({e}); pip install -e '.[peers]' --no-build-isolation")
    try:
        from torchgpipe.balance import balance_by_time

        xm = x.chunk(M)[0]
        balance = balance_by_time(d, copy.deepcopy(model), xm, device="cpu")
        parts = [0]
        for b in balance:
            parts.append(parts[-1] + b)
        plans["tg-time"] = layer_plan(model, x, parts, d, "tg-time")
    except ImportError as e:
        notes.append(f"torchgpipe not importable ({e}); pip install -e '.[peers]'")
    return plans, notes


# -- part 1: stage balance, one process -----------------------------------------------------------
def stage_balance(name: str, plans: dict, rounds: int, steps: int) -> dict[str, dict[str, list[float]]]:
    import fxpipe
    from fxpipe.calibrate import measurements

    model, x, y, loss_fn = build(name)
    pipes = {k: fxpipe.compile(copy.deepcopy(model), (x,), num_stages=p.num_stages, num_microbatches=M,
                               schedule="flush", loss_fn=loss_fn, plan=p, executor="local",
                               optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-4))
             for k, p in plans.items()}
    out: dict[str, dict[str, list[float]]] = {k: {"bottleneck": [], "balance": []} for k in plans}
    for _ in range(rounds):
        for k, pipe in pipes.items():
            pipe.step(x, y)                                   # warm
            per = []
            for _ in range(steps):
                pipe.step(x, y)
                per.append([m.fwd_time + m.bwd_time for m in measurements(pipe)])
            stage = [statistics.median(col) for col in zip(*per)]
            out[k]["bottleneck"].append(max(stage))
            out[k]["balance"].append(max(stage) / (sum(stage) / len(stage)))
    return out


# -- part 2: throughput on gloo ranks -------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    """One rank: every variant, interleaved round by round; rank 0 writes samples/s per variant."""
    import torch.distributed as dist
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    import fxpipe
    from fxpipe.ir import Plan

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model, x, y, loss_fn = build(args.model)
    given = {k: Plan.from_json(v) for k, v in json.loads(Path(args.plans).read_text()).items()}
    opt = lambda ps: torch.optim.SGD(ps, lr=1e-4)  # noqa: E731
    variants: dict[str, object] = {}
    notes: dict[str, str] = {}
    for sched in ("2bw", "flush"):
        variants[f"fxpipe {sched}"] = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=world,
                                                     num_microbatches=M, schedule=sched, loss_fn=loss_fn,
                                                     optimizer=opt, plan=given["fxpipe"], executor="distributed")
    for split in ("equal", "fxpipe"):
        for cls in (ScheduleGPipe, Schedule1F1B):
            key = f"torch {cls.__name__.replace('Schedule', '')} on {split} split"
            pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=world, num_microbatches=M,
                                  schedule="flush", loss_fn=loss_fn, optimizer=opt, plan=given[split],
                                  executor="distributed")
            try:
                stage = pipe.to_torch_pipelining()
            except fxpipe.FxpipeError as e:
                notes[key] = f"refused: {str(e)[:90]}"
                continue
            params = list(stage.submod.parameters())
            variants[key] = (cls(stage, n_microbatches=M, loss_fn=loss_fn),
                             torch.optim.SGD(params, lr=1e-4) if params else None)

    def run(v: object) -> None:
        if isinstance(v, tuple):
            sch, o = v
            if rank == 0:
                sch.step(x)
            elif rank == world - 1:
                sch.step(target=y, losses=[])
            else:
                sch.step()
            if o is not None:
                o.step()
                o.zero_grad()
        else:
            v.step(x, y)

    res: dict[str, list[float]] = {k: [] for k in variants}
    items = list(variants.items())
    for r in range(args.rounds):
        # each round starts one variant later: over len(items) rounds every variant runs in every position
        # (in a fixed order the last variant measured ~3-4% faster than the same code run first)
        for k, v in items[r % len(items):] + items[:r % len(items)]:
            run(v)                                  # warm
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run(v)
            if not isinstance(v, tuple):
                v._executor.drain()                 # 2bw: the last batch's tail counts too
            dist.barrier()
            res[k].append(args.steps * x.shape[0] / (time.perf_counter() - t0))
    if rank == 0:
        Path(args.out).write_text(json.dumps({"samples_per_s": res, "notes": notes}))
    dist.destroy_process_group()


def paired(sps: dict[str, list[float]]) -> list[str]:
    """Ratios taken round by round (the variants of a round ran back to back, so the machine's drift
    cancels): fxpipe's best schedule over torch's best on the same split, and flush over 1F1B."""
    ours = [k for k in ("fxpipe 2bw", "fxpipe flush") if sps.get(k)]
    theirs = [k for k in ("torch GPipe on fxpipe split", "torch 1F1B on fxpipe split") if sps.get(k)]
    if not ours or not theirs:
        return []
    rounds = range(len(sps[ours[0]]))
    best = [max(sps[k][r] for k in ours) / max(sps[k][r] for k in theirs) for r in rounds]
    out = [f"{'paired: fxpipe best / torch best':34s} {fmt(best, 1.0, 3)}  (same split, per round; "
           f"> 1 in {sum(b > 1 for b in best)} of {len(best)} rounds)"]
    if sps.get("fxpipe flush") and sps.get("torch 1F1B on fxpipe split"):
        fl = [a / b for a, b in zip(sps["fxpipe flush"], sps["torch 1F1B on fxpipe split"])]
        out.append(f"{'paired: fxpipe flush / torch 1F1B':34s} {fmt(fl, 1.0, 3)}")
    return out


# glibc malloc: keep freed blocks instead of unmapping them and faulting them back in (docs/runtime.md,
# "CPU ranks"); applies to every variant alike
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
                "MALLOC_TOP_PAD_": str(256 << 20)}


def launch(world: int, model: str, plans: Path, out: Path, rounds: int, steps: int, timeout: float,
           tuned_malloc: bool = False) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = dict(os.environ, **(TUNED_MALLOC if tuned_malloc else {}), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", FXPIPE_QUIET="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--model", model, "--plans", str(plans),
                                       "--out", str(out), "--rounds", str(rounds), "--steps", str(steps)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    t0 = time.time()
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, timeout - (time.time() - t0)))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"{model}/{world} ranks timed out after {timeout:.0f}s")
    if any(p.returncode for p in procs):
        raise SystemExit(f"{model}/{world} ranks failed: {[p.returncode for p in procs]}\n" + logs[0][-3000:])
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--models", default="mlp,gpt,cnn")
    ap.add_argument("--depths", default="2,4")
    ap.add_argument("--tuned-malloc", action="store_true",
                    help="run the gloo ranks with glibc's malloc tuned (TUNED_MALLOC), every variant alike")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--plans")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(1)
    os.environ.setdefault("FXPIPE_QUIET", "1")
    print(f"torch {torch.__version__}, 1 thread per process, m={M}, rounds={args.rounds}, steps={args.steps}, "
          f"malloc {'tuned' if args.tuned_malloc else 'default'}; "
          "median [min-max] over rounds")
    tmp = Path(tempfile.mkdtemp(prefix="fxpipe-peers-"))
    for name in args.models.split(","):
        for d in [int(v) for v in args.depths.split(",")]:
            t0 = time.time()
            plans, notes = plans_for(name, d, tmp / f"cache-{name}-{d}")
            for n in notes:
                print(f"note: {n}")
            bal = stage_balance(name, plans, args.rounds, args.steps)
            ref = statistics.median(bal["fxpipe"]["bottleneck"])
            print(f"\n== {name}, {d} stages: stage balance (local executor, flush, per microbatch)")
            print(f"{'plan':13s} {'stage sizes (nodes)':22s} {'bottleneck ms':24s} {'/ fxpipe':>8s}  balance (max/mean)")
            for k, p in plans.items():
                b = bal[k]["bottleneck"]
                sizes = "/".join(str(len(s.nodes)) for s in p.stages)
                print(f"{k:13s} {sizes:22s} {fmt(b, 1e3, 3):24s} {statistics.median(b) / ref:8.3f}  "
                      f"{fmt(bal[k]['balance'], 1.0, 3)}")
            pf = tmp / f"plans-{name}-{d}.json"
            pf.write_text(json.dumps({k: p.to_json() for k, p in plans.items()}))
            thr = launch(d, name, pf, tmp / f"thr-{name}-{d}.json", args.rounds, args.steps, timeout=600,
                         tuned_malloc=args.tuned_malloc)
            print(f"-- {name}, {d} gloo ranks: throughput (samples/s)")
            for k, v in thr["samples_per_s"].items():
                print(f"{k:34s} {fmt(v, 1.0, 1)}")
            for k, v in thr["notes"].items():
                print(f"{k:34s} {v}")
            for line in paired(thr["samples_per_s"]):
                print(line)
            print(f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
