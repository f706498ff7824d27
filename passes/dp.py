"""Exact dynamic program for the best contiguous split of a topological order into d stages.

The CP-SAT partitioner uses it as a hint and an upper bound; on a chain (a
graph with one topological order) it is the exact optimum by itself. (On a cluster a value
that skips stages pays the link from its producer's stage, which a contiguous split does not
know: it is charged the cheapest such link, so the DP's bottleneck is then a lower bound.)

Worked example: a chain of 4 nodes with F+B = 3, 1, 2, 2 and no
communication, d = 2. T[i, j] is the time of a stage holding nodes i..j-1::

    best_0[j] = T[0, j]            j = 1  2  3  4
                                       3  4  6  8
    best_1[4] = min over i of max(best_0[i], T[i, 4])
              = min(max(3, 5), max(4, 4), max(6, 2)) = 4   (i = 2)
    split: [a b | c d], bottleneck 4

Stage times follow docs/cost-model.md: T_s = F_s + B_s + r_s*F_s + C_s, where C_s sums
2*comm_time over the DISTINCT values produced before the stage and read in it
(a skip connection from stage 0 to stage 3 is paid by stage 3 only; a model
output produced before the last stage is paid by the last stage). The
per-stage recompute choice r_s is the cheapest that fits the memory limit:

    M_s = P_s*(2 + k + [2bw]) + (r_s ? n_s*I_s + A_s : n_s*(A_s + X_s)) <= limit

Both come from :mod:`fxpipe.cost_models.evaluator`, applied to numpy arrays. All O(n^2) stage figures come from prefix sums and 2-D difference arrays, so
the whole DP costs O(d*n^2) numpy work and O(n^2) memory (n = sequence length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch.fx

from fxpipe.cost_models.evaluator import stage_memory, stage_time
from fxpipe.errors import ConfigError, InfeasibleMemoryError
from fxpipe.ir import SCHEDULES, CostModel, Plan

from .bounds import trivial_lower_bound
from .coarsen import graph_costs
from .plan_build import plan_from_assignment
from .problem import BlockProblem, Value, build_problem, evaluate

__all__ = ["Value", "BlockProblem", "SplitResult", "DPSplit", "build_problem", "split_sequence",
           "evaluate", "stage_table",
           "best_contiguous_split", "dp_plan"]


@dataclass(frozen=True)
class SplitResult:
    """A contiguous split: stage s holds blocks ``bounds[s]:bounds[s+1]``."""

    bounds: tuple[int, ...]
    recompute: tuple[bool, ...]
    bottleneck: float
    times: tuple[float, ...]

    def stage_of_block(self) -> list[int]:
        out: list[int] = []
        for s in range(len(self.bounds) - 1):
            out.extend([s] * (self.bounds[s + 1] - self.bounds[s]))
        return out


def _rectangles(n: int, items: list[tuple[int, tuple[int, ...], float]]) -> np.ndarray:
    """M[i, j] = sum of w over items with a reader in [i, j) and base < i.

    An item (base, readers, w) covers stage [i, j) iff base < i <= c < j for a
    reader c; the region is a union of rectangles i in (c_{t-1}, c_t], j > c_t.
    """
    rects: list[tuple[int, int, int, float]] = []
    for base, readers, w in items:
        if w == 0:
            continue
        prev = base
        for c in readers:
            rects.append((prev + 1, c + 1, c + 1, w))
            prev = c
    return _fill(n, rects)


def _fill(n: int, rects: list[tuple[int, int, int, float]]) -> np.ndarray:
    """M[i, j] = sum of w over rectangles (row0, row1, col, w) with row0 <= i < row1 and j >= col."""
    D = np.zeros((n + 2, n + 2))
    rows0, rows1, cols, ws = ([r[k] for r in rects] for k in range(4))
    if ws:
        wa = np.asarray(ws, dtype=np.float64)
        np.add.at(D, (np.asarray(rows0), np.asarray(cols)), wa)
        np.add.at(D, (np.asarray(rows1), np.asarray(cols)), -wa)
    return np.cumsum(np.cumsum(D, axis=0), axis=1)[: n + 1, : n + 1]


def _stage_options(time_nr: np.ndarray, time_r: np.ndarray, mem_nr: np.ndarray, mem_r: np.ndarray,
                   limit: float, recompute: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """Stage time and recompute flag per (i, j); inf where nothing fits."""
    inf = np.inf
    if recompute is True:
        return np.where(mem_r <= limit, time_r, inf), np.ones_like(time_r, dtype=bool)
    if recompute is False:
        return np.where(mem_nr <= limit, time_nr, inf), np.zeros_like(time_r, dtype=bool)
    fits_nr = mem_nr <= limit
    tt = np.where(fits_nr, time_nr, np.where(mem_r <= limit, time_r, inf))
    return tt, ~fits_nr


@dataclass(frozen=True)
class _Sums:
    """Every contiguous stage's figures: [i, j] = the stage of blocks i..j-1."""

    F: np.ndarray
    B: np.ndarray
    A: np.ndarray
    C: np.ndarray
    I: np.ndarray
    X: np.ndarray
    P: np.ndarray
    ret_c: np.ndarray   # [i]: comm of model outputs produced before block i
    ret_i: np.ndarray   # [i]: their bytes
    C_at: tuple[np.ndarray, ...] = ()   # C per stage when links differ (BlockProblem.link_of)

    def comm(self, s: int) -> np.ndarray:
        """C[i, j] of stage s."""
        return self.C_at[s] if self.C_at else self.C


