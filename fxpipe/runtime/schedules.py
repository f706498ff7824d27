"""Pipeline schedules as data: per-rank action lists, a validator, a renderer and a simulator.

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

Pictures below are :func:`render` output (unit time for F, B and U; ``.`` =
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

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from fxpipe.errors import ScheduleError

__all__ = [
    "SCHEDULES",
    "KINDS",
    "Action",
    "SimResult",
    "batch_of",
    "build_schedule",
    "weight_version",
    "validate",
    "render",
    "simulate",
]

SCHEDULES: tuple[str, ...] = ("2bw", "flush", "gpipe")
"""The schedule names :func:`build_schedule` knows."""

KINDS: tuple[str, ...] = ("F", "B", "U")
"""Action kinds: forward, backward (input + weight gradient), optimizer update."""

_ACTION_RE = re.compile(r"^\s*(\d+)([FBU])(\d+)\s*$")


@dataclass(frozen=True)
class Action:
    """One step of one stage: ``Action(1, "F", 0)`` prints as ``"1F0"``.

    Attributes:
        stage: the pipeline stage (== rank) that runs the action.
        kind: ``"F"`` forward, ``"B"`` backward (input and weight gradients),
            ``"U"`` optimizer update of this stage's weights.
        microbatch: for ``"F"``/``"B"`` the global microbatch index (microbatch
            ``i`` belongs to batch ``i // m``); for ``"U"`` the **batch** index
            whose gradient is applied.
    """

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError(
                f"Action kind must be one of {', '.join(KINDS)}; got {self.kind!r} "
                f"(stage={self.stage}, microbatch={self.microbatch})")
        if self.stage < 0 or self.microbatch < 0:
            raise ScheduleError(
                f"Action stage and microbatch must be >= 0; got stage={self.stage}, "
                f"microbatch={self.microbatch}")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse the text form back: ``Action.parse("1F0") == Action(1, "F", 0)``.

        Args:
            text: ``<stage><kind><microbatch>``, e.g. ``"2B5"`` or ``"0U1"``.

        Returns:
            The action.

        Raises:
            ScheduleError: the text does not have that form.
        """
        match = _ACTION_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise ScheduleError(
                f"cannot parse action {text!r}: expected <stage><kind><microbatch> with kind "
                f"in {'/'.join(KINDS)}, e.g. '1F0', '2B5', '0U1'")
        return cls(int(match.group(1)), match.group(2), int(match.group(3)))


def batch_of(action: Action, num_microbatches: int) -> int:
    """The batch an action belongs to.

    Args:
        action: any action.
        num_microbatches: microbatches per batch (``m``).

    Returns:
        ``microbatch // m`` for F/B, the batch index itself for U.
    """
    return action.microbatch if action.kind == "U" else action.microbatch // num_microbatches


def _check_config(schedule: str, num_stages: int, num_microbatches: int, num_batches: int) -> None:
    """Raise ScheduleError unless the schedule name and sizes make a valid schedule."""
    if schedule not in SCHEDULES:
        raise ScheduleError(
            f"unknown schedule {schedule!r}: choose one of {', '.join(repr(s) for s in SCHEDULES)}")
    for name, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches),
                        ("num_batches", num_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{name} must be an int >= 1, got {value!r}")
    if schedule == "2bw" and num_microbatches < num_stages:
        raise ScheduleError(
            f"schedule '2bw' needs num_microbatches >= num_stages (m >= d), got "
            f"m={num_microbatches}, d={num_stages}: raise num_microbatches to >= {num_stages} "
            f"or use schedule='flush'")


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


def _gpipe_rank(stage: int, m: int, n: int) -> list[Action]:
    out: list[Action] = []
    for b in range(n):
        mbs = range(b * m, (b + 1) * m)
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
                   num_batches: int = 1) -> list[list[Action]]:
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

    Returns:
        ``d`` lists; list ``s`` holds the actions of stage/rank ``s`` in order.

    Raises:
        ScheduleError: unknown schedule name, a size < 1, or ``"2bw"`` with
            ``m < d``.
    """
    _check_config(schedule, num_stages, num_microbatches, num_batches)
    d, m, n = num_stages, num_microbatches, num_batches
    if schedule == "gpipe":
        return [_gpipe_rank(s, m, n) for s in range(d)]
    if schedule == "flush":
        return [_flush_rank(s, d, m, n) for s in range(d)]
    return [_2bw_rank(s, d, m, n) for s in range(d)]


def weight_version(schedule: str, action: Action, num_microbatches: int) -> int:
    """The weight version an action runs with (version v = weights after v updates).

    * ``"2bw"``: F/B of batch ``b`` use version ``max(b - 1, 0)``.
    * ``"flush"`` / ``"gpipe"``: F/B of batch ``b`` use version ``b``.
    * ``"U"`` of batch ``b`` (any schedule) steps the newest weights, version
      ``b``, producing version ``b + 1``; ``b`` is returned.

    Args:
        schedule: one of :data:`SCHEDULES`.
        action: the action.
        num_microbatches: microbatches per batch ``m``.

    Returns:
        The version index.

    Raises:
        ScheduleError: unknown schedule, or ``num_microbatches < 1``.
    """
    if schedule not in SCHEDULES:
        raise ScheduleError(
            f"unknown schedule {schedule!r}: choose one of {', '.join(repr(s) for s in SCHEDULES)}")
    if num_microbatches < 1:
        raise ScheduleError(f"num_microbatches must be >= 1, got {num_microbatches}")
    b = batch_of(action, num_microbatches)
    if action.kind == "U" or schedule != "2bw":
        return b
    return max(b - 1, 0)


# --------------------------------------------------------------------------- simulation


@dataclass
class _Run:
    """Raw outcome of an event-driven run: never raises, stops at a deadlock."""

    timeline: list[list[tuple[float, float, Action]]]
    blocked: list[list[Action]]          # per rank, the actions that never ran
    waits: dict[int, list[Action]] = field(default_factory=dict)  # rank -> missing deps of its head

    @property
    def makespan(self) -> float:
        return max((row[-1][1] for row in self.timeline if row), default=0.0)


def _deps(action: Action, num_stages: int) -> list[tuple[Action, bool]]:
    """Dependencies of an action as (action, crosses_ranks)."""
    s, i = action.stage, action.microbatch
    if action.kind == "F":
        return [(Action(s - 1, "F", i), True)] if s > 0 else []
    if action.kind == "B":
        deps = [(Action(s, "F", i), False)]
        if s < num_stages - 1:
            deps.append((Action(s + 1, "B", i), True))
        return deps
    return []


def _run(actions: Sequence[Sequence[Action]], fwd: Sequence[float], bwd: Sequence[float],
         comm: float, upd: Sequence[float]) -> _Run:
    d = len(actions)
    ptr = [0] * d
    free = [0.0] * d
    end: dict[Action, float] = {}
    timeline: list[list[tuple[float, float, Action]]] = [[] for _ in range(d)]

    def duration(a: Action) -> float:
        s = min(a.stage, d - 1)
        return {"F": fwd, "B": bwd, "U": upd}[a.kind][s]

    progress = True
    while progress:
        progress = False
        for r in range(d):
            while ptr[r] < len(actions[r]):
                a = actions[r][ptr[r]]
                deps = _deps(a, d)
                if any(dep not in end for dep, _ in deps):
                    break
                start = max([free[r]] + [end[dep] + (comm if cross else 0.0) for dep, cross in deps])
                stop = start + duration(a)
                timeline[r].append((start, stop, a))
                end.setdefault(a, stop)
                free[r] = stop
                ptr[r] += 1
                progress = True
    blocked = [list(actions[r][ptr[r]:]) for r in range(d)]
    waits = {r: [dep for dep, _ in _deps(blocked[r][0], d) if dep not in end]
             for r in range(d) if blocked[r]}
    return _Run(timeline, blocked, waits)


def _per_stage(value: Sequence[float] | float, d: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        values = [float(value)] * d
    else:
        values = [float(v) for v in value]
        if len(values) != d:
            raise ScheduleError(f"{name} has {len(values)} entries but the schedule has {d} stages")
    if any(v < 0 or v != v for v in values):
        raise ScheduleError(f"{name} must be >= 0 (and not NaN), got {values}")
    return values


def render(actions: Sequence[Sequence[Action]]) -> str:
    """Draw a schedule as a rank x step grid (unit time per F, B and U; ``.`` = idle).

    Steps come from an event-driven run (see :func:`simulate`), so each
    cell is the action a rank runs at that tick.  If the schedule deadlocks,
    each rank's actions that never ran are listed after a ``|``.
    Never raises on a list of lists of actions, so error messages can use it.

    Example (flush, d=2, m=3)::

        step    0   1   2   3   4   5   6   7   8
        rank 0 0F0 0F1  .  0B0 0F2 0B1  .  0B2 0U0
        rank 1  .  1F0 1B0 1F1 1B1 1F2 1B2 1U0  .

    Args:
        actions: one action list per rank.

    Returns:
        The grid as text (no trailing newline).
    """
    d = len(actions)
    if d == 0:
        return "(empty schedule: no ranks)"
    ones = [1.0] * d
    run = _run(actions, ones, ones, 0.0, ones)
    steps = int(round(run.makespan))
    cells = [["."] * steps for _ in range(d)]
    for r, row in enumerate(run.timeline):
        for start, _, a in row:
            cells[r][int(round(start))] = str(a)
    labels = [f"rank {r}" for r in range(d)]
    texts = [c for row in cells for c in row] + [str(a) for row in run.blocked for a in row]
    width = max([len(str(max(steps - 1, 0)))] + [len(t) for t in texts])
    lw = max(len(x) for x in labels)
    header = "step".ljust(lw) + " " + " ".join(str(t).center(width) for t in range(steps))
    lines = [header.rstrip()]
    for r in range(d):
        line = labels[r].ljust(lw) + " " + " ".join(c.center(width) for c in cells[r])
        if run.blocked[r]:
            line += " | " + " ".join(str(a) for a in run.blocked[r])
        lines.append(line.rstrip())
    if any(run.blocked):
        lines.append("(deadlock: actions after '|' never ran)")
    return "\n".join(lines)


@dataclass
class SimResult:
    """What :func:`simulate` measured.

    Attributes:
        makespan: time at which the last action ends.
        timeline: per rank, ``(start, end, action)`` in execution order.
        busy: per rank, total time spent running actions.
        bubble_fraction: ``1 - sum(busy) / (d * makespan)`` (0 for an empty run).
        peak_in_flight: per stage, the most microbatches forwarded but not yet
            backwarded at once.
        peak_versions: per stage, the most weight versions alive at once (a
            version lives from its creating U until its last F/B use; the
            newest is always alive).
    """

    makespan: float
    timeline: list[list[tuple[float, float, Action]]]
    busy: list[float]
    bubble_fraction: float
    peak_in_flight: list[int]
    peak_versions: list[int]


def _peak_in_flight(row: Sequence[Action]) -> int:
    live = peak = 0
    for a in row:
        if a.kind == "F":
            live += 1
        elif a.kind == "B":
            live -= 1
        peak = max(peak, live)
    return peak


def _live_versions(row: Sequence[Action], schedule: str, m: int) -> list[tuple[int, list[int]]]:
    """Per position on one rank: (newest version, sorted alive versions).

    Version ``k`` is created by the k-th U of the row (version 0 exists before);
    it is alive while it is the newest or while a later F/B still needs it.
    """
    last_use: dict[int, int] = {}
    for p, a in enumerate(row):
        if a.kind != "U":
            last_use[weight_version(schedule, a, m)] = p
    out = []
    newest = 0
    for p, a in enumerate(row):
        if a.kind == "U":
            newest += 1
        alive = [v for v in range(newest + 1) if v == newest or last_use.get(v, -1) >= p]
        out.append((newest, alive))
    return out


def _infer_m(actions: Sequence[Sequence[Action]]) -> int:
    row = actions[0] if actions else []
    forwards = sum(a.kind == "F" for a in row)
    updates = sum(a.kind == "U" for a in row)
    return max(1, forwards // updates if updates else forwards)


def _infer_schedule(actions: Sequence[Sequence[Action]], m: int) -> str:
    for row in actions:
        updated = -1
        for a in row:
            if a.kind == "U":
                updated = max(updated, a.microbatch)
            elif a.kind == "F" and a.microbatch // m > updated + 1:
                return "2bw"
    return "flush"


def simulate(actions: Sequence[Sequence[Action]], fwd_time: Sequence[float] | float = 1.0,
             bwd_time: Sequence[float] | float = 2.0, comm_time: float = 0.0,
             update_time: Sequence[float] | float = 0.0, *, schedule: str | None = None,
             num_microbatches: int | None = None) -> SimResult:
    """Run a schedule on an event-driven clock (no devices).

    Each rank runs its list in order; an action starts when its rank is free
    and its inputs are ready: ``F(s, i)`` after ``F(s-1, i)`` ends plus
    ``comm_time``; ``B(s, i)`` after ``F(s, i)`` and after ``B(s+1, i)`` ends
    plus ``comm_time``; ``U`` depends only on its rank's order.

    Args:
        actions: one action list per rank (rank == stage).
        fwd_time: forward time per microbatch, one number or one per stage.
        bwd_time: backward time per microbatch, one number or one per stage.
        comm_time: time to send an activation/gradient between adjacent stages.
        update_time: optimizer step time, one number or one per stage.
        schedule: weight semantics for ``peak_versions`` (see
            :func:`weight_version`); ``None`` infers ``"2bw"`` if some rank
            runs a forward of batch ``b+1`` before its ``U(b)``, else ``"flush"``.
        num_microbatches: ``m``; ``None`` infers it as forwards / updates on rank 0.

    Returns:
        The :class:`SimResult`.

    Raises:
        ScheduleError: an action sits on the wrong rank, a time is negative or
            has the wrong length, or the schedule deadlocks (the message holds
            the grid and what each blocked rank waits for).
    """
    d = len(actions)
    for r, row in enumerate(actions):
        for p, a in enumerate(row):
            if a.stage != r:
                raise ScheduleError(
                    f"action {a} is on rank {r} at position {p}, but stage {a.stage} runs on rank "
                    f"{a.stage} (one stage per rank)\n{render(actions)}")
    fwd = _per_stage(fwd_time, d, "fwd_time")
    bwd = _per_stage(bwd_time, d, "bwd_time")
    upd = _per_stage(update_time, d, "update_time")
    comm = _per_stage(comm_time, 1, "comm_time")[0]
    run = _run(actions, fwd, bwd, comm, upd)
    if any(run.blocked):
        raise ScheduleError(_deadlock_message(actions, run))
    m = num_microbatches if num_microbatches is not None else _infer_m(actions)
    sched = schedule if schedule is not None else _infer_schedule(actions, m)
    busy = [sum(e - s for s, e, _ in row) for row in run.timeline]
    makespan = run.makespan
    bubble = 1.0 - sum(busy) / (d * makespan) if makespan > 0 else 0.0
    return SimResult(
        makespan=makespan,
        timeline=run.timeline,
        busy=busy,
        bubble_fraction=bubble,
        peak_in_flight=[_peak_in_flight(row) for row in actions],
        peak_versions=[max((len(alive) for _, alive in _live_versions(row, sched, m)), default=1)
                       for row in actions],
    )


def _deadlock_message(actions: Sequence[Sequence[Action]], run: _Run) -> str:
    waiting = {a for row in run.blocked for a in row}
    lines = [f"schedule deadlocks after t={run.makespan:g}:"]
    for r, deps in sorted(run.waits.items()):
        head = run.blocked[r][0]
        step = len(actions[r]) - len(run.blocked[r])
        why = ", ".join(
            f"{dep} (blocked on rank {dep.stage})" if dep in waiting else f"{dep} (never scheduled)"
            for dep in deps) or "nothing (blocked only by its rank's order)"
        lines.append(f"  rank {r} is stuck at {head} (list position {step}) waiting for {why}")
    return "\n".join(lines) + "\n" + render(actions)


# --------------------------------------------------------------------------- validation


def validate(actions: Sequence[Sequence[Action]], schedule: str, num_stages: int,
             num_microbatches: int, num_batches: int = 1) -> None:
    """Check that action lists are a correct schedule of the given kind.

    Checks, per rank ``s``: only stage-``s`` actions; each microbatch of
    ``0 .. n*m-1`` has exactly one F and, later, exactly one B; exactly one
    U per batch, in batch order, after all of that batch's B on the rank.
    Weights: for ``"2bw"`` an F/B of batch ``b`` needs version ``max(b-1, 0)``,
    which exists only after ``U(b-2)`` on that rank, and at most two versions
    may be alive at once (alive = newest, or still needed by a later F/B);
    for ``"flush"``/``"gpipe"`` the forwards of batch ``b+1`` come after
    ``U(b)``.  Finally the lists are simulated to rule out a cross-rank
    deadlock.  Problems name actions by their (0-based) position in the
    rank's list; the grid's columns are simulated time steps.  ``"2bw"`` with
    ``m < d`` is rejected as in :func:`build_schedule`.

    Args:
        actions: one action list per rank.
        schedule: ``"2bw"``, ``"flush"`` or ``"gpipe"``.
        num_stages: ``d``.
        num_microbatches: ``m`` per batch.
        num_batches: ``n``.

    Returns:
        None.

    Raises:
        ScheduleError: the configuration is invalid, or the lists break a
            rule; the message lists the problems and the rank x step grid.
    """
    _check_config(schedule, num_stages, num_microbatches, num_batches)
    d, m, n = num_stages, num_microbatches, num_batches
    problems: list[str] = []
    if len(actions) != d:
        problems.append(f"expected {d} ranks (one per stage), got {len(actions)} action lists")
    for r, row in enumerate(actions):
        problems.extend(_check_rank(r, row, schedule, m, n))
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ScheduleError(
            f"invalid {schedule!r} schedule (d={d}, m={m}, num_batches={n}): "
            f"{len(problems)} problem(s):\n  " + "\n  ".join(shown) + "\n" + render(actions))
    run = _run(actions, [1.0] * d, [1.0] * d, 0.0, [1.0] * d)
    if any(run.blocked):
        raise ScheduleError(f"invalid {schedule!r} schedule (d={d}, m={m}, num_batches={n}): "
                            + _deadlock_message(actions, run))


def _check_rank(r: int, row: Sequence[Action], schedule: str, m: int, n: int) -> list[str]:
    problems: list[str] = []
    total = n * m
    fpos: dict[int, int] = {}
    bpos: dict[int, int] = {}
    upos: dict[int, int] = {}
    for p, a in enumerate(row):
        where = f"rank {r} position {p}: {a}"
        if a.stage != r:
            problems.append(f"{where} belongs to stage {a.stage}, not rank {r}")
            continue
        if a.kind == "U":
            if a.microbatch >= n:
                problems.append(f"{where} updates batch {a.microbatch}, but there are {n} batches")
            elif a.microbatch in upos:
                problems.append(f"{where} repeats the update already at position {upos[a.microbatch]}")
            else:
                upos[a.microbatch] = p
            continue
        seen = fpos if a.kind == "F" else bpos
        if a.microbatch >= total:
            problems.append(f"{where} names microbatch {a.microbatch}, but there are {total} "
                            f"({n} batches x {m})")
        elif a.microbatch in seen:
            problems.append(f"{where} repeats the {a.kind} already at position {seen[a.microbatch]}")
        else:
            seen[a.microbatch] = p
    for i in range(total):
        if i not in fpos:
            problems.append(f"rank {r}: missing forward {r}F{i}")
        if i not in bpos:
            problems.append(f"rank {r}: missing backward {r}B{i}")
        if i in fpos and i in bpos and bpos[i] < fpos[i]:
            problems.append(f"rank {r}: backward {r}B{i} at position {bpos[i]} runs before its "
                            f"forward {r}F{i} at position {fpos[i]}")
    for b in range(n):
        if b not in upos:
            problems.append(f"rank {r}: missing update {r}U{b} of batch {b}")
    order = sorted(upos, key=upos.__getitem__)
    if order != sorted(order):
        problems.append(f"rank {r}: updates run in batch order "
                        f"{' '.join(f'{r}U{b}' for b in order)}, not ascending")
    if problems:
        return problems  # the checks below assume a well-formed row

    if schedule == "2bw":
        for p, (newest, alive) in enumerate(_live_versions(row, schedule, m)):
            a = row[p]
            if a.kind != "U":
                need = weight_version(schedule, a, m)
                if need > newest:
                    problems.append(
                        f"rank {r} position {p}: {a} (batch {a.microbatch // m}) needs weight version "
                        f"{need}, created by {r}U{need - 1}, which has not run yet")
            if len(alive) > 2:
                problems.append(
                    f"rank {r} position {p}: {a}: {len(alive)} weight versions alive "
                    f"({', '.join(map(str, alive))}); 2bw keeps at most two")
                break
    for b in range(n):
        last_b = max(bpos[i] for i in range(b * m, (b + 1) * m))
        if upos[b] < last_b:
            problems.append(f"rank {r}: {r}U{b} at position {upos[b]} runs before batch {b}'s "
                            f"backward {row[last_b]} at position {last_b}")
        if schedule != "2bw" and b + 1 < n:
            first_f = min(fpos[i] for i in range((b + 1) * m, (b + 2) * m))
            if first_f < upos[b]:
                problems.append(
                    f"rank {r}: {row[first_f]} (batch {b + 1}) at position {first_f} runs before "
                    f"{r}U{b} at position {upos[b]}; {schedule} needs weight version {b + 1}")
    return problems
