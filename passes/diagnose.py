"""Diagnosis of an infeasible memory limit: the least memory any plan needs, and which stage binds."""

from __future__ import annotations

import math
from typing import Sequence

from fxpipe.errors import InfeasibleMemoryError

from .bounds import memory_lower_bound
from .coarsen import GraphCosts
from .cpsat_model import solve
from .problem import build_problem, evaluate

__all__ = ["min_memory", "raise_infeasible"]


def min_memory(gc: GraphCosts, *, d: int, recompute: bool | None, time_limit: float,
                num_workers: int, num_microbatches: int, schedule: str,
                memory_limit: int | None, optimizer_slots: int) -> tuple[int, int | None, int | None]:
    """(lower bound on min max_s M_s, binding stage of the best plan found, its max M_s)."""
    cheap = memory_lower_bound(gc, num_stages=d, num_microbatches=num_microbatches,
                               schedule=schedule, optimizer_slots=optimizer_slots,
                               recompute=recompute)
    prob = build_problem(gc, [[v] for v in range(gc.n)], num_stages=d,
                         num_microbatches=num_microbatches, schedule=schedule, memory_limit=None,
                         optimizer_slots=optimizer_slots, recompute=recompute, time_scale=1.0)
    sol = solve(prob, objective="memory", time_limit=time_limit, num_workers=num_workers)
    bound = max(cheap, int(math.ceil(sol.bound))) if math.isfinite(sol.bound) else cheap
    if sol.block_stage is None:
        return bound, None, None
    stage_mem = _stage_memories(gc, sol.block_stage, sol.recompute or [], d=d,
                                num_microbatches=num_microbatches, schedule=schedule,
                                optimizer_slots=optimizer_slots)
    worst = max(range(d), key=lambda s: stage_mem[s])
    return bound, worst, stage_mem[worst]


def _stage_memories(gc: GraphCosts, stage: Sequence[int], flags: Sequence[bool], *, d: int,
                    num_microbatches: int, schedule: str, optimizer_slots: int) -> list[int]:
    prob = build_problem(gc, [[v] for v in range(gc.n)], num_stages=d,
                         num_microbatches=num_microbatches, schedule=schedule, memory_limit=None,
                         optimizer_slots=optimizer_slots, recompute=None)
    return evaluate(prob, stage, [bool(f) for f in flags])[1]


def raise_infeasible(gc: GraphCosts, bound: int, stage: int | None, found: int | None, *, d: int,
                      recompute: bool | None, num_microbatches: int, schedule: str,
                      memory_limit: int | None, optimizer_slots: int) -> None:
    where = (f"stage {stage} of {d} binds (it needs {found} bytes in the least-memory plan found)"
             if stage is not None else "the largest node or the total spread over the stages binds")
    rec = {None: "recompute chosen per stage", True: "recompute forced on",
           False: "recompute forced off"}[recompute]
    raise InfeasibleMemoryError(
        f"partition: no plan of {gc.n} nodes into {d} stages fits memory_limit={memory_limit} "
        f"bytes ({schedule}, m={num_microbatches}, k={optimizer_slots} optimizer slots, {rec}); "
        f"every plan needs at least {bound} bytes on some device; {where}. Raise memory_limit to "
        f"at least {bound}, use more stages, a smaller microbatch, or an optimizer with fewer "
        f"slots", memory_limit=memory_limit, min_feasible=bound, binding_stage=stage)
