"""Equal blocks: the paper's cut of a repeated-layer model into d stages, and the Plan it makes.

PipeDream-2BW's planner (passes/paper_planner.py) gives each stage L/d of the L identical
blocks; the search (passes/search.py) prices the same cut beside its CP-SAT cut. Example
(embedding, 4 blocks, norm, head; d=2)::

    units  Embedding Block Block | Block Block LayerNorm Linear
    stage      0       0     0   |   1     1      1       1
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch.fx

from fxpipe.errors import PartitionError
from fxpipe.ir import CostModel, Plan

from .baselines import LayerUnit, partition_uniform
from .partition import plan_from_assignment

__all__ = ["equal_blocks", "equal_block_plan"]


def equal_blocks(units: Sequence[LayerUnit], num_stages: int) -> list[int]:
    """Stage of each layer unit: the repeated block type split evenly, the rest with its neighbour block.

    The block type is the most frequent ``type_name`` (first seen wins a tie). Units
    before the first block go to stage 0, units after the last block to stage d-1,
    anything between two blocks with the block before it. When d does not divide
    the number of blocks the first ones get one more (DeepSpeed's partition_uniform).

    Raises:
        PartitionError: fewer blocks than stages.
    """
    counts = Counter(u.type_name for u in units)
    block = max(counts, key=lambda t: (counts[t], -next(i for i, u in enumerate(units) if u.type_name == t)))
    idx = [i for i, u in enumerate(units) if u.type_name == block]
    if len(idx) < num_stages:
        raise PartitionError(f"paper planner: {len(idx)} {block} blocks cannot make {num_stages} equal stages; "
                             f"use at most {len(idx)} stages")
    parts = partition_uniform(len(idx), num_stages)
    stage_of_block = {idx[j]: s for s in range(num_stages) for j in range(parts[s], parts[s + 1])}
    out, cur = [], 0
    for i in range(len(units)):
        cur = stage_of_block.get(i, cur)
        out.append(cur)
    return out


def equal_block_plan(gm: torch.fx.GraphModule, cm: CostModel, gc: Any, units: Sequence[LayerUnit], *,
                     num_stages: int, num_microbatches: int, schedule: str, memory_limit: int | None,
                     optimizer_slots: int, recompute: Sequence[bool] = (False, True)) -> tuple[Plan | None, int | None]:
    """Equal blocks at depth d with the first recompute setting (all stages alike) that fits memory.

    Returns ``(plan, None)`` when one fits, ``(None, smallest memory seen)`` when none does, and
    ``(None, None)`` when the blocks cannot make d stages.
    """
    try:
        unit_stage = equal_blocks(units, num_stages)
    except PartitionError:
        return None, None
    assign = {gc.names[v]: unit_stage[i] for i, u in enumerate(units) for v in u.nodes}
    seen: int | None = None
    for r in recompute:
        cand = plan_from_assignment(gm, cm, assign, [r] * num_stages, num_microbatches=num_microbatches,
                                    schedule=schedule, memory_limit=memory_limit, optimizer_slots=optimizer_slots,
                                    check_memory=False, costs=gc, solver="paper")
        peak = max(st.memory for st in cand.stages)
        if memory_limit is None or peak <= memory_limit:
            return cand, None
        seen = peak if seen is None else min(seen, peak)
    return None, seen
