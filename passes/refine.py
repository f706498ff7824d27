"""Solving and refining: CP-SAT on blocks hinted by the DP, re-coarsened around the incumbent, proved fine.

A :class:`Search` holds what one ``partition`` call has learnt so far (the exact
DP over the graph order, the time scale, the deterministic time spent) and runs
the solves: :meth:`Search.first` (coarse blocks), :meth:`Search.refine` (blocks
twice as fine around the best plan's cuts while the gap is above 1%),
:meth:`Search.prove` (the uncoarsened model when it is small enough) and
:meth:`Search.balance` (among plans with the same bottleneck, the most balanced).
The budget is CP-SAT's deterministic time, so plans do not depend on the
machine's speed or load.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch.fx

from fxpipe.errors import PartitionError
from fxpipe.ir import CostModel, Plan

from .bounds import articulation_lower_bound
from .coarsen import GraphCosts, coarsen_costs
from .cpsat_model import (DET_PER_SECOND, Solution, balance_model, imbalance, imbalance_levels, solve,
                          solve_model)
from .diagnose import min_memory, raise_infeasible
from .dp import SplitResult, split_sequence
from .plan_build import drop_needless_recompute, plan_from_assignment
from .problem import BlockProblem, build_problem, evaluate

__all__ = ["Search", "Attempt"]

_TIME_UNITS = 2 ** 30        # the largest possible T is scaled to about this many integer units
# refinement after the first coarse solve: at most this many blocks per stage / in all
# (CP-SAT stops proving anything within seconds past ~600 blocks x 16 stages)
_MAX_BLOCKS_PER_STAGE = 48
_MAX_REFINED_BLOCKS = 640
_FINE_PROOF_MAX_VARS = 9000  # solve the uncoarsened model (n * (d - 1) stage Booleans) for a proof
                             # when the gap stays > 1%: GPT-2 XL (1,110 nodes) at d=8 proves in ~5 s
_FINE_DP_MAX = 2000          # graphs up to this many nodes get the O(d n^2) DP (~14 n^2 doubles) on the graph order
_BALANCE_SHARE = 0.25        # of the deterministic budget, at most, for breaking ties among optimal plans


@dataclass
class Attempt:
    """One solve on a set of blocks."""

    blocks: list[list[int]]
    prob: BlockProblem
    dp: SplitResult | None
    sol: Solution


def is_chain(prob: BlockProblem) -> bool:
    """True when consecutive blocks are joined by edges: the block order is the only one."""
    edges = set(prob.edges)
    return all((b, b + 1) in edges for b in range(prob.n - 1))


def assignment(gc: GraphCosts, blocks: Sequence[Sequence[int]], block_stage: Sequence[int]) -> dict[str, int]:
    """Node name -> stage of a block assignment."""
    return {gc.names[v]: int(block_stage[b]) for b, vs in enumerate(blocks) for v in vs}


class Search:
    """The state of one partition call's solves (see the module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule, cost_model: CostModel, gc: GraphCosts, *,
                 num_stages: int, recompute: bool | None, time_limit: float, num_workers: int,
                 opts: dict[str, Any], wall_limit: float | None = None) -> None:
        self.gm, self.cost_model, self.gc = gm, cost_model, gc
        self.d, self.recompute, self.opts = num_stages, recompute, opts
        self.time_limit, self.num_workers, self.wall_limit = time_limit, num_workers, wall_limit
        self.wall = time_limit if wall_limit is None else wall_limit
        self.t_start = time.perf_counter()
        self.det_budget = max(0.05, time_limit * DET_PER_SECOND)
        self.det_used = 0.0
        d = num_stages
        ub_time = sum(2 * f + b for f, b in zip(gc.fwd, gc.bwd)) + sum(
            gc.comm_peak(v) * min(d, len(cs) + 1) for v, cs in enumerate(gc.consumers))
        if gc.loss is not None:
            ub_time += 2 * gc.loss.fwd_time + gc.loss.bwd_time
        self.scale = _TIME_UNITS / ub_time if ub_time > 0 else 1.0
        self.singletons = [[v] for v in range(gc.n)]
        # Exact DP over the graph order: a plan, an upper bound, and (on a chain) the optimum.
        self.fine_prob = self.problem(self.singletons) if gc.n <= _FINE_DP_MAX else None
        self.fine_dp = split_sequence(self.fine_prob) if self.fine_prob is not None else None
        self.fine_chain = self.fine_prob is not None and is_chain(self.fine_prob)
        self.fine_stage = self.fine_dp.stage_of_block() if self.fine_dp is not None else None

    def problem(self, blocks: list[list[int]]) -> BlockProblem:
        """The integer-time block problem of ``blocks``."""
        o = self.opts
        return build_problem(self.gc, blocks, num_stages=self.d, num_microbatches=o["num_microbatches"],
                             schedule=o["schedule"], memory_limit=o["memory_limit"],
                             optimizer_slots=o["optimizer_slots"], recompute=self.recompute,
                             time_scale=self.scale)

    def plan(self, assign: dict[str, int], flags: list[bool]) -> Plan:
        """The re-checked plan of an assignment, with needless recomputation dropped."""
        flags = drop_needless_recompute(self.gm, self.cost_model, self.gc, assign, flags,
                                        self.recompute, self.opts)
        return plan_from_assignment(self.gm, self.cost_model, assign, flags, costs=self.gc, **self.opts)

    def wall_left(self) -> float | None:
        """Wall-clock seconds left of ``wall_limit`` for the next solve (None: no wall limit given)."""
        if self.wall_limit is None:
            return None
        return max(0.05, self.wall - (time.perf_counter() - self.t_start))

    def out_of_time(self, share: float = 1.0) -> bool:
        """The deterministic budget (times ``share``) is spent, or the wall clock ran out (a safety)."""
        return (self.det_used >= share * self.det_budget
                or time.perf_counter() - self.t_start >= self.wall)

    def attempt(self, blocks: list[list[int]], limit: float,
                incumbent: tuple[list[int], list[bool]] | None = None) -> Attempt:
        """Solve on ``blocks`` for ``limit`` seconds, hinted by the DPs and ``incumbent`` (node stages)."""
        gc, d, memory_limit = self.gc, self.d, self.opts["memory_limit"]
        exact = len(blocks) == gc.n
        prob = self.fine_prob if exact and self.fine_prob is not None else self.problem(blocks)
        dp = self.fine_dp if prob is self.fine_prob else split_sequence(prob)
        hints: list[tuple[list[int], list[bool]]] = []
        if dp is not None:
            hints.append((dp.stage_of_block(), list(dp.recompute)))
        if self.fine_dp is not None and self.fine_stage is not None and prob is not self.fine_prob:
            hints.append(([self.fine_stage[vs[0]] for vs in blocks], list(self.fine_dp.recompute)))
        if incumbent is not None:   # the best plan so far; blocks never straddle its cuts
            hints.append(([incumbent[0][vs[0]] for vs in blocks], list(incumbent[1])))
        best_hint: tuple[list[int], list[bool], int] | None = None
        for bs, flags in hints:
            times, mems = evaluate(prob, bs, flags)
            if memory_limit is not None and max(mems) > memory_limit:
                continue
            t_int = int(round(max(times)))
            if best_hint is None or t_int < best_hint[2]:
                best_hint = (bs, flags, t_int)
        fb = [int(f) + int(b) + (int(f) if self.recompute is True else 0)
              for f, b in zip(prob.fwd, prob.bwd)]
        lb_int = max(-(-sum(fb) // d), max(fb, default=0), 0)
        chain = is_chain(prob)
        if chain and dp is not None:
            lb_int = max(lb_int, int(round(dp.bottleneck)))   # the DP is exact on a chain
        if chain and dp is None:
            return Attempt(blocks, prob, dp, Solution("INFEASIBLE", None, None, None, math.inf, 0.0, 0.0))
        ub_int = best_hint[2] if best_hint is not None else None
        if ub_int is not None and ub_int < lb_int:
            lb_int = ub_int
        sol = solve(prob, objective="time", time_limit=limit, num_workers=self.num_workers,
                    lb=lb_int, ub=ub_int, hint=best_hint, wall_limit=self.wall_left())
        self.det_used += sol.deterministic
        return Attempt(blocks, prob, dp, sol)

    def first(self, blocks: list[list[int]]) -> tuple[Attempt, Plan, str]:
        """The first solve (retried on single nodes if blocks make it infeasible); the best candidate plan."""
        gc = self.gc
        at = self.attempt(blocks, self.time_limit)
        if at.sol.block_stage is None and at.dp is None and self.fine_dp is None and len(blocks) < gc.n:
            # Blocks may be what makes the limit infeasible: retry on single nodes.
            at = self.attempt(self.singletons, self.time_limit)
        candidates: list[tuple[str, dict[str, int], list[bool]]] = []
        if at.sol.block_stage is not None:
            candidates.append(("cp-sat", assignment(gc, at.blocks, at.sol.block_stage),
                               list(at.sol.recompute or [])))
        if self.fine_dp is not None:
            candidates.append(("dp", assignment(gc, self.singletons, self.fine_dp.stage_of_block()),
                               list(self.fine_dp.recompute)))
        if at.dp is not None and at.dp is not self.fine_dp:
            candidates.append(("dp-blocks", assignment(gc, at.blocks, at.dp.stage_of_block()),
                               list(at.dp.recompute)))
        if not candidates:
            self._no_plan(at.sol)
        best: Plan | None = None
        source = ""
        for name, assign, flags in candidates:
            plan = self.plan(assign, flags)
            if best is None or plan.bottleneck < best.bottleneck * (1 - 1e-12):
                best, source = plan, name
        assert best is not None
        return at, best, source

    def _no_plan(self, sol: Solution) -> None:
        o, d = self.opts, self.d
        if sol.status == "INFEASIBLE":
            lb_mem, stage, found = min_memory(self.gc, d=d, recompute=self.recompute,
                                              time_limit=min(self.time_limit, 5.0),
                                              num_workers=self.num_workers, **o)
            limit = o["memory_limit"]
            raise_infeasible(self.gc, max(lb_mem, limit + 1 if limit else 0), stage, found, d=d,
                             recompute=self.recompute, **o)
        raise PartitionError(
            f"partition: CP-SAT found no plan for {d} stages in {self.time_limit} s (status "
            f"{sol.status}) and no contiguous split fits; raise time_limit or memory_limit")

    def resolve(self, blocks: list[list[int]], incumbent: Plan) -> tuple[Attempt, Plan | None]:
        """Solve on ``blocks`` with what is left of the budget, hinted by ``incumbent``; its plan or None."""
        where = incumbent.stage_of()
        hint = ([where[name] for name in self.gc.names], [st.recompute for st in incumbent.stages])
        at = self.attempt(blocks, max(0.5, (self.det_budget - self.det_used) / DET_PER_SECOND), hint)
        if at.sol.block_stage is None:
            return at, None
        return at, self.plan(assignment(self.gc, blocks, at.sol.block_stage), list(at.sol.recompute or []))

    def refine(self, at: Attempt, best: Plan, source: str,
               lower: float) -> tuple[Attempt, Plan, str, float, int]:
        """Re-coarsen twice as finely around ``best``'s cuts while the gap is above 1% and half the budget is left.

        The bottleneck can only go down. Returns the last attempt, the best plan,
        its source, the lower bound and the number of refinements.
        """
        per_stage, refinements = 12, 0
        while (len(at.blocks) < self.gc.n and best.bottleneck > lower * 1.01
               and per_stage < _MAX_BLOCKS_PER_STAGE and not self.out_of_time(0.5)):
            per_stage *= 2
            refinements += 1
            where = best.stage_of()
            incumbent_stage = [where[name] for name in self.gc.names]
            finer = coarsen_costs(self.gc, num_stages=self.d, blocks_per_stage=per_stage,
                                  stage_hint=incumbent_stage)
            if len(finer) <= len(at.blocks) or len(finer) > _MAX_REFINED_BLOCKS:
                break
            nxt, plan = self.resolve(finer, best)
            at = nxt
            if plan is None:
                break
            if plan.bottleneck < best.bottleneck * (1 - 1e-12):
                best, source = plan, "cp-sat"
                lower = max(lower, articulation_lower_bound(self.gc, self.d, self.recompute,
                                                            upper=best.bottleneck))
        return at, best, source, lower, refinements

    def prove(self, at: Attempt, best: Plan, source: str,
              lower: float) -> tuple[Attempt, Plan, str, bool]:
        """Solve the uncoarsened model for a proof when the gap stays above 1% and it is small enough.

        The articulation bound ignores memory, so under a binding limit the last
        percent is often the bound's. Returns the attempt whose bound counts, the
        best plan, its source, and whether the proof solve ran.
        """
        gc = self.gc
        if not (len(at.blocks) < gc.n and best.bottleneck > lower * 1.01
                and gc.n * (self.d - 1) <= _FINE_PROOF_MAX_VARS and not self.out_of_time()):
            return at, best, source, False
        fine, plan = self.resolve(self.singletons, best)
        if fine.sol.status not in ("OPTIMAL", "FEASIBLE") or plan is None:
            return at, best, source, False
        if plan.bottleneck < best.bottleneck * (1 - 1e-12):
            best, source = plan, "cp-sat"
        return fine, best, source, True

    def balance(self, at: Attempt, best: Plan) -> tuple[Plan, float | None]:
        """Among plans no slower than ``best`` on ``at``'s blocks, the most balanced one.

        Minimises :func:`~fxpipe.passes.cpsat_model.imbalance` (stage times above
        fractions of the mean work per stage, in integer units) with every stage
        time at most ``best``'s, hinted with ``best``; deterministic, on at most a
        quarter of the budget. Returns the plan kept and its imbalance in seconds
        (None when no tie-break ran).
        """
        gc, blocks = self.gc, at.blocks
        if self.out_of_time() or len(blocks) < self.d or self.d < 2:
            return best, None
        prob = at.prob
        where = best.stage_of()
        bs = [where[gc.names[vs[0]]] for vs in blocks]
        if any(where[gc.names[v]] != bs[b] for b, vs in enumerate(blocks) for v in vs):
            return best, None        # best straddles these blocks: it is not a hint here
        flags = [st.recompute for st in best.stages]
        times, _ = evaluate(prob, bs, flags)
        cap = int(round(max(times)))
        work = sum(int(f) + int(b) for f, b in zip(prob.fwd, prob.bwd)) + int(prob.loss[0] + prob.loss[1])
        levels = imbalance_levels(-(-work // self.d))
        before = imbalance(times, levels)
        if before == 0:
            return best, 0.0
        limit = min(self.det_budget - self.det_used, _BALANCE_SHARE * self.det_budget) / DET_PER_SECOND
        built = balance_model(prob, cap=cap, levels=levels, hint=(bs, flags))
        sol = solve_model(built, prob, time_limit=max(0.05, limit), num_workers=self.num_workers,
                          wall_limit=self.wall_left())
        self.det_used += sol.deterministic
        if sol.block_stage is None or sol.objective is None or sol.objective >= before:
            return best, before / self.scale
        plan = self.plan(assignment(gc, blocks, sol.block_stage), list(sol.recompute or []))
        if plan.bottleneck > best.bottleneck * (1 + 1e-9):
            return best, before / self.scale   # integer rounding: never trade the bottleneck
        return plan, sol.objective / self.scale
