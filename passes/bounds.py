"""Lower bounds on the bottleneck and on the peak memory of any plan, derived from the evaluator.

The bottleneck bounds are proofs for the gap the planner reports; the memory
bound lets the planner say "no plan fits" without solving.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

from fxpipe.cost_models.evaluator import CostContext, stage_memory, stage_time

from .coarsen import GraphCosts

__all__ = ["trivial_lower_bound", "memory_lower_bound", "articulation_lower_bound"]


def trivial_lower_bound(gc: GraphCosts, num_stages: int, recompute: bool | None = None) -> float:
    """max(sum_v (F+B) / d, max_v (F+B)), with F counted twice when recompute is forced.

    Args:
        gc: graph costs.
        num_stages: d.
        recompute: True when every stage must recompute.

    Returns:
        A lower bound on the bottleneck of any plan, in seconds.
    """
    per = _node_work(gc, recompute)
    loss = 0.0
    if gc.loss is not None:         # loss_fn's work is on the last stage whatever the plan
        loss = stage_time(gc.loss.fwd_time, gc.loss.bwd_time, 0.0, recompute is True)
    return max((sum(per) + loss) / num_stages, max(per, default=0.0), loss)


def _node_work(gc: GraphCosts, recompute: bool | None) -> list[float]:
    """Each node's own stage time without communication (F counted twice when recompute is forced)."""
    return [stage_time(gc.fwd[v], gc.bwd[v], 0.0, recompute is True) for v in range(gc.n)]


def memory_lower_bound(gc: GraphCosts, *, num_stages: int, num_microbatches: int,
                       schedule: str, optimizer_slots: int, recompute: bool | None) -> int:
    """A cheap lower bound on min over plans of max_s M_s.

    Every node sits on a stage with n_s >= n_min, so max_s M_s is at least each
    node's own ``P_v*copies + A_v*(n_min if recompute is forbidden else 1)``, and
    at least the sum of all parameters and activations spread over d stages.

    Args:
        gc: graph costs.
        num_stages, num_microbatches, schedule, optimizer_slots, recompute: as in :func:`partition`.

    Returns:
        Bytes; no plan fits a smaller memory limit.
    """
    d = num_stages
    ctx = CostContext(schedule=schedule, num_stages=d, num_microbatches=num_microbatches,
                      optimizer_slots=optimizer_slots, recompute=recompute)
    n_min = min(ctx.in_flight(s) for s in range(d))

    def least(p_bytes: int, a_bytes: int) -> int:
        # M_s grows with I_s, X_s and n_s: no inputs and the fewest microbatches in flight
        return min(int(stage_memory(p_bytes, a_bytes, 0, 0, n_min, r, ctx))
                   for r in ctx.recompute_options)

    node = max((least(sum(gc.param_bytes[p] for p in gc.params[v]), gc.act[v])
                for v in range(gc.n)), default=0)
    params = {p for ps in gc.params for p in ps}
    loss_act = gc.loss.activation_bytes if gc.loss is not None else 0
    node = max(node, least(0, loss_act))
    total = least(sum(gc.param_bytes[p] for p in params), sum(gc.act) + loss_act)
    return int(max(node, math.ceil(total / d)))


_IDEALS_MAX = 4096           # ideals enumerated per segment by articulation_lower_bound


