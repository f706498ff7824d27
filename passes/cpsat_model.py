"""The CP-SAT model of the partitioning problem on blocks, and one solve of it.

See :mod:`fxpipe.passes.partition` for the formulation; the stage time and
memory constraints apply :mod:`fxpipe.cost_models.evaluator`'s formulas to
linear expressions, so the solver's T_s and M_s are the re-checker's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from ortools.sat.python import cp_model

from fxpipe.cost_models.evaluator import stage_memory, stage_time

from .problem import BlockProblem, evaluate

__all__ = ["CpModel", "build_model", "Solution", "solve", "solve_model", "balance_model", "imbalance", "imbalance_levels", "DET_PER_SECOND"]

DET_PER_SECOND = 0.5         # CP-SAT deterministic time granted per second of time_limit


@dataclass
class CpModel:
    model: cp_model.CpModel
    z: list[list[Any]]               # z[b][s], s = 0..d (ints 1/0 at the ends)
    r: list[Any]                     # r_s: Boolean var, or a constant 0/1
    objective: Any                   # T (time) or M (memory) integer variable
    times: list[dict[bool, Any]] = field(default_factory=list)   # T_s per r_s, per stage
    mems: list[dict[bool, Any]] = field(default_factory=list)    # M_s per r_s (when memory is modelled)


def _lits_x(z: list[list[Any]], b: int, s: int) -> list[Any]:
    """Literals of the clause "not x[b,s]" (z[b,s] false or z[b,s+1] true), constants dropped.

    Returns None when the clause is always true.
    """
    lits = []
    a, nxt = z[b][s], z[b][s + 1]
    if isinstance(a, int):
        if a == 0:
            return None  # type: ignore[return-value]
    else:
        lits.append(a.Not())
    if isinstance(nxt, int):
        if nxt == 1:
            return None  # type: ignore[return-value]
    else:
        lits.append(nxt)
    return lits


def _x_sum(z: list[list[Any]], coef: Sequence[float], s: int) -> Any:
    """sum_b coef[b] * x[b,s] as a linear expression."""
    terms, weights, const = [], [], 0
    for b, w in enumerate(coef):
        w = int(w)
        if w == 0:
            continue
        for lit, sign in ((z[b][s], 1), (z[b][s + 1], -1)):
            if isinstance(lit, int):
                const += sign * w * lit
            else:
                terms.append(lit)
                weights.append(sign * w)
    return cp_model.LinearExpr.weighted_sum(terms, weights) + const


def _skip_prices(m: cp_model.CpModel, z: list[list[Any]], prob: BlockProblem, val: Any, k: int, s: int, e: Any,
                 terms: list[tuple[Any, int]], hints: list[tuple[Any, int]], hint_stage: list[int] | None) -> None:
    """The rest of the price of value ``k`` entering stage s when its producer sits before s-1.

    e pays the link s-1 -> s; the link t -> s differs by a telescoping sum over t' = t..s-2 of
    delta(t') = price(t', s) - price(t'+1, s), each on g = e AND stage(producer) <= t' (= not z[p, t'+1]),
    so a value made on stage t pays exactly price(t, s). g is tied both ways (deltas may be negative).
    """
    p = val.producer
    for t in range(s - 2, -1, -1):
        delta = int(prob.comm_at(val, t, s)) - int(prob.comm_at(val, t + 1, s))
        zt = z[p][t + 1]
        if delta == 0 or isinstance(zt, int):
            continue
        g = m.new_bool_var(f"g[{k},{t},{s}]")
        m.add_implication(g, e)
        m.add_implication(g, zt.Not())
        m.add_bool_or([e.Not(), zt, g])
        terms.append((g, delta))
        if hint_stage is not None:
            enters = any(hint_stage[c] == s for c in val.consumers) or (val.returned and s == prob.num_stages - 1)
            hints.append((g, int(enters and hint_stage[p] <= t)))


def build_model(prob: BlockProblem, *, objective: str, lb: int = 0, ub: int | None = None,
           hint: tuple[Sequence[int], Sequence[bool], int] | None = None) -> CpModel:
    m = cp_model.CpModel()
    d, n = prob.num_stages, prob.n
    z: list[list[Any]] = [[1] + [m.new_bool_var(f"z[{b},{s}]") for s in range(1, d)] + [0]
                          for b in range(n)]
    for b in range(n):
        for s in range(1, d - 1):
            m.add_implication(z[b][s + 1], z[b][s])
    for (u, v) in prob.edges:
        for s in range(1, d):
            m.add_implication(z[u][s], z[v][s])
    for s in range(d):          # every stage holds a block with a node that is not local
        m.add(_x_sum(z, [int(w) for w in prob.work] if prob.work else [1] * n, s) >= 1)

    use_memory = objective == "memory" or prob.memory_limit is not None
    if prob.recompute is None:
        r: list[Any] = [m.new_bool_var(f"r[{s}]") for s in range(d)]
    else:
        r = [int(prob.recompute)] * d

    # e[u,s]: value u enters stage s.  Lists of (stage -> var) per value.
    comm_terms: list[list[tuple[Any, int]]] = [[] for _ in range(d)]
    ibytes_terms: list[list[tuple[Any, int]]] = [[] for _ in range(d)]   # I_s (recompute)
    xbytes_terms: list[list[tuple[Any, int]]] = [[] for _ in range(d)]   # X_s (no recompute)
    need_ibytes = use_memory and prob.recompute is not False
    need_xbytes = use_memory and prob.recompute is not True
    hint_stage = list(hint[0]) if hint is not None else None
    hints: list[tuple[Any, int]] = []
    for k, val in enumerate(prob.values):
        w_comm = int(max(val.comm_links, default=val.comm))     # any link's price is nonzero then
        w_bytes = val.nbytes if need_ibytes else 0
        w_x = val.nbytes if (need_xbytes and val.producer >= 0) else 0
        if w_comm == 0 and w_bytes == 0 and w_x == 0:
            continue
        p = val.producer
        for s in range(0 if p < 0 else 1, d):
            clauses = []
            for c in val.consumers:
                lits = _lits_x(z, c, s)
                if lits is None:
                    continue
                if p >= 0:
                    zp = z[p][s]
                    if isinstance(zp, int):
                        if zp == 1:
                            continue
                    else:
                        lits.append(zp)
                clauses.append(lits)
            if val.returned and p >= 0 and s == d - 1:
                clauses.append([z[p][s]] if not isinstance(z[p][s], int) else [])
            if not clauses:
                continue
            e = m.new_bool_var(f"e[{k},{s}]")
            for lits in clauses:
                m.add_bool_or(lits + [e])
            price = int(prob.comm_at(val, s - 1, s)) if w_comm else 0    # w_comm > 0: made on a stage, s >= 1
            if price:
                comm_terms[s].append((e, price))
            if w_comm and val.comm_links:
                _skip_prices(m, z, prob, val, k, s, e, comm_terms[s], hints, hint_stage)
            if w_bytes:
                ibytes_terms[s].append((e, w_bytes))
            if w_x:
                xbytes_terms[s].append((e, w_x))
            if hint_stage is not None:
                enters = any(hint_stage[c] == s for c in val.consumers) or (
                    val.returned and s == d - 1)
                hints.append((e, int(enters and (p < 0 or hint_stage[p] < s))))

    def lin(terms: list[tuple[Any, int]]) -> Any:
        return cp_model.LinearExpr.weighted_sum([t for t, _ in terms], [w for _, w in terms])

    fb = [int(f) + int(b) for f, b in zip(prob.fwd, prob.bwd)]
    # T_s is linear in its blocks: each block's term is the evaluator's time of the block alone
    work = {r_: [int(stage_time(int(f), int(b), 0, r_)) for f, b in zip(prob.fwd, prob.bwd)]
            for r_ in (False, True)}
    ub_time = sum(fb) + sum(prob.fwd) + sum(int(max(v.comm_links, default=v.comm)) * d for v in prob.values) \
        + 2 * int(prob.loss[0]) + int(prob.loss[1])
    if objective == "time":
        obj = m.new_int_var(int(lb), int(ub if ub is not None else ub_time), "T")
    else:
        every = sum(v.nbytes for v in prob.values)    # M_s of one stage holding everything
        ub_mem = stage_memory(sum(b for b, _ in prob.params), sum(prob.act) + prob.loss[2], every, every,
                              max(prob.in_flight), False, prob.ctx)
        obj = m.new_int_var(0, int(ub_mem), "M")

    times: list[dict[bool, Any]] = []
    mems: list[dict[bool, Any]] = []
    lf, lb, la = prob.loss           # loss_fn, always on the last stage
    loss_t = {r_: int(stage_time(int(lf), int(lb), 0, r_)) for r_ in (False, True)}
    for s in range(d):
        C = lin(comm_terms[s])
        last = s == d - 1
        times.append({r_: _x_sum(z, work[r_], s) + C + (loss_t[r_] if last else 0)
                      for r_ in (False, True)})
        if objective == "time":
            if isinstance(r[s], int):
                m.add(obj >= times[s][bool(r[s])])
            else:
                m.add(obj >= times[s][False])
                m.add(obj >= times[s][True]).only_enforce_if(r[s])
        if not use_memory:
            continue
        single = [0] * n
        multi: list[tuple[Any, int]] = []
        for k, (nbytes, readers) in enumerate(prob.params):
            if len(readers) == 1:
                single[readers[0]] += nbytes
                continue
            clauses = [lits for c in readers if (lits := _lits_x(z, c, s)) is not None]
            if not clauses:
                continue
            q = m.new_bool_var(f"q[{k},{s}]")
            for lits in clauses:
                m.add_bool_or(lits + [q])
            multi.append((q, nbytes))
            if hint_stage is not None:
                hints.append((q, int(any(hint_stage[c] == s for c in readers))))
        P = _x_sum(z, single, s) + lin(multi)
        A = _x_sum(z, prob.act, s) + (la if last else 0)
        ns = prob.in_flight[s]
        I, X = lin(ibytes_terms[s]), lin(xbytes_terms[s])
        mem_nr = stage_memory(P, A, I, X, ns, False, prob.ctx)
        mem_r = stage_memory(P, A, I, X, ns, True, prob.ctx, la if last else 0)
        mems.append({False: mem_nr, True: mem_r})
        if objective == "memory":
            if isinstance(r[s], int):
                m.add(obj >= (mem_r if r[s] else mem_nr))
            else:
                m.add(obj >= mem_nr).only_enforce_if(r[s].Not())
                m.add(obj >= mem_r).only_enforce_if(r[s])
        else:
            L = int(prob.memory_limit)  # type: ignore[arg-type]
            if isinstance(r[s], int):
                m.add((mem_r if r[s] else mem_nr) <= L)
            else:
                m.add(mem_nr <= L).only_enforce_if(r[s].Not())
                m.add(mem_r <= L).only_enforce_if(r[s])
    m.minimize(obj)
    if hint is not None and hint_stage is not None:
        for b in range(n):
            for s in range(1, d):
                m.add_hint(z[b][s], int(hint_stage[b] >= s))
        for s in range(d):
            if not isinstance(r[s], int):
                m.add_hint(r[s], int(hint[1][s]))
        for var, val in hints:
            m.add_hint(var, val)
        if objective == "time":
            m.add_hint(obj, int(hint[2]))
    return CpModel(m, z, r, obj, times, mems)


def _solver(time_limit: float, num_workers: int, wall_limit: float | None = None) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    p = solver.parameters
    p.num_workers = num_workers
    p.interleave_search = num_workers > 1   # deterministic multi-worker search
    p.random_seed = 0
    p.max_deterministic_time = max(0.05, time_limit * DET_PER_SECOND)
    p.max_time_in_seconds = max(0.1, time_limit if wall_limit is None else wall_limit)
    return solver


@dataclass
class Solution:
    """What one solve found (stages per block, flags) and proved (bound), in the problem's units."""

    status: str
    block_stage: list[int] | None
    recompute: list[bool] | None
    objective: float | None
    bound: float
    wall: float
    deterministic: float


def solve(prob: BlockProblem, *, objective: str, time_limit: float, num_workers: int,
          lb: int = 0, ub: int | None = None,
          hint: tuple[Sequence[int], Sequence[bool], int] | None = None,
          wall_limit: float | None = None) -> Solution:
    """Build the model of ``prob`` for ``objective`` ("time" | "memory") and solve it."""
    built = build_model(prob, objective=objective, lb=lb, ub=ub, hint=hint)
    return solve_model(built, prob, time_limit=time_limit, num_workers=num_workers, wall_limit=wall_limit)


def solve_model(built: CpModel, prob: BlockProblem, *, time_limit: float, num_workers: int,
                wall_limit: float | None = None) -> Solution:
    """Solve a built model deterministically; the block stages and flags it found, its objective and bound.

    ``time_limit`` sets the deterministic time (``DET_PER_SECOND`` per second) and, unless
    ``wall_limit`` is given, the wall clock.
    """
    solver = _solver(time_limit, num_workers, wall_limit)
    t0 = time.perf_counter()
    status = solver.solve(built.model)
    wall = time.perf_counter() - t0
    name = solver.status_name(status)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        d = prob.num_stages
        bs = [sum(int(solver.value(zz)) if not isinstance(zz, int) else zz
                  for zz in built.z[b][1:d]) for b in range(prob.n)]
        rec = [bool(solver.value(x)) if not isinstance(x, int) else bool(x) for x in built.r]
        return Solution(name, bs, rec, float(solver.objective_value),
                        float(solver.best_objective_bound), wall, solver.deterministic_time)
    bound = float(solver.best_objective_bound) if status != cp_model.INFEASIBLE else math.inf
    return Solution(name, None, None, None, bound, wall, solver.deterministic_time)


def imbalance_levels(mean: int, count: int = 4) -> list[int]:
    """Thresholds k*mean/count, k = 1..count: the pieces of a convex, piecewise-linear imbalance."""
    return [mean * k // count for k in range(1, count + 1)]


def imbalance(times: Sequence[float], levels: Sequence[int]) -> int:
    """sum_s sum_L max(0, T_s - L): grows faster for a stage the further it is above the others."""
    return sum(max(0, int(round(t)) - lv) for t in times for lv in levels)


def balance_model(prob: BlockProblem, *, cap: int, levels: Sequence[int],
                  hint: tuple[Sequence[int], Sequence[bool]]) -> CpModel:
    """The time model with every T_s <= ``cap``, minimising :func:`imbalance` (a tie-break).

    ``hint`` is a feasible (block stages, flags); the excess variables
    ex[s,L] >= T_s - L, ex[s,L] >= 0 are hinted from it.
    """
    built = build_model(prob, objective="time", lb=0, ub=cap, hint=(hint[0], hint[1], cap))
    m, r = built.model, built.r
    times, _ = evaluate(prob, list(hint[0]), list(hint[1]))
    ex = []
    for s in range(prob.num_stages):
        for k, lv in enumerate(levels):
            e = m.new_int_var(0, max(0, cap - lv), f"ex[{s},{k}]")
            if isinstance(r[s], int):
                m.add(e >= built.times[s][bool(r[s])] - lv)
            else:
                m.add(e >= built.times[s][False] - lv)
                m.add(e >= built.times[s][True] - lv).only_enforce_if(r[s])
            m.add_hint(e, max(0, int(round(times[s])) - lv))
            ex.append(e)
    m.minimize(sum(ex))
    return built
