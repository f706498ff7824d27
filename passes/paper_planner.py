"""PipeDream-2BW's own planner as a baseline: equal blocks, the paper's (w, d, b, r) enumeration and throughput.

The paper (Narayanan et al., ICML 2021, §3.3 and Appendix A) plans repetitive models
(transformers): a pipeline of depth d takes L/d of the L identical blocks per
stage (the embedding joins the first stage, the head the last), and the planner
enumerates every width w = N / d, microbatch size b and recompute setting r ∈
{all stages, none}, keeps the configurations that fit the device memory and picks
the highest throughput by its cost model. The formulas below are written from the
paper's text as we read it (its appendix could not be consulted when this was
written), in fxpipe's symbols::

    T_s     = F_s(b) + B_s(b) + r·F_s(b) + C_s(b)        one microbatch on stage s (C_s: 2·X_s / link)
    AR_s    = 2 (w - 1) / w · G_s / bandwidth            ring all-reduce of stage s's gradients G_s
    2bw     t = max(m · max_s T_s, max_s AR_s)           no flush; the all-reduce overlaps the next batch
    flush   t = (m + d - 1) · max_s T_s + max_s AR_s     fill and drain, then the all-reduce
    gpipe   t = (m / g) (g + d - 1) · max_s T_s + max_s AR_s     g microbatches per flush
    throughput = B / t,   m = B / (w·b)

Memory is checked with fxpipe's own evaluator (:func:`~fxpipe.passes.partition.plan_from_assignment`),
so the baseline and fxpipe's ILP are held to the same limit. The answer is the same
:class:`~fxpipe.ir.Plan` type, with ``solver="paper"`` and the table in ``extra["paper"]``.

Worked example: 4 identical blocks of F = 1, B = 2 (no transfers, no parameters) on
N = 4 devices, B = 8, b = 1: d = 4 → w = 1, m = 8, T = 3, t = 8·3 = 24, 1/3 sample/s;
d = 1 → w = 4, m = 2, T = 12, t = 24; ties go to the smaller d.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import torch.fx

from fxpipe.errors import ConfigError, PartitionError
from fxpipe.ir import SCHEDULES, CostModel, Plan

from .baselines import LayerUnit, layer_units
from .coarsen import graph_costs
from .equal_blocks import equal_block_plan, equal_blocks
from .search import _enumerate, flush_sizes

__all__ = ["equal_blocks", "equal_block_plan", "paper_batch_time", "paper_plan"]

GraphFor = Callable[[int], "tuple[torch.fx.GraphModule, CostModel]"]
AllReduce = Callable[[Plan, int], Sequence[float]]


def paper_batch_time(plan: Plan, allreduce: Sequence[float] = (), *,
                     microbatches_per_flush: int | None = None) -> float:
    """Seconds per batch by the paper's formula (module docstring) for ``plan.schedule``."""
    m, d = plan.num_microbatches, plan.num_stages
    t_max = max(st.fwd_time + st.bwd_time + (st.fwd_time if st.recompute else 0.0) + st.comm_time
                for st in plan.stages)
    ar = max(allreduce, default=0.0)
    if plan.schedule == "2bw":
        return max(m * t_max, ar)
    if plan.schedule == "flush":
        return (m + d - 1) * t_max + ar
    g = microbatches_per_flush or m
    return math.ceil(m / g) * (g + d - 1) * t_max + ar


