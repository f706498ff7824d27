"""Baseline planners (uniform blocks, by parameters, by time) returning the same Plan type.

They cut the graph order into contiguous stages; none of them looks at
communication or memory while cutting. Each then picks r_s per stage (recompute
only where the stage would not fit otherwise, unless forced) and reports a stage
over the limit as ``plan.extra["over_memory"] = True`` instead of raising.

    uniform     the paper's planner: equal numbers of repeated blocks (e.g. transformer
                layers from nn_module_stack) per stage; embeddings go to the first stage,
                the head to the last.   48 layers, d=4:  [emb 0-11][12-23][24-35][36-47 head]
    parameters  DeepSpeed partition_method="parameters": balance parameter bytes
    time        torchgpipe balance_by_time: Barany et al.'s block-partition heuristic on F+B
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Sequence

import torch.fx

from fxpipe.cost_models.memory import stage_memory
from fxpipe.errors import ConfigError, PartitionError
from fxpipe.ir import CostModel, Plan

from .coarsen import COMPUTE_OPS, GraphCosts, graph_costs
from .partition import _validate, plan_from_assignment

__all__ = ["uniform_plan", "parameters_plan", "time_plan", "baseline", "BASELINES",
           "block_partition", "balanced_partition"]


def _finish(gm: torch.fx.GraphModule, cost_model: CostModel, gc: GraphCosts, stage: Sequence[int],
            *, solver: str, t0: float, num_stages: int, num_microbatches: int, schedule: str,
            memory_limit: int | None, optimizer_slots: int, recompute: bool | None,
            extra: dict[str, Any] | None = None) -> Plan:
    opts = dict(num_microbatches=num_microbatches, schedule=schedule, memory_limit=memory_limit,
                optimizer_slots=optimizer_slots)
    assign = {gc.names[v]: int(stage[v]) for v in range(gc.n)}
    flags = [bool(recompute)] * num_stages
    plan = plan_from_assignment(gm, cost_model, assign, flags, costs=gc, check_memory=False,
                                **opts)
    if recompute is None and memory_limit is not None:
        for st in plan.stages:
            if st.memory > memory_limit:
                rec = stage_memory(param_bytes=st.param_bytes, activation_bytes=st.activation_bytes,
                                   input_bytes=st.input_bytes, in_flight=st.in_flight,
                                   recompute=True, optimizer_slots=optimizer_slots,
                                   schedule=schedule, received_bytes=st.received_bytes)
                flags[st.index] = rec < st.memory
    info = dict(extra or {})
    info.setdefault("over_memory", False)
    return plan_from_assignment(gm, cost_model, assign, flags, costs=gc, check_memory=False,
                                solver=solver, solve_time=time.perf_counter() - t0, extra=info,
                                **opts)


def _check(gc: GraphCosts, num_stages: int) -> None:
    if not isinstance(num_stages, int) or not 1 <= num_stages <= gc.n:
        raise ConfigError(f"num_stages={num_stages} must be between 1 and the number of compute "
                          f"nodes in the graph ({gc.n})")


def _equal_counts(n: int, d: int) -> list[int]:
    return [i * d // n for i in range(n)]


_INDEXED = re.compile(r"^(.*?)\.?(\d+)$")


def _repeated_blocks(gm: torch.fx.GraphModule, gc: GraphCosts) -> tuple[str, list[int | None]] | None:
    """The module list with the most numbered children, and each node's child index."""
    nodes = {n.name: n for n in gm.graph.nodes if n.op in COMPUTE_OPS}
    per_node: list[dict[str, int]] = []
    counts: dict[str, set[int]] = {}
    for name in gc.names:
        found: dict[str, int] = {}
        stack = nodes[name].meta.get("nn_module_stack") or {}
        for val in stack.values():
            path = str(val[0]) if isinstance(val, (tuple, list)) and val else str(val)
            parts = path.split(".")
            for i, part in enumerate(parts):
                if part.isdigit():
                    parent = ".".join(parts[:i])
                    found.setdefault(parent, int(part))
                    counts.setdefault(parent, set()).add(int(part))
        per_node.append(found)
    if not counts:
        return None
    parent = max(counts, key=lambda p: (len(counts[p]), sum(p in f for f in per_node), -len(p)))
    return parent, [f.get(parent) for f in per_node]


