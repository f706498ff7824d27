"""Plan quality: fxpipe's CP-SAT planner against the uniform / parameters / time baselines.

Usage::

    python bench/plan_quality.py [--depths 2,4,8,16] [--time-limit 10] [--device a100-80gb]

For each model (meta device, analytic cost model on a datacenter device preset)
and depth d, prints the bottleneck T_max (ms per microbatch) of every planner,
each as a ratio to fxpipe's proven lower bound (1.000 = provably optimal), plan
times, and "OOM" for a baseline plan over the memory limit. A last section runs
GPT-2 XL into 16 stages under a memory limit, and the depth x width search.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fxpipe.api import prepare  # noqa: E402
from fxpipe.passes.baselines import BASELINES  # noqa: E402
from fxpipe.errors import InfeasibleMemoryError  # noqa: E402
from fxpipe.passes.partition import partition  # noqa: E402
from fxpipe.presets import get_preset  # noqa: E402

GiB = 2 ** 30


class UnevenMLP(nn.Module):
    """An MLP whose layer widths vary 16x: parameter and time balance disagree."""

    def __init__(self, widths: tuple[int, ...] = (1024, 4096, 512, 8192, 1024, 2048, 16384, 1024,
                                                  4096, 8192, 512, 4096, 1024, 2048, 8192, 1024,
                                                  4096, 1024)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def models() -> list[tuple[str, nn.Module, tuple, int]]:
    """(name, model, example batch, microbatches) — all on the meta device."""
    out = []
    for name, m in (("gpt2-xl", 16), ("bert-large", 16), ("resnet-50", 16)):
        model, ex = get_preset(name)
        out.append((name, model, ex, m))
    with torch.device("meta"):
        mlp = UnevenMLP()
        x = torch.empty(256, 1024)
    out.append(("uneven-mlp", mlp, (x,), 16))
    return out


def fmt(plan, lb: float, limit: int | None) -> str:
    oom = plan.extra.get("over_memory") and limit is not None
    return f"{plan.bottleneck * 1e3:9.3f} {plan.bottleneck / lb:6.3f}{'*' if oom else ' '}"


def run_model(name: str, cg, depths: list[int], m: int, *, time_limit: float, k: int,
              limit: int | None) -> None:
    n = sum(1 for nd in cg.gm.graph.nodes if nd.op in ("call_function", "call_method", "call_module"))
    head = "planner:  fxpipe T_max(ms) ratio  " + "  ".join(f"{b:>10s} T  ratio" for b in BASELINES)
    print(f"\n== {name}: {n} nodes, m={m}, k={k}, memory_limit="
          f"{'none' if limit is None else f'{limit / GiB:.1f} GiB'}")
    print(f"{'d':>3} {'fxpipe ms':>9} {'/LB':>6} {'gap':>6} {'plan s':>6} | " +
          " | ".join(f"{b:>10s} ms   /LB " for b in BASELINES))
    del head
    for d in depths:
        kw = dict(num_stages=d, num_microbatches=m, schedule="2bw", memory_limit=limit,
                  optimizer_slots=k)
        t0 = time.perf_counter()
        p = partition(cg.gm, cg.cost_model, time_limit=time_limit, **kw)
        dt = time.perf_counter() - t0
        lb = p.lower_bound
        cells = []
        for bname, fn in BASELINES.items():
            bp = fn(cg.gm, cg.cost_model, **kw)
            cells.append(fmt(bp, lb, limit))
        print(f"{d:>3} {p.bottleneck * 1e3:9.3f} {p.bottleneck / lb:6.3f} {p.gap:6.2%} {dt:6.2f} | "
              + " | ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="2,4,8,16")
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--device", default="a100-80gb")
    args = ap.parse_args()
    depths = [int(x) for x in args.depths.split(",")]
    print(f"device {args.device}; ratios are T_max / fxpipe's lower bound; '*' = over the "
          f"memory limit (OOM)")
    graphs = {}
    for name, model, ex, m in models():
        t0 = time.perf_counter()
        cg = prepare(model, ex, num_microbatches=m, device=args.device)
        graphs[name] = (cg, m)
        print(f"prepared {name} in {time.perf_counter() - t0:.1f} s")
        run_model(name, cg, depths, m, time_limit=args.time_limit, k=2, limit=None)

    # memory-limited (Adam, k=2): the limit is 85% of the unconstrained fxpipe plan's peak,
    # so it binds (or, when no plan fits that, halfway between the smallest feasible limit
    # and the peak); baselines choose recompute per stage but cut without looking at memory.
    for name in ("gpt2-xl", "bert-large", "uneven-mlp"):
        cg, m = graphs[name]
        print(f"\n== {name} (memory-limited: 85% of the unconstrained plan's peak)")
        for d in (4, 8, 16):
            free = partition(cg.gm, cg.cost_model, num_stages=d, num_microbatches=m,
                             optimizer_slots=2, time_limit=args.time_limit)
            limit = int(0.85 * max(st.memory for st in free.stages))
            kw = dict(num_stages=d, num_microbatches=m, schedule="2bw", memory_limit=limit,
                      optimizer_slots=2)
            t0 = time.perf_counter()
            try:
                p = partition(cg.gm, cg.cost_model, time_limit=args.time_limit, **kw)
            except InfeasibleMemoryError as e:
                need = e.min_feasible
                print(f"{d:>3} limit {limit / GiB:6.2f} GiB: fxpipe {type(e).__name__}"
                      + (f" (no plan fits under {need / GiB:.2f} GiB)" if need else ""))
                if not need or need >= max(st.memory for st in free.stages):
                    continue
                # then a limit halfway between that bound and the unconstrained peak: binding, maybe feasible
                limit = (need + max(st.memory for st in free.stages)) // 2
                kw["memory_limit"] = limit
                t0 = time.perf_counter()
                try:
                    p = partition(cg.gm, cg.cost_model, time_limit=args.time_limit, **kw)
                except InfeasibleMemoryError as e2:
                    print(f"{d:>3} limit {limit / GiB:6.2f} GiB: fxpipe {type(e2).__name__}")
                    continue
            dt = time.perf_counter() - t0
            cells = [fmt(fn(cg.gm, cg.cost_model, **kw), p.lower_bound, limit)
                     for fn in BASELINES.values()]
            print(f"{d:>3} limit {limit / GiB:6.2f} GiB {p.bottleneck * 1e3:9.3f} "
                  f"{p.bottleneck / p.lower_bound:6.3f} {p.gap:6.2%} {dt:6.2f} | "
                  + " | ".join(cells), flush=True)

    # the search over depth and width for 16 devices
    import fxpipe

    for name in ("gpt2-xl", "bert-large"):
        model, ex = get_preset(name)
        t0 = time.perf_counter()
        p = fxpipe.plan(model, ex, num_stages=None, num_microbatches=1, schedule="2bw",
                        optimizer=lambda ps: torch.optim.Adam(ps), cost_model="analytic",
                        memory_limit=80 * GiB, device=args.device, num_devices=16, global_batch=512,
                        time_limit=30.0)
        s = p.extra["search"]
        solved = [r for r in s["candidates"] if r["status"] == "solved"]
        print(f"\n== search {name}: 16 x {args.device}, B=512, Adam, 80 GiB: d={p.num_stages} "
              f"w={p.data_parallel} b={p.microbatch_size} m={p.num_microbatches} "
              f"{s['samples_per_s']:.1f} samples/s ({len(s['candidates'])} candidates, "
              f"{len(solved)} solved, {time.perf_counter() - t0:.1f} s)")
        for r in sorted(solved, key=lambda r: -r["samples_per_s"])[:6]:
            print(f"   d={r['d']:2d} w={r['w']:2d} b={r['b']:2d} m={r['m']:3d} "
                  f"{r['samples_per_s']:9.1f} samples/s  all-reduce exposed "
                  f"{r['allreduce_exposed'] * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