def _sums(prob: BlockProblem) -> _Sums:
    n = prob.n
    fwd = np.asarray(prob.fwd, dtype=np.float64)
    bwd = np.asarray(prob.bwd, dtype=np.float64)
    act = np.asarray(prob.act, dtype=np.float64)

    def pref(x: np.ndarray) -> np.ndarray:
        c = np.concatenate([[0.0], np.cumsum(x)])
        return c[None, :] - c[:, None]          # [i, j] = sum x[i:j]

    C = _rectangles(n, [(v.producer, v.consumers, v.comm) for v in prob.values if v.producer >= 0])
    I = _rectangles(n, [(v.producer, v.consumers, float(v.nbytes)) for v in prob.values])
    X = _rectangles(n, [(v.producer, v.consumers, float(v.nbytes)) for v in prob.values if v.producer >= 0])
    P = _rectangles(n, [(-1, r, float(b)) for b, r in prob.params])
    d = prob.num_stages
    C_at: tuple[np.ndarray, ...] = ()
    if prob.link_of:
        C_at = tuple(_links_into(prob, s) for s in range(d))
    ret_c = np.zeros(n + 1)
    ret_i = np.zeros(n + 1)
    for v in prob.values:
        if v.returned and v.producer >= 0:
            # enters the last stage [i, n) as an output only where no consumer there reads it
            first = max(v.producer, max(v.consumers, default=-1)) + 1
            ret_c[first:] += prob.comm_lowest(v, d - 1)
            if not v.consumers and d > 1:       # the stage before the last ends with the producer
                ret_c[first] += prob.comm_at(v, d - 2, d - 1) - prob.comm_lowest(v, d - 1)
            ret_i[first:] += v.nbytes
    return _Sums(pref(fwd), pref(bwd), pref(act), C, I, X, P, ret_c, ret_i, C_at)


def _links_into(prob: BlockProblem, s: int) -> np.ndarray:
    """C[i, j] of stage s when values pay the link from their producer's stage (BlockProblem.comm_at).

    Stage s = [i, j) starts right after stage s-1's last block i-1: a value made by block i-1
    comes over link s-1 -> s exactly; one made earlier may come from any earlier stage and is
    charged the cheapest (:meth:`~fxpipe.passes.problem.BlockProblem.comm_lowest`), so the DP's
    bottleneck stays a lower bound of its split's (re-checked by ``evaluate``)."""
    n = prob.n
    made = [v for v in prob.values if v.producer >= 0]
    if s == 0:
        return _rectangles(n, [])
    low = _rectangles(n, [(v.producer, v.consumers, prob.comm_lowest(v, s)) for v in made])
    exact = [(v.producer + 1, v.producer + 2, v.consumers[0] + 1, prob.comm_at(v, s - 1, s) - prob.comm_lowest(v, s))
             for v in made if v.consumers]
    return low + _fill(n, [r for r in exact if r[3] != 0])