def articulation_lower_bound(gc: GraphCosts, num_stages: int, recompute: bool | None = None,
                             upper: float | None = None) -> float:
    """A lower bound on the bottleneck that counts the communication every stage must pay.

    Articulation nodes split the graph into a chain of segments (a residual-stream
    model: one segment per half layer). The bound is the smallest T for which d
    stages, each costing its work plus a proven minimum entry communication, can
    cover the graph in a relaxation where work is divisible at will.

    Proof. Call a an *articulation* node when every compute node is an ancestor of a
    (a included) or a descendant of a; these nodes a_1 < ... < a_K are totally ordered
    by reachability. Segment G_0 = Anc[a_1], G_r = Desc(a_r) ∩ Anc[a_{r+1}]
    (G_K = Desc(a_K)); every node lies in exactly one segment, and a producer of a
    node of G_r lies in G_r or in Anc[a_r]. Take any monotone plan, σ_r = stage(a_r),
    and a stage t >= 1 with r = max{r : σ_r < t} >= 1 (or r = 0 if none). Nodes of G_j
    have stages in [σ_j, σ_{j+1}], so stage t lies in Desc(a_r), and with S_t the
    nodes of stages < t: Anc[a_r] ⊆ S_t ⊆ G_0..G_r minus a_{r+1}. With W the work
    (F+B, +F when recompute is forced), Q_t = W(S_t) = P_r + W(X), X = S_t ∩ G_r, an
    ideal of G_r without a_{r+1}, P_r = W(Anc[a_r]). Two cases for r >= 1:

    (A) σ_{r+1} = t: every node of G_r \\ X is on stage t, so every value made in
        Anc[a_r] ∪ X and read in G_r \\ X enters stage t:
        C_t >= cut_r(X) := Σ comm(u) over those values.
    (B) σ_{r+1} > t: stage t ⊆ G_r, so Q_{t+1} <= P_{r+1}. A node w of stage t with
        no producer in stage t has all producers on earlier stages, so
        C_t >= c_r := min_{w ∈ G_r} Σ_{u ∈ prod(w)} comm(u).
    (r = 0: C_t >= 0.) Since T >= T_t >= (Q_{t+1} - Q_t) + C_t, every plan of
    bottleneck T satisfies this recursion on reachable prefixes [0, R_t]
    (R_1 = T: stage 0 pays nothing); feasibility is monotone in T, so a binary
    search gives the smallest feasible T of the relaxation, a lower bound. Segments
    with more than ``_IDEALS_MAX`` ideals use case (B)'s cost at any position
    without the cap P_{r+1} (weaker, still sound).

    Args:
        gc: graph costs.
        num_stages: d.
        recompute: True when every stage must recompute (F counted twice).
        upper: a known feasible bottleneck (the search's upper end).

    Returns:
        Seconds; no plan of ``gc`` into d stages has a smaller bottleneck.
    """
    n, d = gc.n, num_stages
    trivial = trivial_lower_bound(gc, max(d, 1), recompute)
    if n == 0 or d <= 1:
        return trivial
    work = _node_work(gc, recompute)
    anc = [0] * n                                   # bitsets; graph order is topological
    for v in range(n):
        a = 1 << v
        for p in gc.producers[v]:
            a |= anc[p]
        anc[v] = a
    desc = [0] * n
    for v in range(n - 1, -1, -1):
        a = 1 << v
        for c in gc.consumers[v]:
            a |= desc[c]
        desc[v] = a
    full = n
    arts = [v for v in range(n) if (anc[v] | desc[v]).bit_count() == full]
    if not arts:
        return trivial
    art_mask = 0
    for a in arts:
        art_mask |= 1 << a
    K = len(arts)
    seg = [((anc[v] & art_mask) & ~(1 << v)).bit_count() for v in range(n)]
    members: list[list[int]] = [[] for _ in range(K + 1)]
    for v in range(n):
        members[seg[v]].append(v)
    seg_work = [sum((work[v] for v in vs), 0.0) for vs in members]
    c_min = [0.0] * (K + 1)
    for r in range(1, K + 1):
        c_min[r] = min((sum((gc.comm[u] for u in gc.producers[v]), 0.0) for v in members[r]),
                       default=0.0)
    P = [0.0]
    for r in range(K + 1):
        P.append(P[-1] + seg_work[r])               # region r = [P[r], P[r+1]]
    total = P[-1]
    # Case (A) tables per segment: ideals X sorted by W(X), prefix max of W(X) - cut(X).
    ideal_w: list[list[float] | None] = [None] * (K + 1)
    ideal_best: list[list[float] | None] = [None] * (K + 1)
    for r in range(1, K + 1):
        table = _segment_ideals(gc, members[r], seg, r, work,
                                arts[r] if r < K else None)
        if table is None:
            continue
        table.sort()
        ws, best, run = [], [], -math.inf
        for w_x, gain in table:
            run = max(run, gain)
            ws.append(w_x)
            best.append(run)
        ideal_w[r], ideal_best[r] = ws, best
    # reach_prev[r]: the farthest start-minus-entry-cost of a stage whose start lies in a
    # region before r and is anywhere in it (all of those are <= P[r]).
    start_gain = []
    for r in range(K + 1):
        if r == 0:
            g = P[1]
        elif ideal_best[r] is not None:
            g = P[r] + ideal_best[r][-1]  # type: ignore[index]
        else:
            g = P[r + 1] - c_min[r]
        start_gain.append(g)
    prefix_gain, run = [], -math.inf
    for g in start_gain:
        run = max(run, g)
        prefix_gain.append(run)

    def advance(R: float, T: float) -> float:
        r = min(max(bisect.bisect_right(P, R) - 1, 0), K)
        cand = R
        if r > 0:
            cand = max(cand, prefix_gain[r - 1] + T)
        if r == 0:
            cand = max(cand, R + T)
        elif ideal_w[r] is None:
            cand = max(cand, R + T - c_min[r])
        else:
            k = bisect.bisect_right(ideal_w[r], R - P[r]) - 1  # type: ignore[arg-type]
            if k >= 0:
                cand = max(cand, P[r] + ideal_best[r][k] + T)  # type: ignore[index]
            cand = max(cand, min(P[r + 1], R + T - c_min[r]))
        return cand

    def feasible(T: float) -> bool:
        R = T
        for _ in range(1, d):
            if R >= total:
                return True
            R = advance(R, T)
        return R >= total

    lo = trivial
    if feasible(lo):
        return lo
    hi = max(upper if upper is not None else 0.0, lo)
    while not feasible(hi):
        hi = 2 * hi + 1e-30
        if hi > 1e30:
            return lo
    for _ in range(200):
        mid = (lo + hi) / 2
        if not lo < mid < hi or hi - lo <= 1e-10 * hi:
            break
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return lo


