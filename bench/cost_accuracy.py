"""Predicted vs measured forward+backward time and saved activation bytes, analytic and profiled cost models.

Usage: ``python bench/cost_accuracy.py [--repeats 15] [--rounds 3]``. For each model the sum
of the per-node predictions is set beside one real training step of the whole
model (median of repeats) and the bytes autograd saves for it (parameters and
buffers excluded, each storage once). Three predictors::

    analytic         roofline of the measured CPU spec, wall clock, all torch threads
    profiled         per-op timing on this machine, wall clock, all torch threads
    profiled/cpu-1t  per-op timing in thread CPU time on one thread, against the
                     whole step in thread CPU time: insensitive to other processes

Prints one row per (model, predictor) and the machine load, since wall-clock
numbers on a shared machine move with it: each round profiles afresh and then
measures; the rows give medians over rounds, and err is the median of the per-round
errors (not of the median columns) with their range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fxpipe.cost_models.analytic import AnalyticCostModel  # noqa: E402
from fxpipe.cost_models.device import get_device  # noqa: E402
from fxpipe.cost_models.profiled import ProfiledCostModel  # noqa: E402
from fxpipe.ir import META_COST  # noqa: E402
from fxpipe.passes.annotate import annotate  # noqa: E402
from fxpipe.passes.shape_prop import shape_prop  # noqa: E402
from fxpipe.trace import trace  # noqa: E402
from models import MLP, TinyGPT  # noqa: E402


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages with pooling, then a linear classifier (CIFAR-sized inputs)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        chans = [3, 32, 64, 128]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
                          nn.MaxPool2d(2))
            for a, b in zip(chans[:-1], chans[1:]))
        self.head = nn.Linear(chans[-1] * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.stages:
            x = s(x)
        return self.head(F.relu(x.flatten(1)))


def _models() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [
        ("mlp", MLP((512, 1024, 1024, 1024, 512, 256)), torch.randn(64, 512)),
        ("gpt", TinyGPT(vocab=256, d=128, n_layer=4, n_head=4, block=64), torch.randint(0, 256, (8, 64))),
        ("cnn", SmallCNN(), torch.randn(16, 3, 32, 32)),
    ]


def measure_step(model: nn.Module, x: torch.Tensor, clock: Callable[[], float], repeats: int) -> float:
    """Median seconds of forward + backward of the whole model (3 warm-up steps)."""
    out = model(x)
    grad = torch.randn_like(out)
    steps = []
    for i in range(repeats + 3):
        t0 = clock()
        model(x).backward(grad)
        dt = clock() - t0
        model.zero_grad(set_to_none=True)
        if i >= 3:
            steps.append(dt)
    return statistics.median(steps)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for one forward: non-parameter, non-buffer tensors, each storage once."""
    skip = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage()._cdata not in skip:
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def _err(pred: float, meas: float) -> str:
    return f"{(pred - meas) / meas * 100:+6.1f}%" if meas else "   -"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15, help="timed whole-model steps (median)")
    ap.add_argument("--rounds", type=int, default=3, help="profile-then-measure rounds (median, [range])")
    args = ap.parse_args(argv)
    os.environ.setdefault("FXPIPE_QUIET", "1")
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = get_device("cpu")
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, load average {load:.2f}; "
          f"cpu spec: {cpu.peak('float32') / 1e9:.0f} GFLOP/s fp32, {cpu.mem_bandwidth / 1e9:.1f} GB/s, "
          f"{cpu.kernel_overhead * 1e6:.2f} us/kernel")
    head = f"{'model':5s} {'predictor':16s} {'nodes':>5s} {'pred F+B':>10s} {'meas F+B':>10s} {'err [range]':>19s} " \
           f"{'pred act':>10s} {'meas act':>10s} {'err':>7s} {'annotate':>8s}"
    print(head)
    print("-" * len(head))
    rows: dict[tuple[str, str], list[tuple[float, float, float, float, float, int]]] = {}
    nodes: dict[str, int] = {}
    for _ in range(args.rounds):                       # fresh profile cache every round
        with tempfile.TemporaryDirectory() as cache:
            for name, model, x in _models():
                act_meas = saved_bytes(model, x)
                gm = trace(model, (x,))
                shape_prop(gm, x)
                nodes[name] = sum(1 for n in gm.graph.nodes if n.op.startswith("call"))
                runs = [("analytic", AnalyticCostModel(cpu), threads, time.perf_counter),
                        ("profiled", ProfiledCostModel(cpu, cache_dir=cache), threads, time.perf_counter),
                        ("profiled/cpu-1t", ProfiledCostModel(cpu, cache_dir=cache, timer=time.thread_time), 1,
                         time.thread_time)]
                for label, cm, n_threads, clock in runs:
                    torch.set_num_threads(n_threads)
                    try:
                        t0 = time.perf_counter()
                        annotate(gm, cm)
                        t_annotate = time.perf_counter() - t0
                        costs = [n.meta[META_COST] for n in gm.graph.nodes]
                        pred = sum(c.fwd_time + c.bwd_time for c in costs)
                        act_pred = sum(c.activation_bytes for c in costs)
                        meas = measure_step(model, x, clock, args.repeats)
                    finally:
                        torch.set_num_threads(threads)
                    rows.setdefault((name, label), []).append((pred, meas, (pred - meas) / meas, t_annotate,
                                                               act_pred, act_meas))
    for (name, label), rs in rows.items():
        med = lambda i: statistics.median(r[i] for r in rs)  # noqa: E731
        errs = sorted(r[2] * 100 for r in rs)
        spread = f" [{errs[0]:+.0f}..{errs[-1]:+.0f}]" if len(rs) > 1 else ""
        print(f"{name:5s} {label:16s} {nodes[name]:5d} {med(0) * 1e3:8.2f}ms {med(1) * 1e3:8.2f}ms "
              f"{med(2) * 100:+6.1f}%{spread:>12s} {med(4) / 2**20:8.2f}MB {med(5) / 2**20:8.2f}MB "
              f"{_err(med(4), med(5))} {med(3):7.2f}s")
    abs_med = {label: statistics.median(abs(statistics.median(r[2] for r in rs)) * 100
                                        for (n, l), rs in rows.items() if l == label)
               for label in ("analytic", "profiled", "profiled/cpu-1t")}
    print("median |time error| over the models: " + ", ".join(f"{k} {v:.1f}%" for k, v in abs_med.items()))
    print("err = (predicted - measured) / measured. Activation bytes: the fx graph folds TinyGPT's ~mask "
          "into a constant, so 1 KiB per layer that eager mode saves is not predicted.")


if __name__ == "__main__":
    main()