def stage_table(prob: BlockProblem, s: int,
                sums: _Sums | None = None) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """The evaluator's (T_s, M_s) of every contiguous stage s at once, per value of r_s.

    For s < d - 1 the arrays are [i, j]: stage s holds blocks i..j-1. For the last
    stage only j = n matters and the arrays are [i]; the model outputs produced
    before block i enter it.
    """
    S = _sums(prob) if sums is None else sums
    n, d = prob.n, prob.num_stages
    if s < d - 1:
        Cs, Is, Xs, Fs, Bs, As, Ps = S.comm(s), S.I, S.X, S.F, S.B, S.A, S.P
    else:
        Cs, Is, Xs = S.comm(s)[:, n] + S.ret_c, S.I[:, n] + S.ret_i, S.X[:, n] + S.ret_i
        Fs, Bs, As, Ps = S.F[:, n], S.B[:, n], S.A[:, n], S.P[:, n]
        lf, lb, la = prob.loss          # loss_fn runs after the last stage's forward
        Fs, Bs, As = Fs + lf, Bs + lb, As + la
    ns = prob.ctx.in_flight(s)
    kept = prob.loss[2] if s == d - 1 else 0
    return {r: (stage_time(Fs, Bs, Cs, r), stage_memory(Ps, As, Is, Xs, ns, r, prob.ctx, kept))
            for r in (False, True)}


def split_sequence(prob: BlockProblem) -> SplitResult | None:
    """Best contiguous split of ``prob``'s block order (see the module docstring).

    Args:
        prob: the block problem; blocks are split in index order.

    Returns:
        The split with the smallest bottleneck, or None when no contiguous split
        has every stage non-empty and within the memory limit.
    """
    n, d = prob.n, prob.num_stages
    if d < 1 or n < d:
        return None
    sums = _sums(prob)
    limit = np.inf if prob.memory_limit is None else float(prob.memory_limit)
    valid = np.triu(np.ones((n + 1, n + 1), dtype=bool), k=1)
    if prob.work:               # blocks [i, j) must hold a node that is not local (BlockProblem.work)
        cnt = np.concatenate(([0], np.cumsum(np.asarray(prob.work, dtype=np.int64))))
        valid &= (cnt[None, :] - cnt[:, None]) >= 1

    best = np.full(n + 1, np.inf)
    choice: list[np.ndarray] = []
    rec: list[np.ndarray] = []
    for s in range(d):
        table = stage_table(prob, s, sums)
        (t_nr, m_nr), (t_r, m_r) = table[False], table[True]
        T, R = _stage_options(t_nr, t_r, m_nr, m_r, limit, prob.recompute)
        if s < d - 1:
            T = np.where(valid, T, np.inf)
        else:
            T = np.where(np.arange(n + 1) < n, T, np.inf)
            if prob.work:
                T = np.where(valid[:, n], T, np.inf)
        if s == 0:
            new = T[0].copy() if s < d - 1 else np.full(n + 1, np.inf)
            if d == 1:
                new[n] = T[0]
            arg = np.zeros(n + 1, dtype=np.int64)
        elif s < d - 1:
            M = np.maximum(best[:, None], T)
            arg = np.argmin(M, axis=0)
            new = M[arg, np.arange(n + 1)]
        else:
            M = np.maximum(best, T)
            arg = np.zeros(n + 1, dtype=np.int64)
            arg[n] = int(np.argmin(M))
            new = np.full(n + 1, np.inf)
            new[n] = M[arg[n]]
        best = new
        choice.append(arg)
        rec.append(R)
    if not np.isfinite(best[n]):
        return None
    bounds = [n]
    flags: list[bool] = []
    j = n
    for s in range(d - 1, -1, -1):
        i = int(choice[s][j]) if s > 0 else 0
        R = rec[s]
        flags.append(bool(R[i] if R.ndim == 1 else R[i, j]))
        bounds.append(i)
        j = i
    bounds.reverse()
    flags.reverse()
    times = tuple(_split_times(prob, bounds, flags))
    return SplitResult(tuple(bounds), tuple(flags), float(best[n]), times)


