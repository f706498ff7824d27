"""Plan time and gap against graph size: GPT-like layered DAGs from 10^2 to 10^4 nodes.

Usage::

    python bench/plan_scale.py [--stages 8,16] [--time-limit 10]

Graphs come from ``tests/test_partition.py::gpt_like`` (~32 nodes per layer,
residual skips, tied head); links of 10 GB/s. For each size and depth prints the
plan time, the bottleneck, the lower bound and the gap, the trivial bound's gap
(max(ΣT/d, max node)) for comparison, and whether the CP-SAT model was coarsened.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fxpipe.passes.coarsen import graph_costs  # noqa: E402
from fxpipe.passes.partition import partition, trivial_lower_bound  # noqa: E402
from test_partition import FakeCostModel, gpt_like  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="8,16")
    ap.add_argument("--layers", default="3,12,48,100,200,300")
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--bandwidth", type=float, default=1e10)
    ap.add_argument("--memory", action="store_true", help="also a memory-limited run (85%% of peak)")
    args = ap.parse_args()
    cm = FakeCostModel(bandwidth=args.bandwidth)
    print(f"gpt_like graphs, links {args.bandwidth:.0e} B/s, time_limit {args.time_limit} s, 2bw, m=2d")
    print(f"{'layers':>6} {'nodes':>6} {'d':>3} {'plan s':>7} {'T_max ms':>9} {'LB ms':>9} "
          f"{'gap':>7} {'trivial gap':>11} {'blocks':>6} status")
    for layers in [int(x) for x in args.layers.split(",")]:
        gm = gpt_like(layers)
        gc = graph_costs(gm, cm)
        for d in [int(x) for x in args.stages.split(",")]:
            for limit_frac in ((None, 0.85) if args.memory else (None,)):
                limit = None
                if limit_frac is not None:
                    free = partition(gm, cm, num_stages=d, num_microbatches=2 * d,
                                     time_limit=args.time_limit)
                    limit = int(limit_frac * max(s.memory for s in free.stages))
                t0 = time.perf_counter()
                p = partition(gm, cm, num_stages=d, num_microbatches=2 * d, memory_limit=limit,
                              time_limit=args.time_limit)
                dt = time.perf_counter() - t0
                triv = trivial_lower_bound(gc, d)
                tag = "" if limit is None else " (mem 85%)"
                print(f"{layers:>6} {gc.n:>6} {d:>3} {dt:7.2f} {p.bottleneck * 1e3:9.3f} "
                      f"{p.lower_bound * 1e3:9.3f} {p.gap:7.2%} {1 - triv / p.bottleneck:11.2%} "
                      f"{p.extra['blocks']:>6} {p.extra['status']}{tag}", flush=True)


if __name__ == "__main__":
    main()
