"""Pipeline schedules as data: the per-rank action lists of 2bw, flush and gpipe.

A schedule is one list of :class:`Action` per rank (one stage per rank, rank ==
stage).  Executors only interpret these lists; everything here is pure Python
and runs without devices.

Conventions
-----------
* Microbatch indices are global across batches: microbatch ``i`` belongs to
  batch ``i // m`` (``m`` = microbatches per batch).
* ``"F"`` = forward, ``"B"`` = backward (input *and* weight gradient),
  ``"U"`` = optimizer update of the stage's weights; for ``"U"`` the
  ``microbatch`` field holds the **batch** index.  ``str(Action(1, "F", 0))``
  is ``"1F0"``, ``"0U1"`` is the update of stage 0 after batch 1.
* Weight version ``v`` = the weights after ``v`` updates; version 0 exists at the
  start and version ``v`` is created by ``U`` of batch ``v - 1``.
* Backwards run in the same (ascending) microbatch order as forwards in every
  schedule, like torch.distributed.pipelining's ``ScheduleGPipe`` / ``Schedule1F1B``.
* ``U`` of a batch runs right after the stage's last backward of that batch.

Pictures below are :func:`fxpipe.runtime.simulate.render` output (unit time for F, B and U; ``.`` =
idle); ``d`` = stages, ``m`` = microbatches per batch.

``gpipe`` (d=4, m=4, one batch): all forwards, then all backwards in the
same order (torch's ``ScheduleGPipe``), then the update::

    step    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14
    rank 0 0F0 0F1 0F2 0F3  .   .   .   .   .   .  0B0 0B1 0B2 0B3 0U0
    rank 1  .  1F0 1F1 1F2 1F3  .   .   .   .  1B0 1B1 1B2 1B3 1U0  .
    rank 2  .   .  2F0 2F1 2F2 2F3  .   .  2B0 2B1 2B2 2B3 2U0  .   .
    rank 3  .   .   .  3F0 3F1 3F2 3F3 3B0 3B1 3B2 3B3 3U0  .   .   .

``flush`` (PipeDream-Flush; d=3, m=3, two batches): stage ``s`` runs
``min(d-s-1, m)`` warm-up forwards, alternates F/B, drains, updates, and only
then starts the next batch (the flush bubble is paid every batch)::

    step    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20  21
    rank 0 0F0 0F1 0F2  .   .  0B0  .  0B1  .  0B2 0U0 0F3 0F4 0F5  .   .  0B3  .  0B4  .  0B5 0U1
    rank 1  .  1F0 1F1  .  1B0 1F2 1B1  .  1B2 1U0  .   .  1F3 1F4  .  1B3 1F5 1B4  .  1B5 1U1  .
    rank 2  .   .  2F0 2B0 2F1 2B1 2F2 2B2 2U0  .   .   .   .  2F3 2B3 2F4 2B4 2F5 2B5 2U1  .   .

``2bw`` (PipeDream-2BW; d=3, m=3, two batches): one 1F1B stream over all
``n*m`` microbatches; warm-up only at the start, cool-down only at the end,
and ``U(b)`` slotted in right after the backward of batch ``b``'s last
microbatch.  Batch 1 starts while batch 0 drains (it uses version 0, like
batch 0); batch ``b >= 2`` uses version ``b - 1``::

    step    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17
    rank 0 0F0 0F1 0F2  .   .  0B0 0F3 0B1 0F4 0B2 0U0 0F5 0B3  .  0B4  .  0B5 0U1
    rank 1  .  1F0 1F1  .  1B0 1F2 1B1 1F3 1B2 1U0 1F4 1B3 1F5 1B4  .  1B5 1U1  .
    rank 2  .   .  2F0 2B0 2F1 2B1 2F2 2B2 2U0 2F3 2B3 2F4 2B4 2F5 2B5 2U1  .   .
"""

from __future__ import annotations

from fxpipe.errors import ScheduleError
from fxpipe.runtime.actions import KINDS, SCHEDULES, Action, batch_of, check_config, weight_version

__all__ = [
    "SCHEDULES",
    "KINDS",
    "Action",
    "batch_of",
    "build_schedule",
    "weight_version",
]

