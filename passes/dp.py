"""Exact dynamic program for the best contiguous split of a topological order into d stages.

The CP-SAT partitioner uses it as a hint and an upper bound; on a chain (a
graph with one topological order) it is the exact optimum by itself.

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

All O(n^2) stage figures come from prefix sums and 2-D difference arrays, so
the whole DP costs O(d*n^2) numpy work and O(n^2) memory (n = sequence length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch.fx

from fxpipe.cost_models.memory import in_flight, weight_copies
from fxpipe.errors import ConfigError, InfeasibleMemoryError
from fxpipe.ir import SCHEDULES, CostModel, Plan

from .coarsen import GraphCosts, graph_costs

__all__ = ["Value", "BlockProblem", "SplitResult", "DPSplit", "build_problem", "split_sequence",
           "evaluate",
           "best_contiguous_split", "dp_plan"]


@dataclass(frozen=True)
class Value:
    """A value that may cross stages: one node's output (or a model input)."""

    producer: int                  # block index; -1 = model input (free to send)
    consumers: tuple[int, ...]     # reading blocks other than the producer, sorted
    comm: float                    # 2 * comm_time(bytes): paid once per stage it enters
    nbytes: int                    # counted in I_s of a stage it enters
    returned: bool = False         # a model output: enters the last stage


@dataclass(frozen=True)
class BlockProblem:
    """Stage-assignment problem on blocks listed in a topological order."""

    fwd: tuple[float, ...]         # F of each block
    bwd: tuple[float, ...]         # B of each block
    act: tuple[int, ...]           # A: activation bytes of each block
    values: tuple[Value, ...]
    params: tuple[tuple[int, tuple[int, ...]], ...]   # (bytes, reader blocks) per parameter
    edges: tuple[tuple[int, int], ...]                # block precedence (u before v), u < v
    num_stages: int                # d
    in_flight: tuple[int, ...]     # n_s per stage
    weight_copies: int             # 2 + k + [2bw]
    memory_limit: int | None
    recompute: bool | None         # None: chosen per stage; True/False: forced

    @property
    def n(self) -> int:
        return len(self.fwd)


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


def build_problem(gc: GraphCosts, blocks: Sequence[Sequence[int]], *, num_stages: int,
                  num_microbatches: int, schedule: str, memory_limit: int | None,
                  optimizer_slots: int, recompute: bool | None,
                  time_scale: float | None = None) -> BlockProblem:
    """Block-level problem from graph costs and blocks (a topological order of blocks).

    Args:
        gc: graph costs.
        blocks: compute-node indices per block; blocks must be in a topological order.
        num_stages, num_microbatches, schedule, memory_limit, optimizer_slots, recompute:
            as in :func:`fxpipe.passes.partition.partition`.
        time_scale: if given, every time is multiplied by it and rounded to an
            integer (the CP-SAT model's units).

    Returns:
        The :class:`BlockProblem`.
    """
    blk = [0] * gc.n
    for b, nodes in enumerate(blocks):
        for v in nodes:
            blk[v] = b

    def t(x: float) -> float:
        return float(round(x * time_scale)) if time_scale is not None else x

    fwd = tuple(t(sum(gc.fwd[v] for v in nodes)) for nodes in blocks)
    bwd = tuple(t(sum(gc.bwd[v] for v in nodes)) for nodes in blocks)
    act = tuple(sum(gc.act[v] for v in nodes) for nodes in blocks)
    values: list[Value] = []
    edges: set[tuple[int, int]] = set()
    for v in range(gc.n):
        cons = tuple(sorted({blk[c] for c in gc.consumers[v]} - {blk[v]}))
        for c in cons:
            edges.add((blk[v], c))
        ret = gc.returned[v]
        if cons or ret:
            values.append(Value(blk[v], cons, t(gc.comm[v]), gc.out_bytes[v], ret))
    for inp in gc.inputs:
        values.append(Value(-1, tuple(sorted({blk[c] for c in inp.consumers})), 0.0, inp.nbytes))
    readers: dict[str, set[int]] = {}
    for v in range(gc.n):
        for p in gc.params[v]:
            readers.setdefault(p, set()).add(blk[v])
    params = tuple((gc.param_bytes[p], tuple(sorted(r))) for p, r in readers.items())
    for (u, w) in edges:
        if u >= w:
            raise ValueError(f"blocks are not in a topological order: edge {u} -> {w}")
    d = num_stages
    return BlockProblem(
        fwd=fwd, bwd=bwd, act=act, values=tuple(values), params=params,
        edges=tuple(sorted(edges)), num_stages=d,
        in_flight=tuple(in_flight(schedule, d, s, num_microbatches) for s in range(d)),
        weight_copies=weight_copies(schedule, optimizer_slots),
        memory_limit=memory_limit, recompute=recompute,
    )


