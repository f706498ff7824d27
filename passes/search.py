"""Depth × width search (PipeDream-2BW's planner, Algorithm 1): pick d, w, b, m for N devices.

For N devices and a global batch B, every candidate is a pipeline of depth d
dividing N replicated w = N / d times (data parallel), a microbatch size b (a power of two
dividing B / w) and m = B / (w·b) microbatches per batch (2bw needs m >= d)::

    N = 8, B = 64          d=1 w=8   b ∈ {1,2,4,8}          m = 8/b
                           d=2 w=4   b ∈ {1,2,4,8,16}       m = 16/b   (2bw: m >= 2)
                           d=4 w=2   ...                    d=8 w=1 ...

Each candidate is cut by :func:`~fxpipe.passes.partition.partition` on the graph
traced at microbatch size b and priced by ``price(plan, w)`` (seconds per batch;
default :func:`batch_time`: the schedule on the event-driven simulator with the
data-parallel all-reduce on each stage's update lane). gpipe runs as PipeDream-2BW's
paper ran it: as many microbatches per flush as fit (m, m/2, ...), several flushes
per optimizer step.
Throughput = B / t samples per second.

Every candidate ends with one outcome, recorded in ``extra["search"]["candidates"]``::

    solved       partitioned and priced (the ILP's cut, or equal blocks when those simulate faster)
    infeasible   proven not to fit memory_limit (lower bound, or the partitioner's proof)
    pruned       its optimistic throughput B / (m · max(ΣT/d, max node)) cannot beat the incumbent
    gave up      the partitioner found no plan in its share (the reason is recorded), or the
                 search's time_limit ran out before the candidate's turn (tracing included)

so one hard candidate never aborts the search. Candidates are visited best-first
by their optimistic throughput. Each gets the same CP-SAT share, counted in
CP-SAT's deterministic time, so the answer does not depend on the machine's load;
the wall clock only decides when the whole search must stop (then the remaining
candidates are "gave up" and say so). Ties go to the smaller d, then the larger
b, so the answer is deterministic (the partitioner is too).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import torch.fx

from fxpipe.errors import ConfigError, FxpipeError, InfeasibleMemoryError, PartitionError
from fxpipe.ir import SCHEDULES, CostModel, Plan

from .coarsen import graph_costs
from .equal_blocks import equal_block_plan
from .partition import memory_lower_bound, partition, trivial_lower_bound

__all__ = ["search_depth_width", "batch_time", "allreduce_time", "microbatch_candidates", "flush_sizes", "SOLVED",
           "INFEASIBLE", "PRUNED", "GAVE_UP"]

GraphFor = Callable[[int], "tuple[torch.fx.GraphModule, CostModel]"]
Price = Callable[[Plan, int, CostModel], "tuple[float, float]"]

SOLVED, INFEASIBLE, PRUNED, GAVE_UP = "solved", "infeasible", "pruned", "gave up"

_MAX_MICROBATCH = 64          # default cap on b
_MIN_CANDIDATE_TIME = 0.25    # seconds of solver time each candidate gets at least
_SOLVE_SHARE = 0.6            # of time_limit for solving; the rest covers tracing and pricing
_MARGIN = 0.02                # of time_limit kept back from every wall-clock estimate (their error)


def microbatch_candidates(per_replica: int, cap: int = _MAX_MICROBATCH,
                          allowed: Sequence[int] | None = None) -> list[int]:
    """Powers of two b <= cap dividing ``per_replica`` (or the allowed sizes that divide it)."""
    if allowed is not None:
        return sorted({int(b) for b in allowed if b >= 1 and per_replica % b == 0})
    out, b = [], 1
    while b <= min(per_replica, cap):
        if per_replica % b == 0:
            out.append(b)
        b *= 2
    return out


def allreduce_time(param_bytes: int, width: int, cost_model: CostModel,
                   bandwidth: float | None = None) -> float:
    """Seconds of a ring all-reduce of ``param_bytes`` among ``width`` replicas (0 when w = 1)."""
    if width <= 1 or param_bytes <= 0:
        return 0.0
    if bandwidth is not None:
        return 2.0 * (width - 1) / width * param_bytes / bandwidth
    return 2.0 * (width - 1) * float(cost_model.comm_time(int(math.ceil(param_bytes / width))))


def batch_time(plan: Plan, *, width: int, cost_model: CostModel,
               allreduce_bandwidth: float | None = None) -> tuple[float, float]:
    """(seconds per batch, exposed all-reduce seconds) of ``plan`` replicated ``width`` times.

    The plan's schedule runs on :func:`fxpipe.runtime.simulate.steady_batch_time` with each
    stage's F_s, B_s, transfers (each producer -> consumer pair on its own link), and its ring
    all-reduce (:func:`allreduce_time` of P_s) on the update lane: 2bw hides it behind the next
    batch, flush and gpipe wait for it.
    A gpipe plan with ``extra["microbatches_per_flush"] = g`` runs m / g flushes per batch.
    """
    from fxpipe.runtime.simulate import steady_batch_time

    ar = [allreduce_time(st.param_bytes, width, cost_model, allreduce_bandwidth) for st in plan.stages]
    return steady_batch_time(plan, ar if width > 1 else None,
                             microbatches_per_flush=plan.extra.get("microbatches_per_flush"))


def flush_sizes(m: int) -> list[int]:
    """gpipe's candidate microbatches per flush, largest first: m, then halvings that divide m."""
    out, g = [m], m
    while g % 2 == 0 and g > 1:
        g //= 2
        out.append(g)
    return out