def uniform_plan(gm: torch.fx.GraphModule, cost_model: CostModel, *, num_stages: int,
                 num_microbatches: int, schedule: str = "2bw", memory_limit: int | None = None,
                 optimizer_slots: int = 0, recompute: bool | None = None) -> Plan:
    """The paper's planner: the same number of repeated blocks on every stage.

    Repeated blocks are the numbered children of the module list with the most
    of them in ``node.meta["nn_module_stack"]`` (e.g. ``h.0 .. h.47``). Nodes before
    the first block go to stage 0, after the last to stage d-1, between blocks
    with the block before. Without such blocks (or fewer than d, or a split that
    breaks edge order) it falls back to equal node counts over the graph order.

    Args:
        gm: annotated graph.
        cost_model: prices transfers.
        num_stages: d.
        num_microbatches: m.
        schedule: "2bw" | "flush" | "gpipe".
        memory_limit: bytes per device (reported, not enforced).
        optimizer_slots: k.
        recompute: None: recompute only stages over the limit; True/False: forced.

    Returns:
        A Plan with ``solver="uniform"`` and ``extra["blocks"]`` naming the module list used.

    Raises:
        ConfigError: num_stages out of range or bad schedule.
    """
    t0 = time.perf_counter()
    _validate(num_stages, num_microbatches, schedule, memory_limit, optimizer_slots)
    gc = graph_costs(gm, cost_model)
    _check(gc, num_stages)
    d = num_stages
    kw = dict(num_stages=d, num_microbatches=num_microbatches, schedule=schedule,
              memory_limit=memory_limit, optimizer_slots=optimizer_slots, recompute=recompute)
    rep = _repeated_blocks(gm, gc)
    if rep is not None:
        parent, layer = rep
        ids = sorted({x for x in layer if x is not None})
        if len(ids) >= d:
            rank = {x: i for i, x in enumerate(ids)}
            stage: list[int] = []
            seen = False
            current = 0
            for v in range(gc.n):
                if layer[v] is not None:
                    current = rank[layer[v]] * d // len(ids)
                    seen = True
                    stage.append(current)
                else:
                    stage.append(current if seen else 0)
            last = max(v for v in range(gc.n) if layer[v] is not None)
            for v in range(last + 1, gc.n):
                stage[v] = d - 1
            if len(set(stage)) == d:
                try:
                    return _finish(gm, cost_model, gc, stage, solver="uniform", t0=t0,
                                   extra={"blocks": parent, "num_blocks": len(ids)}, **kw)
                except PartitionError:
                    pass
    return _finish(gm, cost_model, gc, _equal_counts(gc.n, d), solver="uniform", t0=t0,
                   extra={"blocks": None}, **kw)


def balanced_partition(weights: Sequence[float], parts: int) -> list[int]:
    """Contiguous split of ``weights`` into ``parts`` non-empty parts minimising the largest sum.

    Binary search on the bottleneck with a greedy check (as DeepSpeed's
    ``partition_balanced``). Worked example: [4, 1, 1, 1, 3] into 2 -> [4 | 1 1 1 3]
    has max 6; [4 1 | 1 1 3] has max 5, the answer: part starts [0, 2].

    Args:
        weights: non-negative item weights.
        parts: number of parts, 1 <= parts <= len(weights).

    Returns:
        The part index of every item (non-decreasing, every part non-empty).
    """
    n = len(weights)

    def greedy(limit: float) -> list[int]:
        out, part, acc = [], 0, 0.0
        for i, w in enumerate(weights):
            # open a new part when full, or when the rest must each get an item
            if i > 0 and (acc + w > limit or n - i <= parts - 1 - part) and part < parts - 1:
                part, acc = part + 1, 0.0
            out.append(part)
            acc += w
        return out

    def fits(limit: float) -> bool:
        parts_needed, acc = 1, 0.0
        for w in weights:
            if acc + w > limit and acc > 0:
                parts_needed, acc = parts_needed + 1, 0.0
            acc += w
        return parts_needed <= parts

    lo, hi = max(weights, default=0.0), float(sum(weights))
    for _ in range(100):
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
        mid = (lo + hi) / 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return greedy(hi * (1 + 1e-12))


def parameters_plan(gm: torch.fx.GraphModule, cost_model: CostModel, *, num_stages: int,
                    num_microbatches: int, schedule: str = "2bw",
                    memory_limit: int | None = None, optimizer_slots: int = 0,
                    recompute: bool | None = None) -> Plan:
    """DeepSpeed's ``partition_method="parameters"``: balance parameter bytes over the graph order.

    A parameter weighs on the first node that reads it.

    Args:
        see :func:`uniform_plan`.

    Returns:
        A Plan with ``solver="parameters"``.

    Raises:
        ConfigError: num_stages out of range or bad schedule.
    """
    t0 = time.perf_counter()
    _validate(num_stages, num_microbatches, schedule, memory_limit, optimizer_slots)
    gc = graph_costs(gm, cost_model)
    _check(gc, num_stages)
    seen: set[str] = set()
    weights: list[float] = []
    for v in range(gc.n):
        new = [p for p in gc.params[v] if p not in seen]
        seen.update(new)
        weights.append(float(sum(gc.param_bytes[p] for p in new)))
    return _finish(gm, cost_model, gc, balanced_partition(weights, num_stages), solver="parameters",
                   t0=t0, num_stages=num_stages, num_microbatches=num_microbatches,
                   schedule=schedule, memory_limit=memory_limit, optimizer_slots=optimizer_slots,
                   recompute=recompute)


