"""CP-SAT partitioner: node -> stage and recompute per stage, minimising the bottleneck stage time.

The model (docs/planner.md; symbols in docs/cost-model.md), on blocks b (see coarsen.py)::

    z[b,s] = [stage(b) >= s]        z[b,0] = 1,  z[b,d] = 0,  z[b,s+1] <= z[b,s]
    x[b,s] = z[b,s] - z[b,s+1]      (block b runs on stage s)
    edge u -> v:  z[u,s] <= z[v,s]  (stages never decrease along edges)
    every stage non-empty:  sum_b x[b,s] >= 1   (over blocks holding a non-local node, BlockProblem.work)
    e[u,s] >= x[c,s] - z[u,s]       for each consumer block c of u's value: the value enters s
    e[u,d-1] >= 1 - z[u,d-1]        a model output enters the last stage
    F_s = sum_b F_b x[b,s],  B_s likewise,  C_s = sum_u 2*comm_time(bytes_u) e[u,s]
                                    (on a cluster: the link from u's stage to s, evaluator.LinkTransfers)
    T >= F_s + B_s + C_s,   T >= F_s + B_s + F_s + C_s  if r_s
    M_s = P_s*(2 + k + [2bw]) + (r_s ? n_s*I_s + A_s : n_s*(A_s + X_s)) <= memory_limit
    minimise T

e.g. a skip connection a -> d over 4 stages [a][b][c][d] sets only e[a,3]: the
value is sent to stage 3 directly and paid there once.

Among plans of the optimal (or best found) bottleneck the most balanced is kept:
a second solve, with every T_s at most that bottleneck, minimises
sum_s sum_k max(0, T_s - k*mean/4), k = 1..4 (mean = the work per stage).

Where each part lives: the model (``cpsat_model.py``), solving and refining
(``refine.py``), the bounds (``bounds.py``), the plan builder and re-checker
(``plan_build.py``: the solver returns only variable values; an assignment
becomes a frozen :class:`~fxpipe.ir.Plan` re-checked in floating point from the
graph itself), the infeasibility diagnosis (``diagnose.py``), stage time and
memory (``fxpipe/cost_models/evaluator.py``).
"""

from __future__ import annotations

import time

import torch.fx

from fxpipe.errors import ConfigError
from fxpipe.ir import CostModel, Plan, SolveInfo

from .bounds import articulation_lower_bound, memory_lower_bound, trivial_lower_bound
from .coarsen import coarsen_costs, graph_costs
from .diagnose import raise_infeasible
from .plan_build import plan_from_assignment, validate_options
from .refine import Search

__all__ = ["partition", "plan_from_assignment", "trivial_lower_bound", "memory_lower_bound",
           "articulation_lower_bound"]