def paper_plan(graph_for: GraphFor, *, num_devices: int, global_batch: int, schedule: str = "2bw",
               memory_limit: int | None = None, optimizer_slots: int = 0,
               microbatch_sizes: Sequence[int] | None = None,
               allreduce: AllReduce | None = None, topology: Any = None,
               config: tuple[int, int, int] | None = None, one_flush: bool = False,
               recompute: bool | None = None) -> Plan:
    """The paper's planner: best (d, w, b, r) with equal blocks by the paper's throughput formula.

    Args:
        graph_for: ``graph_for(b) -> (gm, cost_model)``, the annotated graph at microbatch size b.
        num_devices: N; depths d dividing N (w = N / d) whose blocks split among d stages.
        global_batch: B.
        schedule: "2bw" | "flush" | "gpipe" (gpipe: as many microbatches per flush as fit).
        memory_limit: bytes per device, or None.
        optimizer_slots: k.
        microbatch_sizes: the b to try (default powers of two up to 64 dividing B / w).
        allreduce: ``allreduce(plan, w) -> seconds per stage``; default: by ``topology`` under its likely
            placement, or none (w = 1 is free, and the caller prices replicas).
        topology: a :class:`~fxpipe.cost_models.topology.Topology`: C_s priced as the search prices it
            (:meth:`~fxpipe.cost_models.topology.Topology.linked` at the likely placement: each boundary
            by the link it crosses) instead of the cost model's NVLink ``comm_time`` everywhere.
        config: only this (d, w, b) is tried (e.g. another schedule's pick, to compare schedules
            on one configuration).
        one_flush: gpipe only: every microbatch of the batch in one flush, as the paper's own code
            runs GPipe (msr-fiddle/pipedream's Megatron fork: ``--gpipe`` makes all m microbatches
            warm-up forwards), instead of as many per flush as fit memory.
        recompute: None tries all stages and none (the paper's enumeration); True or False only that.

    Returns:
        The best Plan (``solver="paper"``, ``data_parallel=w``, ``microbatch_size=b``,
        ``num_microbatches=m``); ``extra["paper"]`` holds every candidate with its throughput.

    Raises:
        ConfigError: bad arguments; InfeasibleMemoryError-like PartitionError when nothing fits.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not isinstance(num_devices, int) or num_devices < 1 or not isinstance(global_batch, int) or global_batch < 1:
        raise ConfigError(f"num_devices and global_batch must be ints >= 1, got {num_devices!r}, {global_batch!r}")
    t0 = time.perf_counter()
    cache: dict[int, tuple[Any, Any, Any, list[LayerUnit]]] = {}

    def graph(b: int) -> tuple[Any, Any, Any, list[LayerUnit]]:
        if b not in cache:
            gm, cm = graph_for(b)
            gc = graph_costs(gm, cm)
            cache[b] = (gm, cm, gc, layer_units(gm, gc))
        return cache[b]

    if allreduce is None and topology is not None:
        def allreduce(plan: Plan, w: int) -> list[float]:
            return [topology.planning_allreduce(st.param_bytes, plan.num_stages, w, st.index) for st in plan.stages]

    try:
        cands = _enumerate(num_devices, global_batch, schedule, num_devices, microbatch_sizes)
    except ConfigError:
        cands = []           # nothing to try: the error below says so, as before
    rows: list[dict[str, Any]] = []
    best: tuple[float, int, int, Plan] | None = None
    if config is not None:
        cands = [c for c in cands if c[:3] == tuple(config)]
    for d, w, b, m in cands:
        gm, cm, gc, units = graph(b)
        if topology is not None:   # the GraphCosts hold C_s: price them again with each boundary's own link
            linked = topology.linked(cm, topology.likely_placement(d, w))
            cm, gc = (linked, graph_costs(gm, linked)) if linked is not cm else (cm, gc)
        for r in ((False, True) if recompute is None else (bool(recompute),)):
            row: dict[str, Any] = {"d": d, "w": w, "b": b, "m": m, "recompute": "all" if r else "none",
                                   "samples_per_s": None, "fits": False}
            plan, g, seen = None, None, None
            for g in (flush_sizes(m) if schedule == "gpipe" and not one_flush else [m]):
                cand, seen = equal_block_plan(gm, cm, gc, units, num_stages=d, num_microbatches=g,
                                              schedule=schedule, memory_limit=memory_limit,
                                              optimizer_slots=optimizer_slots, recompute=(r,))
                if cand is not None:
                    plan = dataclasses.replace(cand, num_microbatches=m)
                    break
            if plan is None and seen is None:
                break                             # d does not divide into equal blocks: next (d, b)
            rows.append(row)
            if plan is None:
                row["memory"] = seen
                continue
            ar = list(allreduce(plan, w)) if allreduce is not None and w > 1 else []
            t = paper_batch_time(plan, ar, microbatches_per_flush=g if schedule == "gpipe" else None)
            thr = global_batch / t if t > 0 else math.inf
            row.update(samples_per_s=thr, fits=True, batch_time=t, memory=max(s.memory for s in plan.stages),
                       **({"microbatches_per_flush": g} if schedule == "gpipe" else {}))
            extra = {**plan.extra, **({"microbatches_per_flush": g} if schedule == "gpipe" else {})}
            plan = dataclasses.replace(plan, data_parallel=w, microbatch_size=b, extra=extra)
            if best is None or thr > best[0] * (1 + 1e-9) or (
                    thr >= best[0] * (1 - 1e-9) and (d, -b) < (best[1], -best[2])):
                best = (thr, d, b, plan)
    if best is None:
        raise PartitionError(f"paper planner: no equal-block (depth, width, microbatch, recompute) for "
                             f"num_devices={num_devices}, global_batch={global_batch} fits memory_limit="
                             f"{memory_limit} bytes ({len(rows)} tried); raise memory_limit or add devices")
    thr, d, b, plan = best
    chosen = next(r for r in rows if r["fits"] and r["d"] == d and r["b"] == b
                  and r["recompute"] == ("all" if plan.stages[0].recompute else "none"))
    chosen["chosen"] = True
    extra = dict(plan.extra)
    extra["paper"] = {"samples_per_s": thr, "batch_time": chosen["batch_time"], "candidates": rows,
                      "search_time": time.perf_counter() - t0}
    return dataclasses.replace(plan, solve_time=time.perf_counter() - t0, extra=extra)