def block_partition(sequence: Sequence[float], parts: int, max_iter: int = 100_000) -> list[int]:
    """torchgpipe's ``blockpartition.solve`` (Barany et al., "Block partitions of sequences").

    Weights are normalised to [0, 1]; starting from equal counts, the element
    next to the lightest block on the side of the heaviest moves into it until
    max block <= min block + 1 (in normalised units)::

        [5 5 | 1 1 | 1 1]   heaviest p=0, lightest q=1: move the last of block 0 into 1
        [5 | 5 1 1 | 1 1]   -> stop when max <= min + 1

    Args:
        sequence: non-negative weights.
        parts: number of blocks.
        max_iter: safety cap on moves.

    Returns:
        The block index of every item (non-decreasing, no empty block).
    """
    n = len(sequence)
    lo = min(sequence)
    span = max(sequence) - lo
    norm = [0.0 if span == 0 else (x - lo) / span for x in sequence]
    prefix = [0.0]
    for x in norm:
        prefix.append(prefix[-1] + x)
    splits = [n // parts * (i + 1) for i in range(parts - 1)] + [n]

    def start(i: int) -> int:
        return splits[i - 1] if i > 0 else 0

    def size(i: int) -> float:
        return prefix[splits[i]] - prefix[start(i)]

    it = 0
    done = False
    while not done and it < max_iter:
        max_size, p = max((size(i), i) for i in range(parts))
        while it < max_iter:
            it += 1
            min_size = min(size(i) for i in range(parts))
            if max_size <= min_size + 1:
                done = True
                break
            # the lightest block closest to p
            q = min((i for i in range(parts) if size(i) == min_size), key=lambda i: (abs(i - p), i))
            if p < q:
                h = q - 1
                if splits[h] - start(h) <= 1:
                    done = True
                    break
                splits[h] -= 1
            else:
                h = q + 1
                if splits[h] - start(h) <= 1:
                    done = True
                    break
                splits[q] += 1
            if h == p:
                break
    out: list[int] = []
    for i in range(parts):
        out.extend([i] * (splits[i] - start(i)))
    return out


def time_plan(gm: torch.fx.GraphModule, cost_model: CostModel, *, num_stages: int,
              num_microbatches: int, schedule: str = "2bw", memory_limit: int | None = None,
              optimizer_slots: int = 0, recompute: bool | None = None) -> Plan:
    """torchgpipe ``balance_by_time``: :func:`block_partition` of F+B over the graph order.

    Args:
        see :func:`uniform_plan`.

    Returns:
        A Plan with ``solver="time"``.

    Raises:
        ConfigError: num_stages out of range or bad schedule.
    """
    t0 = time.perf_counter()
    _validate(num_stages, num_microbatches, schedule, memory_limit, optimizer_slots)
    gc = graph_costs(gm, cost_model)
    _check(gc, num_stages)
    weights = [gc.fwd[v] + gc.bwd[v] for v in range(gc.n)]
    return _finish(gm, cost_model, gc, block_partition(weights, num_stages), solver="time", t0=t0,
                   num_stages=num_stages, num_microbatches=num_microbatches, schedule=schedule,
                   memory_limit=memory_limit, optimizer_slots=optimizer_slots, recompute=recompute)


BASELINES: dict[str, Callable[..., Plan]] = {
    "uniform": uniform_plan, "parameters": parameters_plan, "time": time_plan,
}


def baseline(name: str, gm: torch.fx.GraphModule, cost_model: CostModel, **kwargs: Any) -> Plan:
    """Run the baseline planner ``name`` ("uniform" | "parameters" | "time").

    Args:
        name: which baseline.
        gm, cost_model, kwargs: as in :func:`uniform_plan`.

    Returns:
        The baseline's Plan.

    Raises:
        ConfigError: unknown name (the message lists the known ones), or bad arguments.
    """
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; use one of {', '.join(BASELINES)}")
    return BASELINES[name](gm, cost_model, **kwargs)
