"""Human-readable renderings of a Plan: a text table, per-stage breakdowns, byte/time formatting.

Graphical renderings (DOT, SVG, HTML) live in :mod:`fxpipe.render`; they use
:func:`stage_breakdown` from here so that every view shows the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fxpipe.ir import Plan

__all__ = ["plan_table", "fmt_bytes", "fmt_time", "parse_bytes", "StageBreakdown", "stage_breakdown"]

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def parse_bytes(text: str) -> int:
    """'16GiB' -> 17179869184; '1e9' -> 1000000000. Raises ValueError on bad text."""
    t = text.strip().lower().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            value = float(t[: -len(unit)])
            break
    else:
        unit, value = "b", float(t)
    if not value == value or value <= 0 or value == float("inf"):  # NaN, <= 0 and inf are not sizes
        raise ValueError(f"{text!r} is not a positive size")
    return int(value * _UNITS[unit])


@dataclass(frozen=True)
class StageBreakdown:
    """Where one stage's time and memory go (seconds per microbatch, bytes)."""

    index: int
    fwd: float          # F_s
    bwd: float          # B_s
    recompute: float    # r_s * F_s (the forward run again in backward)
    comm: float         # C_s
    weights: int        # P_s * (1 weights + 1 grads + k optimizer slots + [1 if 2bw])
    stash: int          # M_s - weights: stashed activations / inputs of in-flight microbatches

    @property
    def time(self) -> float:
        return self.fwd + self.bwd + self.recompute + self.comm

    @property
    def memory(self) -> int:
        return self.weights + self.stash


def stage_breakdown(plan: "Plan") -> list[StageBreakdown]:
    """Split each stage's T_s into F/B/recompute/comm and M_s into weights/stash.

    Worked example: P=100 B, M=340 B, 2bw, SGD (k=0): weights = 100 * 3 = 300 B, stash = 40 B.
    """
    from fxpipe.cost_models.evaluator import CostContext, weight_bytes

    ctx = CostContext(schedule=plan.schedule, num_stages=plan.num_stages,
                      num_microbatches=plan.num_microbatches, optimizer_slots=plan.optimizer_slots)
    out = []
    for s in plan.stages:
        weights = min(int(weight_bytes(s.param_bytes, ctx)), int(s.memory))
        out.append(StageBreakdown(index=s.index, fwd=s.fwd_time, bwd=s.bwd_time,
                                  recompute=s.fwd_time if s.recompute else 0.0, comm=s.comm_time,
                                  weights=weights, stash=int(s.memory) - weights))
    return out


def plan_table(plan: "Plan", node_names: bool = True) -> str:
    """One row per stage: nodes, first/last node, time, memory, parameters, recompute."""
    head = ["stage", "nodes", "first", "last", "time/mb", "fwd", "bwd", "comm", "memory", "params", "recompute"]
    rows = []
    for s in plan.stages:
        rows.append([str(s.index), str(len(s.nodes)), s.nodes[0] if s.nodes else "-",
                     s.nodes[-1] if s.nodes else "-", fmt_time(s.time), fmt_time(s.fwd_time),
                     fmt_time(s.bwd_time), fmt_time(s.comm_time), fmt_bytes(s.memory),
                     fmt_bytes(s.param_bytes), "yes" if s.recompute else "no"])
    if not node_names:
        head = [h for h in head if h not in ("first", "last")]
        rows = [[c for i, c in enumerate(r) if i not in (2, 3)] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    gap = plan.gap * 100
    out.append("")
    out.append(f"schedule={plan.schedule} stages={plan.num_stages} microbatches={plan.num_microbatches} "
               f"solver={plan.solver} ({'optimal' if plan.optimal else f'gap {gap:.2f}%'}, "
               f"{plan.solve_time:.2f} s)")
    worst = max(plan.stages, key=lambda s: s.time).index if plan.stages else "-"
    out.append(f"bottleneck {fmt_time(plan.bottleneck)} per microbatch (stage {worst}), lower bound "
               f"{fmt_time(plan.lower_bound)}, gap {gap:.2f}%"
               + (f", memory limit {fmt_bytes(plan.memory_limit)}" if plan.memory_limit else ""))
    if plan.loss is not None:
        ls = plan.loss
        out.append(f"loss_fn on stage {plan.num_stages - 1} (included above): fwd {fmt_time(ls.fwd_time)}, "
                   f"bwd {fmt_time(ls.bwd_time)}, saves {fmt_bytes(ls.activation_bytes)} ({ls.nodes} ops)")
    extra = [f"solver time {plan.solve_time:.2f} s", f"cut edges {len(plan.cut_edges)}"]
    if plan.microbatch_size and plan.bottleneck > 0:
        rate = plan.microbatch_size * plan.data_parallel / plan.bottleneck
        extra.append(f"throughput {rate:,.1f} samples/s (microbatch {plan.microbatch_size})")
    if plan.over_memory_stages:
        extra.append(f"OVER MEMORY on stages {list(plan.over_memory_stages)}")
    out.append(", ".join(extra))
    return "\n".join(out)