# --------------------------------------------------------------------------- building


def _one_f_one_b(stage: int, num_stages: int, first: int, count: int) -> list[Action]:
    """1F1B over microbatches ``first .. first+count-1`` on one stage (no updates).

    ``w = min(d - s - 1, count)`` warm-up forwards, then ``F(w+k), B(k)`` pairs,
    then ``w`` cool-down backwards.
    """
    warmup = min(num_stages - stage - 1, count)
    out = [Action(stage, "F", first + k) for k in range(warmup)]
    for k in range(count - warmup):
        out.append(Action(stage, "F", first + warmup + k))
        out.append(Action(stage, "B", first + k))
    out.extend(Action(stage, "B", first + k) for k in range(count - warmup, count))
    return out


def _gpipe_rank(stage: int, m: int, n: int, g: int) -> list[Action]:
    out: list[Action] = []
    for b in range(n):
        for first in range(b * m, (b + 1) * m, g):      # flushes of g microbatches, gradients accumulate
            mbs = range(first, min(first + g, (b + 1) * m))
            out.extend(Action(stage, "F", i) for i in mbs)
            out.extend(Action(stage, "B", i) for i in mbs)  # torch ScheduleGPipe: same order
        out.append(Action(stage, "U", b))
    return out


def _flush_rank(stage: int, d: int, m: int, n: int) -> list[Action]:
    out: list[Action] = []
    for b in range(n):
        out.extend(_one_f_one_b(stage, d, b * m, m))
        out.append(Action(stage, "U", b))
    return out


def _2bw_rank(stage: int, d: int, m: int, n: int) -> list[Action]:
    out: list[Action] = []
    for a in _one_f_one_b(stage, d, 0, n * m):
        out.append(a)
        if a.kind == "B" and (a.microbatch + 1) % m == 0:
            out.append(Action(stage, "U", a.microbatch // m))
    return out


def build_schedule(schedule: str, num_stages: int, num_microbatches: int,
                   num_batches: int = 1, *, microbatches_per_flush: int | None = None) -> list[list[Action]]:
    """Build the per-rank action lists of a schedule.

    Worked example, ``flush`` with d=2, m=3, one batch::

        rank 0: 0F0 0F1 0B0 0F2 0B1 0B2 0U0
        rank 1: 1F0 1B0 1F1 1B1 1F2 1B2 1U0

    Args:
        schedule: ``"2bw"`` (continuous 1F1B, no flush, U after each batch's
            last backward), ``"flush"`` (1F1B per batch, then U) or ``"gpipe"``
            (per batch all F, then all B in the same order, then U).
        num_stages: pipeline depth ``d`` (one stage per rank).
        num_microbatches: microbatches per batch ``m``.
        num_batches: number of batches ``n``; microbatch ``i`` is in batch ``i // m``.
        microbatches_per_flush: ``"gpipe"`` only: g, the microbatches in flight at once. A batch
            runs as ceil(m / g) flushes (all F then all B of g microbatches each), its gradients
            accumulated, then one U: GPipe as PipeDream-2BW's paper ran it when m microbatches
            do not fit. None: g = m.

    Returns:
        ``d`` lists; list ``s`` holds the actions of stage/rank ``s`` in order.

    Raises:
        ScheduleError: unknown schedule name, a size < 1, or ``"2bw"`` with
            ``m < d``.
    """
    check_config(schedule, num_stages, num_microbatches, num_batches)
    d, m, n = num_stages, num_microbatches, num_batches
    g = m if microbatches_per_flush is None else microbatches_per_flush
    if microbatches_per_flush is not None:
        if schedule != "gpipe":
            raise ScheduleError(f"microbatches_per_flush applies to schedule 'gpipe' only, got {schedule!r}; "
                                "drop it (1F1B schedules keep at most d microbatches in flight)")
        if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= m:
            raise ScheduleError(f"microbatches_per_flush must be an int in 1..num_microbatches={m}, got {g!r}")
    if schedule == "gpipe":
        return [_gpipe_rank(s, m, n, g) for s in range(d)]
    if schedule == "flush":
        return [_flush_rank(s, d, m, n) for s in range(d)]
    return [_2bw_rank(s, d, m, n) for s in range(d)]


