"""CP-SAT partitioner: node -> stage and recompute per stage, minimising the bottleneck stage time.

The model (docs/planner.md; symbols in docs/cost-model.md), on blocks b (see coarsen.py)::

    z[b,s] = [stage(b) >= s]        z[b,0] = 1,  z[b,d] = 0,  z[b,s+1] <= z[b,s]
    x[b,s] = z[b,s] - z[b,s+1]      (block b runs on stage s)
    edge u -> v:  z[u,s] <= z[v,s]  (stages never decrease along edges)
    every stage non-empty:  sum_b x[b,s] >= 1
    e[u,s] >= x[c,s] - z[u,s]       for each consumer block c of u's value: the value enters s
    e[u,d-1] >= 1 - z[u,d-1]        a model output enters the last stage
    F_s = sum_b F_b x[b,s],  B_s likewise,  C_s = sum_u 2*comm_time(bytes_u) e[u,s]
    T >= F_s + B_s + C_s,   T >= F_s + B_s + F_s + C_s  if r_s
    M_s = P_s*(2 + k + [2bw]) + (r_s ? n_s*I_s + A_s : n_s*(A_s + X_s)) <= memory_limit
    minimise T

e.g. a skip connection a -> d over 4 stages [a][b][c][d] sets only e[a,3]: the
value is sent to stage 3 directly and paid there once.

The solver returns only variable values; :func:`plan_from_assignment` turns an
assignment into a frozen :class:`~fxpipe.ir.Plan` and re-checks every constraint
in floating point from the graph itself.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.fx
from ortools.sat.python import cp_model

from fxpipe.cost_models.evaluator import CostContext, StageFigures, stage_memory, stage_time
from fxpipe.errors import ConfigError, InfeasibleMemoryError, PartitionError
from fxpipe.ir import SCHEDULES, CostModel, Plan, StagePlan

from .coarsen import GraphCosts, coarsen_costs, graph_costs
from .dp import SplitResult, split_sequence
from .problem import BlockProblem, build_problem, evaluate, stage_figures

__all__ = ["partition", "plan_from_assignment", "trivial_lower_bound", "memory_lower_bound",
           "articulation_lower_bound"]

_TIME_UNITS = 2 ** 30        # the largest possible T is scaled to about this many integer units
# refinement after the first coarse solve: at most this many blocks per stage / in all
# (CP-SAT stops proving anything within seconds past ~600 blocks x 16 stages)
_MAX_BLOCKS_PER_STAGE = 48
_MAX_REFINED_BLOCKS = 640
_DET_PER_SECOND = 0.5        # CP-SAT deterministic time granted per second of time_limit
_FINE_PROOF_MAX_VARS = 9000  # solve the uncoarsened model (n * (d - 1) stage Booleans) for a proof
                             # when the gap stays > 1%: GPT-2 XL (1,110 nodes) at d=8 proves in ~5 s
_FINE_DP_MAX = 2000          # graphs up to this many nodes get the O(d n^2) DP (~14 n^2 doubles) on the graph order


# ----------------------------------------------------------------------------- plan building


def _validate(num_stages: int | None, num_microbatches: int, schedule: str,
              memory_limit: int | None, optimizer_slots: int) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ConfigError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")
    if memory_limit is not None and memory_limit <= 0:
        raise ConfigError(f"memory_limit must be a positive number of bytes or None, "
                          f"got {memory_limit!r}")
    if optimizer_slots < 0:
        raise ConfigError(f"optimizer_slots must be >= 0, got {optimizer_slots}")


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
    return max(sum(per) / num_stages, max(per, default=0.0))


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
    total = least(sum(gc.param_bytes[p] for p in params), sum(gc.act))
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


def plan_from_assignment(gm: torch.fx.GraphModule, cost_model: CostModel, stage_of: dict[str, int],
                         recompute: Sequence[bool], *, num_microbatches: int, schedule: str,
                         memory_limit: int | None = None, optimizer_slots: int = 0,
                         solver: str = "cp-sat", solve_time: float = 0.0,
                         lower_bound: float | None = None, optimal: bool = False,
                         extra: dict[str, Any] | None = None, check_memory: bool = True,
                         costs: GraphCosts | None = None) -> Plan:
    """Build the frozen Plan of an assignment, recomputing and re-checking every figure.

    ``Plan.stages[s].nodes`` lists the compute nodes (call_function / call_method
    / call_module) of stage s in graph order; placeholders and get_attr nodes are
    not listed (inputs are available on every stage, get_attr follows its users).
    ``cut_edges`` lists (producer, consumer) compute-node pairs on different stages.

    Args:
        gm: annotated graph.
        cost_model: prices transfers.
        stage_of: compute-node name -> stage; names of placeholder/get_attr/output
            nodes are ignored.
        recompute: r_s per stage; its length is the number of stages d.
        num_microbatches: m.
        schedule: "2bw" | "flush" | "gpipe".
        memory_limit: bytes per device, or None.
        optimizer_slots: k.
        solver, solve_time, optimal, extra: recorded in the Plan.
        lower_bound: proven lower bound; default :func:`trivial_lower_bound`. It is
            clipped to the bottleneck.
        check_memory: raise when a stage exceeds ``memory_limit`` (baselines pass
            False and mark ``extra["over_memory"]``).
        costs: precomputed graph costs of ``gm``.

    Returns:
        The Plan.

    Raises:
        ConfigError: bad schedule / num_microbatches / empty ``recompute``.
        PartitionError: a compute node is unassigned or assigned out of range, a
            name is unknown, a stage is empty, an edge goes to an earlier stage, or
            (check_memory) a stage exceeds the memory limit.
    """
    _validate(None, num_microbatches, schedule, memory_limit, optimizer_slots)
    gc = costs if costs is not None else graph_costs(gm, cost_model)
    d = len(recompute)
    if d < 1:
        raise ConfigError("recompute must have one flag per stage (at least one stage)")
    graph_names = {n.name for n in gm.graph.nodes}
    for name in stage_of:
        if name not in graph_names:
            raise PartitionError(f"plan_from_assignment: stage_of names {name!r}, which is not a "
                                 "node of the graph")
    stage = [0] * gc.n
    for v, name in enumerate(gc.names):
        if name not in stage_of:
            raise PartitionError(f"plan_from_assignment: compute node {name!r} has no stage")
        s = stage_of[name]
        if not isinstance(s, int) or not 0 <= s < d:
            raise PartitionError(f"plan_from_assignment: node {name!r} is assigned stage {s!r}, "
                                 f"outside 0..{d - 1}")
        stage[v] = s
    for v in range(gc.n):
        for c in gc.consumers[v]:
            if stage[c] < stage[v]:
                raise PartitionError(
                    f"plan_from_assignment: edge {gc.names[v]} -> {gc.names[c]} goes from stage "
                    f"{stage[v]} back to stage {stage[c]}; stages must not decrease along edges")
    members: list[list[int]] = [[] for _ in range(d)]
    for v in range(gc.n):
        members[stage[v]].append(v)
    for s in range(d):
        if not members[s]:
            raise PartitionError(f"plan_from_assignment: stage {s} of {d} has no compute node")

    ctx = CostContext(schedule=schedule, num_stages=d, num_microbatches=num_microbatches,
                      optimizer_slots=optimizer_slots)
    prob = build_problem(gc, [[v] for v in range(gc.n)], num_stages=d,
                         num_microbatches=num_microbatches, schedule=schedule,
                         memory_limit=memory_limit, optimizer_slots=optimizer_slots,
                         recompute=None, ctx=ctx)
    stages: list[StagePlan] = []
    over: list[tuple[int, int]] = []
    for s, fig in enumerate(stage_figures(prob, stage)):
        r = bool(recompute[s])
        mem = fig.memory(ctx, r)
        if memory_limit is not None and mem > memory_limit:
            over.append((s, mem))
        stages.append(StagePlan(
            index=s, nodes=tuple(gc.names[v] for v in members[s]), recompute=r,
            time=fig.time(r), fwd_time=fig.fwd, bwd_time=fig.bwd, comm_time=fig.comm, memory=mem,
            param_bytes=fig.param_bytes, activation_bytes=fig.activation_bytes,
            input_bytes=fig.input_bytes, in_flight=fig.in_flight,
            received_bytes=fig.received_bytes))
    if over and check_memory:
        s, mem = over[0]
        raise PartitionError(
            f"plan_from_assignment: stage {s} needs {mem} bytes, over memory_limit={memory_limit} "
            f"(P={stages[s].param_bytes}, A={stages[s].activation_bytes}, "
            f"I={stages[s].input_bytes}, X={stages[s].received_bytes}, n={stages[s].in_flight}, "
            f"recompute={stages[s].recompute})")
    cut = tuple((gc.names[v], gc.names[c]) for v in range(gc.n) for c in gc.consumers[v]
                if stage[c] != stage[v])
    bottleneck = max(st.time for st in stages)
    lb = trivial_lower_bound(gc, d, None) if lower_bound is None else lower_bound
    lb = min(lb, bottleneck)
    info = dict(extra or {})
    if over:
        info["over_memory"] = True
        info["over_memory_stages"] = [s for s, _ in over]
    return Plan(
        stages=tuple(stages), num_microbatches=num_microbatches, schedule=schedule,
        bottleneck=bottleneck, lower_bound=lb,
        optimal=bool(optimal or bottleneck <= lb * (1 + 1e-9)),
        solver=solver, solve_time=solve_time, memory_limit=memory_limit,
        optimizer_slots=optimizer_slots, cut_edges=cut, extra=info)


# ----------------------------------------------------------------------------- CP-SAT model


@dataclass
class _Model:
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


def _build(prob: BlockProblem, *, objective: str, lb: int = 0, ub: int | None = None,
           hint: tuple[Sequence[int], Sequence[bool], int] | None = None) -> _Model:
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
    for s in range(d):
        m.add(_x_sum(z, [1] * n, s) >= 1)

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
        w_comm = int(val.comm)
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
            if w_comm:
                comm_terms[s].append((e, w_comm))
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
    ub_time = sum(fb) + sum(prob.fwd) + sum(int(v.comm) * d for v in prob.values)
    if objective == "time":
        obj = m.new_int_var(int(lb), int(ub if ub is not None else ub_time), "T")
    else:
        every = sum(v.nbytes for v in prob.values)    # M_s of one stage holding everything
        ub_mem = stage_memory(sum(b for b, _ in prob.params), sum(prob.act), every, every,
                              max(prob.in_flight), False, prob.ctx)
        obj = m.new_int_var(0, int(ub_mem), "M")

    times: list[dict[bool, Any]] = []
    mems: list[dict[bool, Any]] = []
    for s in range(d):
        C = lin(comm_terms[s])
        times.append({r_: _x_sum(z, work[r_], s) + C for r_ in (False, True)})
        if objective == "time":
            if isinstance(r[s], int):
                m.add(obj >= _x_sum(z, work[bool(r[s])], s) + C)
            else:
                m.add(obj >= _x_sum(z, work[False], s) + C)
                m.add(obj >= _x_sum(z, work[True], s) + C).only_enforce_if(r[s])
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
        A = _x_sum(z, prob.act, s)
        ns = prob.in_flight[s]
        I, X = lin(ibytes_terms[s]), lin(xbytes_terms[s])
        mem_nr = stage_memory(P, A, I, X, ns, False, prob.ctx)
        mem_r = stage_memory(P, A, I, X, ns, True, prob.ctx)
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
    return _Model(m, z, r, obj, times, mems)


def _solver(time_limit: float, num_workers: int, wall_limit: float | None = None) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    p = solver.parameters
    p.num_workers = num_workers
    p.interleave_search = num_workers > 1   # deterministic multi-worker search
    p.random_seed = 0
    p.max_deterministic_time = max(0.05, time_limit * _DET_PER_SECOND)
    p.max_time_in_seconds = max(0.1, time_limit if wall_limit is None else wall_limit)
    return solver


@dataclass
class _Solution:
    status: str
    block_stage: list[int] | None
    recompute: list[bool] | None
    objective: float | None
    bound: float
    wall: float
    deterministic: float


def _solve(prob: BlockProblem, *, objective: str, time_limit: float, num_workers: int,
           lb: int = 0, ub: int | None = None,
           hint: tuple[Sequence[int], Sequence[bool], int] | None = None,
           wall_limit: float | None = None) -> _Solution:
    built = _build(prob, objective=objective, lb=lb, ub=ub, hint=hint)
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
        return _Solution(name, bs, rec, float(solver.objective_value),
                         float(solver.best_objective_bound), wall, solver.deterministic_time)
    bound = float(solver.best_objective_bound) if status != cp_model.INFEASIBLE else math.inf
    return _Solution(name, None, None, None, bound, wall, solver.deterministic_time)


# ----------------------------------------------------------------------------- the pass


def _is_chain(prob: BlockProblem) -> bool:
    """True when consecutive blocks are joined by edges: the block order is the only one."""
    edges = set(prob.edges)
    return all((b, b + 1) in edges for b in range(prob.n - 1))


def _assignment(gc: GraphCosts, blocks: Sequence[Sequence[int]], block_stage: Sequence[int]) -> dict[str, int]:
    return {gc.names[v]: int(block_stage[b]) for b, vs in enumerate(blocks) for v in vs}


def partition(gm: torch.fx.GraphModule, cost_model: CostModel, *, num_stages: int,
              num_microbatches: int, schedule: str = "2bw", memory_limit: int | None = None,
              optimizer_slots: int = 0, recompute: bool | None = None, time_limit: float = 10.0,
              num_workers: int = 2, coarsen: bool = True, wall_limit: float | None = None) -> Plan:
    """Cut an annotated graph into pipeline stages minimising the bottleneck stage time.

    Steps: read costs; coarsen into blocks (graphs over ~12 blocks per stage);
    exact DP over the block order (hint and upper bound); CP-SAT on the block
    DAG with that hint and the lower bound; keep the better of the two; drop
    recomputation from stages that fit without it; rebuild and re-check the Plan.

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
        The Plan. ``extra`` holds ``status``, ``solver_bound`` (CP-SAT's bound on the
        problem it solved, seconds), ``solver_gap``, ``blocks``, ``coarsened``,
        ``dp_bottleneck``, ``wall_time``, ``deterministic_time``, ``source`` ("cp-sat"
        or "dp": which candidate won).

    Raises:
        ConfigError: num_stages out of range, unknown schedule, bad numbers.
        InfeasibleMemoryError: no plan fits ``memory_limit``; the message gives a
            lower bound on the smallest limit that works and the binding stage.
        PartitionError: the graph lacks costs, or the solver found no plan in time.
    """
    t_start = time.perf_counter()
    wall = time_limit if wall_limit is None else wall_limit
    _validate(num_stages, num_microbatches, schedule, memory_limit, optimizer_slots)
    if time_limit <= 0 or num_workers < 1:
        raise ConfigError(f"time_limit must be > 0 and num_workers >= 1, got {time_limit}, "
                          f"{num_workers}")
    gc = graph_costs(gm, cost_model)
    if not isinstance(num_stages, int) or not 1 <= num_stages <= gc.n:
        raise ConfigError(
            f"num_stages={num_stages} must be between 1 and the number of compute nodes in the "
            f"graph ({gc.n}); use fewer stages")
    d = num_stages
    opts = dict(num_microbatches=num_microbatches, schedule=schedule, memory_limit=memory_limit,
                optimizer_slots=optimizer_slots)
    if memory_limit is not None:
        cheap = memory_lower_bound(gc, num_stages=d, num_microbatches=num_microbatches,
                                   schedule=schedule, optimizer_slots=optimizer_slots,
                                   recompute=recompute)
        if cheap > memory_limit:
            _raise_infeasible(gc, cheap, None, None, d=d, recompute=recompute, **opts)

    trivial = trivial_lower_bound(gc, d, recompute)
    singletons = [[v] for v in range(gc.n)]
    ub_time = sum(2 * f + b for f, b in zip(gc.fwd, gc.bwd)) + sum(
        c * min(d, len(cs) + 1) for c, cs in zip(gc.comm, gc.consumers))
    scale = _TIME_UNITS / ub_time if ub_time > 0 else 1.0
    mk = dict(num_stages=d, num_microbatches=num_microbatches, schedule=schedule,
              memory_limit=memory_limit, optimizer_slots=optimizer_slots, recompute=recompute)

    # Exact DP over the graph order: a plan, an upper bound, and (on a chain) the optimum.
    fine_prob = build_problem(gc, singletons, time_scale=scale, **mk) if gc.n <= _FINE_DP_MAX \
        else None
    fine_dp = split_sequence(fine_prob) if fine_prob is not None else None
    fine_chain = fine_prob is not None and _is_chain(fine_prob)
    fine_stage = fine_dp.stage_of_block() if fine_dp is not None else None

    blocks = (coarsen_costs(gc, num_stages=d, stage_hint=fine_stage) if coarsen else singletons)
    if len(blocks) < d:
        blocks = singletons

    def attempt(blocks: list[list[int]], limit: float,
                incumbent: tuple[list[int], list[bool]] | None = None) -> tuple[
            BlockProblem, SplitResult | None, bool, _Solution]:
        exact = len(blocks) == gc.n
        prob = fine_prob if exact and fine_prob is not None else build_problem(
            gc, blocks, time_scale=scale, **mk)
        dp = fine_dp if prob is fine_prob else split_sequence(prob)
        chain = _is_chain(prob)
        hints: list[tuple[list[int], list[bool]]] = []
        if dp is not None:
            hints.append((dp.stage_of_block(), list(dp.recompute)))
        if fine_dp is not None and fine_stage is not None and prob is not fine_prob:
            hints.append(([fine_stage[vs[0]] for vs in blocks], list(fine_dp.recompute)))
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
        fb = [int(f) + int(b) + (int(f) if recompute is True else 0)
              for f, b in zip(prob.fwd, prob.bwd)]
        lb_int = max(-(-sum(fb) // d), max(fb, default=0), 0)
        if chain and dp is not None:
            lb_int = max(lb_int, int(round(dp.bottleneck)))   # the DP is exact on a chain
        if chain and dp is None:
            return prob, dp, chain, _Solution("INFEASIBLE", None, None, None, math.inf, 0.0, 0.0)
        ub_int = best_hint[2] if best_hint is not None else None
        if ub_int is not None and ub_int < lb_int:
            lb_int = ub_int
        sol = _solve(prob, objective="time", time_limit=limit, num_workers=num_workers,
                     lb=lb_int, ub=ub_int, hint=best_hint, wall_limit=wall_limit)
        return prob, dp, chain, sol

    coarsened = len(blocks) < gc.n
    prob, dp, chain, sol = attempt(blocks, time_limit)
    det_used = sol.deterministic
    if sol.block_stage is None and dp is None and fine_dp is None and coarsened:
        # Blocks may be what makes the limit infeasible: retry on single nodes.
        blocks = singletons
        coarsened = False
        prob, dp, chain, sol = attempt(blocks, time_limit)
        det_used += sol.deterministic

    candidates: list[tuple[str, dict[str, int], list[bool]]] = []
    if sol.block_stage is not None:
        candidates.append(("cp-sat", _assignment(gc, blocks, sol.block_stage),
                           list(sol.recompute or [])))
    if fine_dp is not None:
        candidates.append(("dp", _assignment(gc, singletons, fine_dp.stage_of_block()),
                           list(fine_dp.recompute)))
    if dp is not None and dp is not fine_dp:
        candidates.append(("dp-blocks", _assignment(gc, blocks, dp.stage_of_block()),
                           list(dp.recompute)))
    if not candidates:
        if sol.status == "INFEASIBLE":
            lb_mem, stage, found = _min_memory(gc, d=d, recompute=recompute, time_limit=min(
                time_limit, 5.0), num_workers=num_workers, **opts)
            _raise_infeasible(gc, max(lb_mem, memory_limit + 1 if memory_limit else 0), stage,
                              found, d=d, recompute=recompute, **opts)
        raise PartitionError(
            f"partition: CP-SAT found no plan for {d} stages in {time_limit} s (status "
            f"{sol.status}) and no contiguous split fits; raise time_limit or memory_limit")

    best: Plan | None = None
    source = ""
    for name, assign, flags in candidates:
        flags = _drop_needless_recompute(gm, cost_model, gc, assign, flags, recompute, opts)
        plan = plan_from_assignment(gm, cost_model, assign, flags, costs=gc, **opts)
        if best is None or plan.bottleneck < best.bottleneck * (1 - 1e-12):
            best, source = plan, name
    assert best is not None
    lower = max(trivial, articulation_lower_bound(gc, d, recompute, upper=best.bottleneck))
    # Refine: while the plan is more than 1% above the bound and half the budget is left,
    # re-coarsen twice as finely around the best plan's cuts (so it stays feasible and is
    # the hint) and solve again. The bottleneck can only go down. The budget is counted in
    # CP-SAT's deterministic time, not the wall clock, so the plan does not depend on the
    # machine's speed or load.
    det_budget = max(0.05, time_limit * _DET_PER_SECOND)

    def resolve(blocks: list[list[int]], incumbent: Plan) -> tuple[BlockProblem, _Solution, Plan | None]:
        """Solve on ``blocks`` with what is left of the budget, hinted by ``incumbent``; its plan or None."""
        nonlocal det_used
        where = incumbent.stage_of()
        hint = ([where[name] for name in gc.names], [st.recompute for st in incumbent.stages])
        rprob, _, _, rsol = attempt(blocks, max(0.5, (det_budget - det_used) / _DET_PER_SECOND), hint)
        det_used += rsol.deterministic
        if rsol.block_stage is None:
            return rprob, rsol, None
        assign = _assignment(gc, blocks, rsol.block_stage)
        flags = _drop_needless_recompute(gm, cost_model, gc, assign, list(rsol.recompute or []), recompute, opts)
        return rprob, rsol, plan_from_assignment(gm, cost_model, assign, flags, costs=gc, **opts)

    per_stage, first_blocks, refinements = 12, len(blocks), 0
    while (coarsened and best.bottleneck > lower * 1.01 and per_stage < _MAX_BLOCKS_PER_STAGE
           and det_used < 0.5 * det_budget
           and time.perf_counter() - t_start < wall):    # safety on an overloaded machine
        per_stage *= 2
        refinements += 1
        where = best.stage_of()
        incumbent_stage = [where[name] for name in gc.names]
        finer = coarsen_costs(gc, num_stages=d, blocks_per_stage=per_stage, stage_hint=incumbent_stage)
        if len(finer) <= len(blocks) or len(finer) > _MAX_REFINED_BLOCKS:
            break
        blocks = finer
        coarsened = len(blocks) < gc.n
        prob, sol, plan = resolve(blocks, best)
        if plan is None:
            break
        if plan.bottleneck < best.bottleneck * (1 - 1e-12):
            best, source = plan, "cp-sat"
            lower = max(lower, articulation_lower_bound(gc, d, recompute, upper=best.bottleneck))
    # Prove (or tighten) on the uncoarsened model when it is small enough: the articulation
    # bound ignores memory, so under a binding limit the last percent is often the bound's.
    fine_proof = False
    if (coarsened and best.bottleneck > lower * 1.01 and gc.n * (d - 1) <= _FINE_PROOF_MAX_VARS
            and det_used < det_budget and time.perf_counter() - t_start < wall):
        fprob, fsol, plan = resolve(singletons, best)
        if fsol.status in ("OPTIMAL", "FEASIBLE") and plan is not None:
            fine_proof = True
            prob, sol, blocks, coarsened = fprob, fsol, singletons, False
            if plan.bottleneck < best.bottleneck * (1 - 1e-12):
                best, source = plan, "cp-sat"
    exact_model = not coarsened
    slack = (2 * gc.n + len(prob.values)) / scale    # rounding of the integer times
    if exact_model and sol.status in ("OPTIMAL", "FEASIBLE"):
        lower = max(lower, sol.bound / scale - slack)
    if fine_chain and fine_dp is not None:
        lower = max(lower, fine_dp.bottleneck / scale - slack)
    optimal = (exact_model and sol.status == "OPTIMAL") or (fine_chain and fine_dp is not None)
    solver_gap = 0.0
    if sol.objective:
        solver_gap = max(0.0, (sol.objective - sol.bound) / sol.objective)
    extra = {
        "status": sol.status, "solver_bound": sol.bound / scale, "solver_gap": solver_gap,
        "blocks": len(blocks), "nodes": gc.n, "coarsened": coarsened,
        "dp_bottleneck": (fine_dp.bottleneck / scale) if fine_dp is not None else None,
        "wall_time": sol.wall, "deterministic_time": sol.deterministic, "source": source,
        "chain": fine_chain, "first_blocks": first_blocks, "refinements": refinements,
        "fine_proof": fine_proof,
    }
    return plan_from_assignment(
        gm, cost_model, best.stage_of(), [st.recompute for st in best.stages], costs=gc,
        solver="cp-sat", solve_time=time.perf_counter() - t_start,
        lower_bound=lower, optimal=optimal, extra=extra, **opts)


def _drop_needless_recompute(gm: torch.fx.GraphModule, cost_model: CostModel, gc: GraphCosts,
                             assign: dict[str, int], flags: list[bool], recompute: bool | None,
                             opts: dict[str, Any]) -> list[bool]:
    """Turn r_s off where the stage fits without recomputation (never slower)."""
    if recompute is not None or not any(flags):
        return flags
    plan = plan_from_assignment(gm, cost_model, assign, flags, costs=gc, **opts)
    limit = opts["memory_limit"]
    ctx = CostContext(schedule=opts["schedule"], num_stages=len(flags),
                      num_microbatches=opts["num_microbatches"],
                      optimizer_slots=opts["optimizer_slots"])
    out = list(flags)
    for st in plan.stages:
        if st.recompute:
            mem = StageFigures.of_stage(st).memory(ctx, False)
            if limit is None or mem <= limit:
                out[st.index] = False
    return out


def _min_memory(gc: GraphCosts, *, d: int, recompute: bool | None, time_limit: float,
                num_workers: int, num_microbatches: int, schedule: str,
                memory_limit: int | None, optimizer_slots: int) -> tuple[int, int | None, int | None]:
    """(lower bound on min max_s M_s, binding stage of the best plan found, its max M_s)."""
    cheap = memory_lower_bound(gc, num_stages=d, num_microbatches=num_microbatches,
                               schedule=schedule, optimizer_slots=optimizer_slots,
                               recompute=recompute)
    prob = build_problem(gc, [[v] for v in range(gc.n)], num_stages=d,
                         num_microbatches=num_microbatches, schedule=schedule, memory_limit=None,
                         optimizer_slots=optimizer_slots, recompute=recompute, time_scale=1.0)
    sol = _solve(prob, objective="memory", time_limit=time_limit, num_workers=num_workers)
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


def _raise_infeasible(gc: GraphCosts, bound: int, stage: int | None, found: int | None, *, d: int,
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