def _better(thr: float, d: int, b: int, thr0: float, d0: int, b0: int) -> bool:
    """Higher throughput wins; within 1e-9 relative, the smaller d, then the larger b."""
    if thr > thr0 * (1 + 1e-9):
        return True
    if thr < thr0 * (1 - 1e-9):
        return False
    return (d, -b) < (d0, -b0)


def _check(num_devices: Any, global_batch: Any, schedule: str, time_limit: Any) -> None:
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ConfigError(f"num_devices must be an int >= 1, got {num_devices!r}")
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ConfigError(f"global_batch must be an int >= 1, got {global_batch!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not isinstance(time_limit, (int, float)) or not time_limit > 0:
        raise ConfigError(f"time_limit must be > 0 seconds, got {time_limit!r}")


def _enumerate(num_devices: int, global_batch: int, schedule: str, max_depth: int,
               microbatch_sizes: Sequence[int] | None, all_depths: bool = False) -> list[tuple[int, int, int, int]]:
    cands: list[tuple[int, int, int, int]] = []
    for d in range(1, min(num_devices, max_depth) + 1):
        if not all_depths and num_devices % d:
            continue
        w = num_devices // d
        if global_batch % w:
            continue
        for b in microbatch_candidates(global_batch // w, allowed=microbatch_sizes):
            m = global_batch // (w * b)
            if schedule == "2bw" and m < d:
                continue
            cands.append((d, w, b, m))
    if not cands:
        raise ConfigError(
            f"no (depth, width, microbatch) fits num_devices={num_devices}, global_batch="
            f"{global_batch} and schedule={schedule!r}"
            + (f" with microbatch_sizes={list(microbatch_sizes)}" if microbatch_sizes else "")
            + "; use a global batch that is a multiple of the device count, or schedule='flush'")
    return cands


def _priced(plan: Plan, w: int, cm: CostModel, topology: Any, price: Price) -> tuple[float, float, Any]:
    """(seconds per batch, exposed all-reduce, placement or None) under the topology or ``price``."""
    if topology is not None:
        return topology.price(plan, w)
    t, exposed = price(plan, w, cm)
    return t, exposed, None


def _solve(gm: torch.fx.GraphModule, cm: CostModel, gc: Any, *, d: int, m: int, schedule: str,
           memory_limit: int | None, optimizer_slots: int, recompute: bool | None, time_limit: float,
           num_workers: int, wall_limit: float | None = None) -> tuple[Plan, int | None]:
    """Partition one candidate; gpipe tries g = m, m/2, ... microbatches per flush until one fits.

    Returns the plan (num_microbatches = m) and g (None unless gpipe).

    Raises:
        InfeasibleMemoryError: not even the smallest g fits; PartitionError as :func:`partition`.
    """
    sizes = flush_sizes(m) if schedule == "gpipe" else [m]
    last: InfeasibleMemoryError | None = None
    for g in sizes:
        if memory_limit is not None and len(sizes) > 1 and memory_lower_bound(
                gc, num_stages=d, num_microbatches=g, schedule=schedule, optimizer_slots=optimizer_slots,
                recompute=recompute) > memory_limit:
            continue
        try:
            plan = partition(gm, cm, num_stages=d, num_microbatches=g, schedule=schedule,
                             memory_limit=memory_limit, optimizer_slots=optimizer_slots,
                             recompute=recompute, time_limit=time_limit, num_workers=num_workers,
                             wall_limit=wall_limit)
        except InfeasibleMemoryError as e:
            last = e
            continue
        if schedule != "gpipe":
            return plan, None
        extra = {**plan.extra, "microbatches_per_flush": g}
        return dataclasses.replace(plan, num_microbatches=m, extra=extra), g
    if last is not None:
        raise last
    raise InfeasibleMemoryError(f"no microbatches-per-flush in {sizes} fits memory_limit={memory_limit} bytes "
                                f"at depth {d}", memory_limit=memory_limit, min_feasible=None)


def search_depth_width(graph_for: GraphFor, *, num_devices: int, global_batch: int,
                       schedule: str = "2bw", memory_limit: int | None = None,
                       optimizer_slots: int = 0, microbatch_sizes: Sequence[int] | None = None,
                       time_limit: float = 10.0, allreduce_bandwidth: float | None = None,
                       recompute: bool | None = None, num_workers: int = 2,
                       price: Price | None = None, topology: Any = None, all_depths: bool = False) -> Plan:
    """Best pipeline depth d, width w, microbatch size b and count m for ``num_devices`` devices.

    Args:
        graph_for: ``graph_for(b) -> (gm, cost_model)``, the annotated graph traced at
            microbatch size b (called once per distinct b; results are cached here).
        num_devices: N; candidates are the depths d dividing N with w = N / d (as the paper's planner),
            or with ``all_depths`` every d with w = N // d (d·w <= N devices).
        global_batch: B, samples per optimizer step over all replicas.
        schedule: "2bw" | "flush" | "gpipe".
        memory_limit: bytes per device, or None.
        optimizer_slots: k, optimizer state tensors per parameter.
        microbatch_sizes: the b to try (each must divide B / w); default powers of two up to 64.
        time_limit: seconds for the whole search, tracing included. Each candidate gets an equal,
            fixed CP-SAT share (at least 0.25 s) of 60% of it; a candidate whose turn comes after
            the limit is recorded as given up (except the best-first one: there is always an answer).
            A candidate starts only if its solve (the slowest so far), its pricing (the slowest at its
            depth, or the deepest shallower one scaled by depth squared) and 2% of the limit still fit.
        allreduce_bandwidth: bytes/s of the data-parallel ring; None prices it with
            ``cost_model.comm_time``.
        recompute: passed to :func:`partition` (None: chosen per stage).
        num_workers: CP-SAT workers.
        price: ``price(plan, w, cost_model) -> (seconds per batch, exposed all-reduce seconds)``;
            default :func:`batch_time` with ``allreduce_bandwidth``.
        topology: a :class:`~fxpipe.cost_models.topology.Topology`: transfers and all-reduces
            priced by where the ranks sit, each candidate under its faster placement (recorded
            in the row and as ``extra["placement"]``). Overrides ``price``.

    Returns:
        The best Plan, with ``data_parallel=w``, ``microbatch_size=b``,
        ``num_microbatches=m`` and ``extra["search"]``: the candidates table (one dict
        per candidate: d, w, b, m, recompute, samples_per_s, fits, status, reason), the
        chosen throughput, batch time and exposed all-reduce time, and the seconds spent
        tracing, solving and in all.

    Raises:
        ConfigError: bad N, B or schedule, or no candidate exists (e.g. B < N·... with 2bw).
        InfeasibleMemoryError: no candidate fits ``memory_limit``; the message gives the
            smallest per-device memory seen and the way out.
        PartitionError: no candidate was solved and some were given up (the message says why).
    """
    t_start = time.perf_counter()
    deadline = t_start + float(time_limit)
    _check(num_devices, global_batch, schedule, time_limit)
    if price is None:
        def price(plan: Plan, w: int, cm: CostModel) -> tuple[float, float]:
            return batch_time(plan, width=w, cost_model=cm, allreduce_bandwidth=allreduce_bandwidth)

    cache: dict[int, tuple[torch.fx.GraphModule, CostModel, Any]] = {}
    timing = {"trace": 0.0, "solve": 0.0, "longest_trace": 0.0, "longest_solve": 0.0}
    # Longest pricing seen (the simulator: the ILP cut, equal blocks, both placements) per depth. A deeper
    # candidate's pricing takes longer than any before it (GPT-3.8B, B=2048: 0.63 s at d=16, 1.6 s at d=32),
    # so a depth not seen yet is estimated from the deepest shallower one, scaled by (d / d')^2.
    priced_at: dict[str, dict[int, float]] = {"all": {}, "eq": {}}
    margin = _MARGIN * float(time_limit)

    def pricing(d: int, part: str = "all") -> float:
        seen = priced_at[part]
        if d in seen:
            return seen[d]
        below = [k for k in seen if k < d]
        if below:
            k = max(below)
            return seen[k] * (d / k) ** 2
        return seen[min(seen)] if seen else 0.0

    def record(part: str, d: int, took: float) -> None:
        priced_at[part][d] = max(priced_at[part].get(d, 0.0), took)

    def graph(b: int) -> tuple[torch.fx.GraphModule, CostModel, Any]:
        if b not in cache:
            t0 = time.perf_counter()
            gm, cm = graph_for(b)
            cache[b] = (gm, cm, graph_costs(gm, cm))
            took = time.perf_counter() - t0
            timing["trace"] += took
            timing["longest_trace"] = max(timing["longest_trace"], took)
        return cache[b]

    units: dict[int, Any] = {}

    def units_of(b: int) -> Any:
        if b not in units:
            from .baselines import layer_units

            units[b] = layer_units(cache[b][0], cache[b][2])
        return units[b]

    # Enumerate (d, w, b, m); the graph size caps d.
    n_nodes = graph(1 if microbatch_sizes is None else min(microbatch_sizes))[2].n
    cands = _enumerate(num_devices, global_batch, schedule, n_nodes, microbatch_sizes, all_depths)
    rec_label = "per stage" if recompute is None else ("all" if recompute else "none")
    rows: list[dict[str, Any]] = []
    order: list[tuple[float, int, int, int, int, dict[str, Any]]] = []
    for d, w, b, m in cands:
        row: dict[str, Any] = {"d": d, "w": w, "b": b, "m": m, "recompute": rec_label,
                               "samples_per_s": None, "fits": None, "status": "", "reason": ""}
        rows.append(row)
        if b not in cache and time.perf_counter() + timing["longest_trace"] > deadline:
            row.update(status=GAVE_UP, reason=f"time_limit={time_limit} s ran out before tracing b={b}")
            continue
        try:
            gc = graph(b)[2]
        except FxpipeError as e:
            row.update(status=GAVE_UP, reason=f"tracing at b={b} failed: {e}")
            continue
        lb = trivial_lower_bound(gc, d, recompute)
        steps = m if schedule == "2bw" else m + d - 1
        row["optimistic_samples_per_s"] = global_batch / (steps * lb) if lb > 0 else math.inf
        order.append((row["optimistic_samples_per_s"], d, w, b, m, row))
    order.sort(key=lambda c: (-c[0], c[1], -c[3]))
    per = max(_MIN_CANDIDATE_TIME, _SOLVE_SHARE * time_limit / max(1, len(order)))

    best: tuple[float, int, int, Plan, dict[str, Any]] | None = None    # (thr, d, -b, plan, row)
    min_memory: int | None = None
    for ub, d, w, b, m, row in order:
        if best is not None and ub <= best[0] * (1 + 1e-12):
            row.update(status=PRUNED, reason=f"optimistic {ub:.4g} samples/s <= incumbent {best[0]:.4g}")
            continue
        gm, cm, gc = graph(b)
        if memory_limit is not None:
            fewest = min(flush_sizes(m)) if schedule == "gpipe" else m
            need = memory_lower_bound(gc, num_stages=d, num_microbatches=fewest, schedule=schedule,
                                      optimizer_slots=optimizer_slots, recompute=recompute)
            if need > memory_limit:
                row.update(fits=False, status=INFEASIBLE, reason=f"needs >= {need} B per device")
                min_memory = need if min_memory is None else min(min_memory, need)
                continue
        if best is not None and time.perf_counter() + max(per, timing["longest_solve"]) + pricing(d) + margin \
                > deadline:
            # (the first one always runs; a candidate takes about as long as the slowest so far, pricing included)
            row.update(status=GAVE_UP, reason=f"time_limit={time_limit} s ran out before its turn")
            continue
        t0 = time.perf_counter()
        base = cm
        if topology is not None:   # C_s: each boundary by its own link where the stages will likely sit
            cm = topology.linked(cm, topology.likely_placement(d, w))
        try:
            plan, g = _solve(gm, cm, gc, d=d, m=m, schedule=schedule, memory_limit=memory_limit,
                             optimizer_slots=optimizer_slots, recompute=recompute, time_limit=per,
                             num_workers=num_workers,
                             # wall clock up to the search's deadline less its pricing (at least the share):
                             # CP-SAT's deterministic time decides unless the machine slows past the deadline
                             wall_limit=max(per, deadline - time.perf_counter() - pricing(d) - margin))
            if g is not None:
                row["microbatches_per_flush"] = g
        except InfeasibleMemoryError as e:
            row.update(fits=False, status=INFEASIBLE, reason="over memory"
                       + (f" (needs >= {e.min_feasible} B)" if e.min_feasible is not None else ""))
            if e.min_feasible is not None:
                min_memory = e.min_feasible if min_memory is None else min(min_memory, e.min_feasible)
            continue
        except PartitionError as e:
            row.update(status=GAVE_UP, reason=f"partition found no plan in {per:.3g} s: {e}")
            continue
        finally:
            timing["solve"] += time.perf_counter() - t0
            timing["longest_solve"] = max(timing["longest_solve"], time.perf_counter() - t0)
        t_price = time.perf_counter()
        t_batch, exposed, where = _priced(plan, w, cm, topology, price)
        row["cut"] = "ilp"
        if schedule != "gpipe" and time.perf_counter() + pricing(d, "eq") + margin < deadline:
            # The ILP minimises max_s T_s with C_s added to each stage's time; the simulator overlaps
            # transfers with compute, so a stage without inputs (C_0 = 0) is handed more compute than the
            # simulator can hide. Equal blocks (the paper's cut) at the same (d, w, b) are priced too and
            # win when faster under the simulator: the search never loses to the paper's planner there.
            gc_links = graph_costs(gm, cm) if cm is not base else gc    # C_s as the ILP priced them
            t_eq0 = time.perf_counter()
            eq, _ = equal_block_plan(gm, cm, gc_links, units_of(b), num_stages=d, num_microbatches=m, schedule=schedule,
                                     memory_limit=memory_limit, optimizer_slots=optimizer_slots,
                                     recompute=(False, True) if recompute is None else (bool(recompute),))
            if eq is not None:
                t_eq, exposed_eq, where_eq = _priced(eq, w, cm, topology, price)
            record("eq", d, time.perf_counter() - t_eq0)
            if eq is not None:
                row["ilp_samples_per_s"] = global_batch / t_batch if t_batch > 0 else math.inf
                if t_eq < t_batch * (1 - 1e-9):
                    plan, t_batch, exposed, where = eq, t_eq, exposed_eq, where_eq
                    row["cut"] = "equal blocks"
        record("all", d, time.perf_counter() - t_price)
        if where is not None:
            row["placement"] = where["order"]
            plan = dataclasses.replace(plan, extra={**plan.extra, "placement": where})
        thr = global_batch / t_batch if t_batch > 0 else math.inf
        row.update(samples_per_s=thr, fits=True, status=SOLVED, batch_time=t_batch,
                   allreduce_exposed=exposed, bottleneck=plan.bottleneck, gap=plan.gap)
        if best is None or _better(thr, d, b, best[0], best[1], -best[2]):
            best = (thr, d, -b, plan, row)

    if best is None:
        gave_up = [r for r in rows if r["status"] == GAVE_UP]
        if gave_up:
            raise PartitionError(
                f"search_depth_width: no (depth, width, microbatch) candidate for num_devices={num_devices}, "
                f"global_batch={global_batch} was solved: {len(gave_up)} given up (first: d={gave_up[0]['d']} "
                f"b={gave_up[0]['b']}: {gave_up[0]['reason']}), {len(rows) - len(gave_up)} over memory; "
                "raise time_limit or memory_limit")
        seen = f"{min_memory} bytes" if min_memory is not None else "more than the limit"
        raise InfeasibleMemoryError(
            f"search_depth_width: no (depth, width, microbatch) for num_devices={num_devices}, "
            f"global_batch={global_batch} fits memory_limit={memory_limit} bytes ({schedule}, "
            f"k={optimizer_slots} optimizer slots); the smallest per-device memory seen is {seen}. "
            f"Raise memory_limit to at least {seen}, add devices (deeper pipelines hold fewer "
            f"parameters per device), use an optimizer with fewer slots, or allow recompute",
            memory_limit=memory_limit, min_feasible=min_memory)
    thr, d, neg_b, plan, row = best
    row["chosen"] = True
    w, b, m = row["w"], row["b"], row["m"]
    extra = dict(plan.extra)
    total = time.perf_counter() - t_start
    extra["search"] = {
        "num_devices": num_devices, "global_batch": global_batch,
        "samples_per_s": thr, "batch_time": row["batch_time"],
        "allreduce_exposed": row["allreduce_exposed"],
        "candidates": sorted(rows, key=lambda r: (r["d"], r["b"])),
        "counts": {s: sum(1 for r in rows if r["status"] == s) for s in (SOLVED, INFEASIBLE, PRUNED, GAVE_UP)},
        "candidate_time_limit": per, "trace_time": timing["trace"], "solve_time": timing["solve"],
        "search_time": total, "time_limit": float(time_limit),
    }
    return dataclasses.replace(plan, data_parallel=w, microbatch_size=b, num_microbatches=m,
                               solve_time=total, extra=extra)