def partition(gm: torch.fx.GraphModule, cost_model: CostModel, *, num_stages: int,
              num_microbatches: int, schedule: str = "2bw", memory_limit: int | None = None,
              optimizer_slots: int = 0, recompute: bool | None = None, time_limit: float = 10.0,
              num_workers: int = 2, coarsen: bool = True, wall_limit: float | None = None) -> Plan:
    """Cut an annotated graph into pipeline stages minimising the bottleneck stage time.

    Steps: read costs; coarsen into blocks (graphs over ~12 blocks per stage);
    exact DP over the block order (hint and upper bound); CP-SAT on the block
    DAG with that hint and the lower bound; keep the better of the two; refine
    and prove (:mod:`~fxpipe.passes.refine`); among plans with the same
    bottleneck prefer the most balanced; drop recomputation from stages that fit
    without it; rebuild and re-check the Plan.

    Args:
        gm: annotated graph (``node.meta["fxpipe.cost"]``, ``"fxpipe.params"``,
            ``gm.meta["fxpipe.param_bytes"]``).
        cost_model: prices transfers (``comm_time``).
        num_stages: d, between 1 and the number of compute nodes.
        num_microbatches: m.
        schedule: "2bw" | "flush" | "gpipe" (sets n_s and the weight copies).
        memory_limit: bytes per device, or None for no limit.
        optimizer_slots: k, optimizer state tensors per parameter (Adam: 2).
        recompute: None lets the solver choose per stage; True/False forces all stages.
        time_limit: seconds for CP-SAT (deterministic time is capped at
            ``0.5 * time_limit`` so that runs repeat exactly).
        num_workers: CP-SAT workers (interleaved deterministically when > 1).
        wall_limit: wall-clock seconds allowed (default ``time_limit``); a larger one leaves only
            CP-SAT's deterministic time (``0.5 * time_limit``) to decide, so the plan repeats on
            a loaded machine (the depth/width search passes its remaining time).
        coarsen: merge nodes into blocks first (exactness is then only up to the
            blocks; ``Plan.lower_bound`` stays a bound on the uncoarsened graph).

    Returns:
        The Plan; ``solve_info`` (:class:`~fxpipe.ir.SolveInfo`) says how it was found.

    Raises:
        ConfigError: num_stages out of range, unknown schedule, bad numbers.
        InfeasibleMemoryError: no plan fits ``memory_limit``; the message gives a
            lower bound on the smallest limit that works and the binding stage.
        PartitionError: the graph lacks costs, or the solver found no plan in time.
    """
    t_start = time.perf_counter()
    validate_options(num_stages, num_microbatches, schedule, memory_limit, optimizer_slots)
    if time_limit <= 0 or num_workers < 1:
        raise ConfigError(f"time_limit must be > 0 and num_workers >= 1, got {time_limit}, "
                          f"{num_workers}")
    gc = graph_costs(gm, cost_model)
    work = sum(not gc.is_local(v) for v in range(gc.n))   # a stage of local values only does nothing
    if not isinstance(num_stages, int) or not 1 <= num_stages <= work:
        local = f", not counting {gc.n - work} local value(s) every stage computes itself" if work < gc.n else ""
        raise ConfigError(
            f"num_stages={num_stages} must be between 1 and the number of compute nodes in the "
            f"graph ({work}{local}); use fewer stages")
    d = num_stages
    opts = dict(num_microbatches=num_microbatches, schedule=schedule, memory_limit=memory_limit,
                optimizer_slots=optimizer_slots)
    if memory_limit is not None:
        cheap = memory_lower_bound(gc, num_stages=d, num_microbatches=num_microbatches,
                                   schedule=schedule, optimizer_slots=optimizer_slots,
                                   recompute=recompute)
        if cheap > memory_limit:
            raise_infeasible(gc, cheap, None, None, d=d, recompute=recompute, **opts)

    search = Search(gm, cost_model, gc, num_stages=d, recompute=recompute, time_limit=time_limit,
                    num_workers=num_workers, opts=opts, wall_limit=wall_limit)
    search.t_start = t_start
    blocks = (coarsen_costs(gc, num_stages=d, stage_hint=search.fine_stage) if coarsen
              else search.singletons)
    if len(blocks) < d:
        blocks = search.singletons
    at, best, source = search.first(blocks)
    first_blocks = len(at.blocks)
    lower = max(trivial_lower_bound(gc, d, recompute),
                articulation_lower_bound(gc, d, recompute, upper=best.bottleneck))
    at, best, source, lower, refinements = search.refine(at, best, source, lower)
    at, best, source, fine_proof = search.prove(at, best, source, lower)
    best, imbalance = search.balance(at, best)

    sol, scale, fine_dp = at.sol, search.scale, search.fine_dp
    coarsened = len(at.blocks) < gc.n
    slack = (2 * gc.n + len(at.prob.values)) / scale    # rounding of the integer times
    if not coarsened and sol.status in ("OPTIMAL", "FEASIBLE"):
        lower = max(lower, sol.bound / scale - slack)
    if search.fine_chain and fine_dp is not None:
        lower = max(lower, fine_dp.bottleneck / scale - slack)
    optimal = (not coarsened and sol.status == "OPTIMAL") or (search.fine_chain and fine_dp is not None)
    solver_gap = 0.0
    if sol.objective:
        solver_gap = max(0.0, (sol.objective - sol.bound) / sol.objective)
    info = SolveInfo(
        status=sol.status, solver_bound=sol.bound / scale, solver_gap=solver_gap,
        blocks=len(at.blocks), nodes=gc.n, coarsened=coarsened,
        dp_bottleneck=(fine_dp.bottleneck / scale) if fine_dp is not None else None,
        wall_time=sol.wall, deterministic_time=sol.deterministic, source=source,
        chain=search.fine_chain, first_blocks=first_blocks, refinements=refinements,
        fine_proof=fine_proof, imbalance=imbalance)
    return plan_from_assignment(
        gm, cost_model, best.stage_of(), [st.recompute for st in best.stages], costs=gc,
        solver="cp-sat", solve_time=time.perf_counter() - t_start,
        lower_bound=lower, optimal=optimal, solve_info=info, **opts)