def _segment_ideals(gc: GraphCosts, nodes: list[int], seg: list[int], r: int, work: list[float],
                    last: int | None) -> list[tuple[float, float]] | None:
    """(W(X), W(X) - cut_r(X)) for every ideal X of segment r not holding ``last``.

    None when the segment has more than ``_IDEALS_MAX`` ideals.
    """
    local = {v: i for i, v in enumerate(nodes)}
    inside = [[local[p] for p in gc.producers[v] if p in local] for v in nodes]
    # values read in the segment: (producer-local-index or -1 for outside, reader mask, comm)
    vals: dict[int, list[Any]] = {}
    for i, v in enumerate(nodes):
        for p in gc.producers[v]:
            ent = vals.setdefault(p, [local.get(p, -1), 0, gc.comm[p]])
            ent[1] |= 1 << i
    vals_list = [(pi, mask, c) for pi, mask, c in vals.values() if c > 0]
    candidates = [i for i, v in enumerate(nodes) if v != last]
    out: list[tuple[float, float]] = []
    # iterative DFS over include/exclude decisions in topological order
    stack: list[tuple[int, int, float]] = [(0, 0, 0.0)]
    while stack:
        k, mask, w_x = stack.pop()
        if k == len(candidates):
            cut = 0.0
            for pi, readers, c in vals_list:
                if (pi < 0 or (mask >> pi) & 1) and (readers & ~mask):
                    cut += c
            out.append((w_x, w_x - cut))
            if len(out) > _IDEALS_MAX:
                return None
            continue
        i = candidates[k]
        stack.append((k + 1, mask, w_x))
        if all((mask >> p) & 1 for p in inside[i]):
            stack.append((k + 1, mask | (1 << i), w_x + work[nodes[i]]))
    return out