def _rectangles(n: int, items: list[tuple[int, tuple[int, ...], float]]) -> np.ndarray:
    """M[i, j] = sum of w over items with a reader in [i, j) and base < i.

    An item (base, readers, w) covers stage [i, j) iff base < i <= c < j for a
    reader c; the region is a union of rectangles i in (c_{t-1}, c_t], j > c_t.
    """
    D = np.zeros((n + 2, n + 2))
    rows0, rows1, cols, ws = [], [], [], []
    for base, readers, w in items:
        if w == 0:
            continue
        prev = base
        for c in readers:
            rows0.append(prev + 1)
            rows1.append(c + 1)
            cols.append(c + 1)
            ws.append(w)
            prev = c
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
    fwd = np.asarray(prob.fwd, dtype=np.float64)
    fb = fwd + np.asarray(prob.bwd, dtype=np.float64)
    act = np.asarray(prob.act, dtype=np.float64)

    def pref(x: np.ndarray) -> np.ndarray:
        c = np.concatenate([[0.0], np.cumsum(x)])
        return c[None, :] - c[:, None]          # [i, j] = sum x[i:j]

    FB, F, A = pref(fb), pref(fwd), pref(act)
    C = _rectangles(n, [(v.producer, v.consumers, v.comm) for v in prob.values if v.producer >= 0])
    I = _rectangles(n, [(v.producer, v.consumers, float(v.nbytes)) for v in prob.values])
    X = _rectangles(n, [(v.producer, v.consumers, float(v.nbytes)) for v in prob.values if v.producer >= 0])
    P = _rectangles(n, [(-1, r, float(b)) for b, r in prob.params])
    ret_c = np.zeros(n + 1)
    ret_i = np.zeros(n + 1)
    for v in prob.values:
        if v.returned and v.producer >= 0:
            ret_c[v.producer + 1:] += v.comm
            ret_i[v.producer + 1:] += v.nbytes
    limit = np.inf if prob.memory_limit is None else float(prob.memory_limit)
    valid = np.triu(np.ones((n + 1, n + 1), dtype=bool), k=1)
    wc = prob.weight_copies

    best = np.full(n + 1, np.inf)
    choice: list[np.ndarray] = []
    rec: list[np.ndarray] = []
    for s in range(d):
        ns = prob.in_flight[s]
        if s < d - 1:
            Cs, Is, Xs, FBs, Fs, As, Ps = C, I, X, FB, F, A, P
        else:  # only j = n matters; add the model outputs entering the last stage
            Cs, Is, Xs = C[:, n] + ret_c, I[:, n] + ret_i, X[:, n] + ret_i
            FBs, Fs, As, Ps = FB[:, n], F[:, n], A[:, n], P[:, n]
        t_nr = FBs + Cs
        t_r = t_nr + Fs
        m_nr = wc * Ps + ns * (As + Xs)
        m_r = wc * Ps + ns * Is + As
        T, R = _stage_options(t_nr, t_r, m_nr, m_r, limit, prob.recompute)
        if s < d - 1:
            T = np.where(valid, T, np.inf)
        else:
            T = np.where(np.arange(n + 1) < n, T, np.inf)
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


def evaluate(prob: BlockProblem, block_stage: Sequence[int],
             flags: Sequence[bool]) -> tuple[list[float], list[int]]:
    """Stage times T_s and memories M_s of any block assignment (in the problem's units).

    Args:
        prob: the block problem.
        block_stage: stage of each block.
        flags: r_s per stage.

    Returns:
        (times, memories), one entry per stage.
    """
    d = prob.num_stages
    f = [0.0] * d
    t = [0.0] * d
    a = [0] * d
    for b in range(prob.n):
        s = block_stage[b]
        f[s] += prob.fwd[b]
        t[s] += prob.fwd[b] + prob.bwd[b]
        a[s] += prob.act[b]
    ib = [0] * d
    xb = [0] * d
    for v in prob.values:
        ps = block_stage[v.producer] if v.producer >= 0 else -1
        into = {block_stage[c] for c in v.consumers}
        if v.returned and v.producer >= 0:
            into.add(d - 1)
        for s in into:
            if s > ps:
                t[s] += v.comm if v.producer >= 0 else 0.0
                ib[s] += v.nbytes
                xb[s] += v.nbytes if v.producer >= 0 else 0
    pb = [0] * d
    for nbytes, readers in prob.params:
        for s in {block_stage[c] for c in readers}:
            pb[s] += nbytes
    times, mems = [], []
    for s in range(d):
        times.append(t[s] + (f[s] if flags[s] else 0.0))
        n_s = prob.in_flight[s]
        stash = n_s * ib[s] + a[s] if flags[s] else n_s * (a[s] + xb[s])
        mems.append(pb[s] * prob.weight_copies + stash)
    return times, mems


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

    from .partition import plan_from_assignment, trivial_lower_bound

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