def _split_times(prob: BlockProblem, bounds: Sequence[int], flags: Sequence[bool]) -> list[float]:
    stage: list[int] = []
    for s in range(prob.num_stages):
        stage.extend([s] * (bounds[s + 1] - bounds[s]))
    return evaluate(prob, stage, flags)[0]


@dataclass(frozen=True)
class DPSplit:
    """Result of :func:`best_contiguous_split` on a graph."""

    stage_of: dict[str, int]
    recompute: tuple[bool, ...]
    bottleneck: float


def best_contiguous_split(gm: torch.fx.GraphModule, cost_model: CostModel, *, num_stages: int,
                          num_microbatches: int, schedule: str = "2bw",
                          memory_limit: int | None = None, optimizer_slots: int = 0,
                          recompute: bool | None = None,
                          order: Sequence[str] | None = None) -> DPSplit:
    """Best split of a topological order of the compute nodes into contiguous stages.

    Args:
        gm: annotated graph (see :func:`fxpipe.passes.coarsen.graph_costs`).
        cost_model: prices transfers.
        num_stages: d.
        num_microbatches: m (sets the in-flight counts n_s).
        schedule: "2bw" | "flush" | "gpipe".
        memory_limit: bytes per device, or None.
        optimizer_slots: k, optimizer state tensors per parameter.
        recompute: None chooses per stage; True/False forces every stage.
        order: a topological order of all compute-node names (default: graph order).

    Returns:
        A :class:`DPSplit`; exact over contiguous splits of ``order`` (hence
        optimal for chains).

    Raises:
        ConfigError: bad num_stages / schedule / order.
        InfeasibleMemoryError: no contiguous split of the order fits the limit.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    gc = graph_costs(gm, cost_model)
    if not 1 <= num_stages <= gc.n:
        raise ConfigError(f"num_stages={num_stages} must be between 1 and the number of "
                          f"compute nodes ({gc.n})")
    if order is None:
        idx = list(range(gc.n))
    else:
        if sorted(order) != sorted(gc.names):
            raise ConfigError("order must list every compute node exactly once")
        idx = [gc.index[name] for name in order]
    pos = {v: k for k, v in enumerate(idx)}
    for v in range(gc.n):
        for c in gc.consumers[v]:
            if pos[c] < pos[v]:
                raise ConfigError(f"order is not topological: {gc.names[c]} before {gc.names[v]}")
    prob = build_problem(gc, [[v] for v in idx], num_stages=num_stages,
                         num_microbatches=num_microbatches, schedule=schedule,
                         memory_limit=memory_limit, optimizer_slots=optimizer_slots,
                         recompute=recompute)
    res = split_sequence(prob)
    if res is None:
        raise InfeasibleMemoryError(
            f"no contiguous split of the order into {num_stages} stages fits "
            f"memory_limit={memory_limit} bytes; raise memory_limit or use more stages",
            memory_limit=memory_limit)
    sob = res.stage_of_block()
    return DPSplit({gc.names[v]: sob[k] for k, v in enumerate(idx)}, res.recompute, res.bottleneck)


def dp_plan(gm: torch.fx.GraphModule, cost_model: CostModel, *, num_stages: int,
            num_microbatches: int, schedule: str = "2bw", memory_limit: int | None = None,
            optimizer_slots: int = 0, recompute: bool | None = None) -> Plan:
    """:func:`best_contiguous_split` of the graph order as a :class:`Plan` (solver "dp").

    Args:
        see :func:`best_contiguous_split`.

    Returns:
        The plan, built and re-checked by ``plan_from_assignment``.

    Raises:
        see :func:`best_contiguous_split`.
    """
    import time


    t0 = time.perf_counter()
    sp = best_contiguous_split(gm, cost_model, num_stages=num_stages,
                               num_microbatches=num_microbatches, schedule=schedule,
                               memory_limit=memory_limit, optimizer_slots=optimizer_slots,
                               recompute=recompute)
    gc = graph_costs(gm, cost_model)
    return plan_from_assignment(
        gm, cost_model, sp.stage_of, sp.recompute, num_microbatches=num_microbatches,
        schedule=schedule, memory_limit=memory_limit, optimizer_slots=optimizer_slots,
        solver="dp", solve_time=time.perf_counter() - t0,
        lower_bound=trivial_lower_bound(gc, num_stages, recompute), costs=gc)
