"""A Plan's per-stage breakdown (F/B/recompute/comm, weights/stash), one source for every view of it.

The text table is :meth:`fxpipe.ir.Plan.summary` (``plan_table`` here); byte and time formats are
:mod:`fxpipe.units`. Graphical renderings (DOT, SVG, HTML) live in :mod:`fxpipe.render` and
:mod:`fxpipe.charts`; they use :func:`stage_breakdown` so that every view shows the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxpipe.cost_models.evaluator import CostContext, weight_bytes
from fxpipe.ir import Plan
from fxpipe.units import fmt_bytes, fmt_time, parse_bytes

__all__ = ["plan_table", "fmt_bytes", "fmt_time", "parse_bytes", "StageBreakdown", "stage_breakdown"]


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


def stage_breakdown(plan: Plan) -> list[StageBreakdown]:
    """Split each stage's T_s into F/B/recompute/comm and M_s into weights/stash.

    Worked example: P=100 B, M=340 B, 2bw, SGD (k=0): weights = 100 * 3 = 300 B, stash = 40 B.
    """
    ctx = CostContext(schedule=plan.schedule, num_stages=plan.num_stages,
                      num_microbatches=plan.num_microbatches, optimizer_slots=plan.optimizer_slots)
    out = []
    for s in plan.stages:
        weights = min(int(weight_bytes(s.param_bytes, ctx)), int(s.memory))
        out.append(StageBreakdown(index=s.index, fwd=s.fwd_time, bwd=s.bwd_time,
                                  recompute=s.fwd_time if s.recompute else 0.0, comm=s.comm_time,
                                  weights=weights, stash=int(s.memory) - weights))
    return out


def plan_table(plan: Plan, node_names: bool = True) -> str:
    """One row per stage: nodes, first/last node, time, memory, parameters, recompute (:meth:`Plan.summary`)."""
    return plan.summary(node_names=node_names)
