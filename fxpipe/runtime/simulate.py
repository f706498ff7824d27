"""Running a schedule without devices: an event-driven simulator, the rank x step grid, steady-state batch time.

See :func:`simulate` for the timing rules (per-stage compute, one link per communicating pair
of stages and direction (:mod:`fxpipe.runtime.links`), an update lane that overlaps the
data-parallel all-reduce) and :func:`steady_batch_time` for pricing a :class:`~fxpipe.ir.Plan`
with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fxpipe.errors import ScheduleError
from fxpipe.runtime.actions import Action, weight_version
from fxpipe.runtime.links import Links, chain_links, comm_links, directions, per_stage, plan_links

__all__ = ["SimResult", "simulate", "render", "steady_batch_time"]

@dataclass
class _Run:
    """Raw outcome of an event-driven run: never raises, stops at a deadlock."""

    timeline: list[list[tuple[float, float, Action]]]
    blocked: list[list[Action]]          # per rank, the actions that never ran
    waits: dict[int, list[Action]] = field(default_factory=dict)  # rank -> missing deps of its head

    @property
    def makespan(self) -> float:
        return max((e for row in self.timeline for _, e, _ in row), default=0.0)


@lru_cache(maxsize=1 << 16)
def _deps(action: Action, ins: tuple[int, ...], outs: tuple[int, ...]) -> tuple[tuple[Action, bool], ...]:
    """Dependencies of an action as (action, crosses_ranks); ``ins``/``outs``: its stage's producers/consumers."""
    s, i = action.stage, action.microbatch
    if action.kind == "F":
        return tuple((Action(p, "F", i), True) for p in ins)
    if action.kind == "B":
        return ((Action(s, "F", i), False),) + tuple((Action(c, "B", i), True) for c in outs)
    return ()


@lru_cache(maxsize=1 << 14)
def _update(stage: int, batch: int) -> Action:
    return Action(stage, "U", batch)


def _run(actions: Sequence[Sequence[Action]], fwd: Sequence[float], bwd: Sequence[float],
         links: Links | float | Sequence[float], upd: Sequence[float], allreduce: Sequence[float] | None = None,
         schedule: str = "flush", m: int = 1, blocking: bool = False, rendezvous: bool = False) -> _Run:
    """Event-driven run. ``links[(p, c)]`` is the one-way time of what stage p sends stage c (forward;
    the gradient goes back c -> p in the same time; a number or a list: one per boundary), or a pair
    (forward, gradient seconds) where a 0-second gradient is none sent (``links.directions``); each
    direction of a pair is one link that carries one tensor at a time, in the sender's order. With
    ``allreduce``, ``U`` runs on its rank's update lane (all-reduce, then the step) without holding
    the rank, and an F/B needing version v waits for the ``U`` that creates it. With ``blocking``, a
    rank that sends waits until its tensors have crossed before its next action. With ``rendezvous``
    (implies ``blocking``) a transfer starts only once its receiver has posted the receive: together
    with its own sends when its next F/B is of the other kind (Megatron's send_forward_recv_backward),
    else once those sends have crossed (send_forward, then recv_forward). Skips (p -> c > p + 1, which
    Megatron-LM never sends) stay plain blocking sends: two of them waiting on each other would deadlock."""
    d = len(actions)
    links = links if isinstance(links, dict) else chain_links(d, links)
    producers: list[list[int]] = [[] for _ in range(d)]
    consumers: list[list[int]] = [[] for _ in range(d)]   # those that send a gradient back
    seconds: list[float] = []             # directed link k: one-way time
    sends: dict[str, list[list[tuple[int, int]]]] = {"F": [[] for _ in range(d)], "B": [[] for _ in range(d)]}
    link_of: dict[tuple[str, int, int], int] = {}  # (kind, sender, receiver) -> directed link
    for (p, c), t in sorted(links.items()):
        there, back = directions(t)
        producers[c].append(p)
        sends["F"][p].append((c, len(seconds)))     # the activation p -> c
        link_of[("F", p, c)] = len(seconds)
        seconds.append(there)
        if back is not None:                        # its gradient c -> p (none for a bool or int value)
            consumers[p].append(c)
            sends["B"][c].append((p, len(seconds)))
            link_of[("B", c, p)] = len(seconds)
            seconds.append(back)
    ptr = [0] * d
    free = [0.0] * d
    lane = [0.0] * d                      # update lane of each rank (async U only)
    link_free = [0.0] * len(seconds)      # directed link k: free from
    end: dict[Action, float] = {}
    inbox: list[dict[Action, float]] = [{} for _ in range(d)]   # per rank: when an F/B's output gets there
    timeline: list[list[tuple[float, float, Action]]] = [[] for _ in range(d)]
    ins, outs = [tuple(p) for p in producers], [tuple(c) for c in consumers]
    pending = [0] * d                     # rendezvous: sends of the rank's last F/B not yet received
    last_fb: list[tuple[str, float] | None] = [None] * d   # rendezvous: kind and end of the last F/B, None
                                          # after a U on the rank (an exchange never spans an update)

    def duration(a: Action) -> float:
        s = min(a.stage, d - 1)
        return {"F": fwd, "B": bwd, "U": upd}[a.kind][s]

    def deps_of(a: Action) -> tuple[tuple[Action, bool], ...]:
        deps = _deps(a, ins[a.stage], outs[a.stage])
        if allreduce is not None and a.kind != "U":
            v = weight_version(schedule, a, m)
            if v > 0:
                deps = deps + ((_update(a.stage, v - 1), False),)
        return deps

    progress = True
    while progress:
        progress = False
        for r in range(d):
            while ptr[r] < len(actions[r]):
                a = actions[r][ptr[r]]
                deps = deps_of(a)
                if any(dep not in end for dep, _ in deps):
                    break
                box = inbox[r]
                if rendezvous and a.kind != "U":
                    prev = last_fb[r]
                    paired = prev is not None and prev[0] != a.kind   # sends and this receive in one batch
                    if pending[r] and not paired:
                        break                     # posts its receive only after its sends crossed
                    post = prev[1] if paired else free[r]
                    for dep, cross in deps:
                        if cross and dep not in box:   # a neighbour waits to send: the transfer starts now
                            k = link_of[(dep.kind, dep.stage, r)]
                            there = max(end[dep], post, link_free[k]) + seconds[k]
                            link_free[k] = box[dep] = there
                            free[dep.stage] = max(free[dep.stage], there)
                            pending[dep.stage] -= 1
                            progress = True
                    if pending[r]:
                        break                     # blocking: its own sends have not crossed yet
                elif rendezvous and pending[r] and allreduce is None:
                    break                         # a U on the rank follows its sends too
                ready = max([box[dep] if cross else end[dep] for dep, cross in deps], default=0.0)
                if a.kind == "U" and allreduce is not None:
                    start = max(free[r], ready, lane[r])
                    stop = start + float(allreduce[r]) + duration(a)
                    lane[r] = stop
                else:
                    start = max(free[r], ready)
                    stop = start + duration(a)
                    free[r] = stop
                timeline[r].append((start, stop, a))
                end.setdefault(a, stop)
                if rendezvous and a.kind != "U":
                    last_fb[r], pending[r] = (a.kind, stop), sum(abs(c - r) == 1 for c, _ in sends[a.kind][r])
                elif rendezvous and allreduce is None:
                    last_fb[r] = None
                for c, k in (sends[a.kind][r] if a.kind != "U" else ()):
                    if rendezvous and abs(c - r) == 1:
                        continue                  # crosses when the neighbour posts its receive (above)
                    there = max(stop, link_free[k]) + seconds[k]
                    link_free[k] = inbox[c][a] = there
                    if blocking:
                        free[r] = max(free[r], there)
                ptr[r] += 1
                progress = True
    blocked = [list(actions[r][ptr[r]:]) for r in range(d)]
    waits = {r: [dep for dep, _ in deps_of(blocked[r][0]) if dep not in end]
             for r in range(d) if blocked[r]}
    return _Run(timeline, blocked, waits)


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
        batch_end: per batch, when its last U ends (over all ranks).
    """

    makespan: float
    timeline: list[list[tuple[float, float, Action]]]
    busy: list[float]
    bubble_fraction: float
    peak_in_flight: list[int]
    peak_versions: list[int]
    batch_end: list[float] = field(default_factory=list)


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
             bwd_time: Sequence[float] | float = 2.0, comm_time: Sequence[float] | float = 0.0,
             update_time: Sequence[float] | float = 0.0, *, schedule: str | None = None,
             num_microbatches: int | None = None,
             allreduce_time: Sequence[float] | float | None = None,
             blocking_sends: bool = False, rendezvous: bool = False) -> SimResult:
    """Run a schedule on an event-driven clock (no devices).

    Each rank runs its list in order; an action starts when its rank is free
    and its inputs are ready: ``F(c, i)`` after every producer's ``F(p, i)``
    output has crossed link p -> c; ``B(p, i)`` after ``F(p, i)`` and after every
    consumer's ``B(c, i)`` gradient has crossed back c -> p (none where the pair's
    time is ``(t, 0.0)``: only bool or integer values, no gradient). With one number or
    one per boundary, the producers of stage s are s-1 (boundary k is the pair
    k -> k+1); a d x d table ``comm_time[p][c]`` (None: p sends c nothing) adds
    skips, each on its own link, so a value sent 0 -> 2 never occupies 1 -> 2.
    A crossing takes its link's one-way time (each directed link carries one
    tensor at a time in its sender's order, so a link slower than the compute
    becomes the bottleneck). Without ``allreduce_time``, ``U``
    runs on its rank in order. With it, ``U(b)`` of stage s runs on the stage's
    update lane: the gradient all-reduce (``allreduce_time[s]``) and then the
    step start after the stage's last backward of batch b and do not hold the
    rank; an F/B that needs weight version v waits for the ``U`` creating it.
    So 2bw overlaps the all-reduce with the next batch, flush and gpipe wait.
    Sends overlap the sender's next action (fxpipe's runtime posts them
    asynchronously); with ``blocking_sends`` the sender waits until its tensor
    has crossed, as in a runtime whose send blocks (Megatron-LM's p2p, the code
    PipeDream-2BW ran), so every transfer adds to its sender's time (a stage
    sending to several consumers waits for the last to arrive).

    Example (flush, d=2, m=1, comm 0.5)::

        0F0 [0,1]   1F0 [1.5,2.5]   1B0 [2.5,4.5]   0B0 [5,7]

    Example (flush, d=3, m=1, F=1 B=2, table ``[[None, 1, 5], [None, None, 1], [None] * 3]``,
    a skip 0 -> 2 taking 5)::

        0F0 [0,1]   1F0 [2,3]   2F0 [6,7] (the skip lands at 1 + 5)   2B0 [7,9]
        1B0 [10,12]  0B0 [14,16] (1B0's gradient lands at 13, the skip's at 9 + 5)

    Args:
        actions: one action list per rank (rank == stage).
        fwd_time: forward time per microbatch, one number or one per stage.
        bwd_time: backward time per microbatch, one number or one per stage.
        comm_time: one-way transfer seconds: one number or one per boundary (d - 1), or a d x d
            table ``comm_time[p][c]`` of what stage p sends stage c (p < c; None where p sends c nothing);
            a time may be a pair (forward, gradient seconds), a 0-second gradient meaning none is sent
            (a bool or integer value): then ``B(p, i)`` does not wait for ``B(c, i)``.
        update_time: optimizer step time, one number or one per stage.
        schedule: weight semantics for ``peak_versions`` and the version waits (see
            :func:`weight_version`); ``None`` infers ``"2bw"`` if some rank
            runs a forward of batch ``b+1`` before its ``U(b)``, else ``"flush"``.
        num_microbatches: ``m``; ``None`` infers it as forwards / updates on rank 0.
        allreduce_time: data-parallel all-reduce seconds per stage (or one number), or None.
        blocking_sends: a sending rank waits for its transfer (default False: sends overlap).
        rendezvous: with ``blocking_sends``, a transfer also waits for its receiver to post the
            receive, as NCCL point-to-point does: together with the receiver's own sends when its
            next F/B is of the other kind (Megatron's combined send_forward_recv_backward), else
            after they have crossed (send_forward, then recv_forward: warm-up, cool-down, gpipe).

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
    fwd = per_stage(fwd_time, d, "fwd_time")
    bwd = per_stage(bwd_time, d, "bwd_time")
    upd = per_stage(update_time, d, "update_time")
    links = comm_links(comm_time, d)
    ar = None if allreduce_time is None else per_stage(allreduce_time, d, "allreduce_time")
    m = num_microbatches if num_microbatches is not None else _infer_m(actions)
    sched = schedule if schedule is not None else _infer_schedule(actions, m)
    if rendezvous and not blocking_sends:
        raise ScheduleError("rendezvous=True prices NCCL-style sends that wait for their receiver, so it needs "
                            "blocking_sends=True; pass both, or neither for fxpipe's asynchronous sends")
    run = _run(actions, fwd, bwd, links, upd, ar, sched, m, blocking_sends, rendezvous)
    if any(run.blocked):
        raise ScheduleError(_deadlock_message(actions, run))
    busy = [sum(e - s for s, e, a in row if ar is None or a.kind != "U") for row in run.timeline]
    makespan = run.makespan
    bubble = 1.0 - sum(busy) / (d * makespan) if makespan > 0 else 0.0
    update_end: dict[int, float] = {}
    for row in run.timeline:
        for _, e, a in row:
            if a.kind == "U":
                update_end[a.microbatch] = max(update_end.get(a.microbatch, 0.0), e)
    return SimResult(
        makespan=makespan,
        timeline=run.timeline,
        busy=busy,
        bubble_fraction=bubble,
        peak_in_flight=[_peak_in_flight(row) for row in actions],
        peak_versions=[max((len(alive) for _, alive in _live_versions(row, sched, m)), default=1)
                       for row in actions],
        batch_end=[update_end[b] for b in sorted(update_end)],
    )


_SIM_MAX_SLOTS = 512       # d * m above which steady_batch_time extrapolates from two short batches


def steady_batch_time(plan: Any, allreduce: Sequence[float] | None = None, *,
                      microbatches_per_flush: int | None = None, batches: int = 4,
                      comm: Sequence[Any] | None = None, blocking_sends: bool = False,
                      rendezvous: bool = False, overlap_allreduce: bool = True,
                      _exact: bool = False) -> tuple[float, float]:
    """(seconds per batch in steady state, exposed all-reduce seconds) of a Plan's schedule.

    Runs ``batches`` batches of ``plan.schedule`` through :func:`simulate` with each
    stage's F_s and B_s (+F_s when it recomputes), each transfer p -> c of
    :meth:`~fxpipe.ir.Plan.transfers` on its own link, taking its share of C_c by bytes
    (:func:`~fxpipe.runtime.links.plan_links`: C_c prices receiving the inputs and sending the
    gradients of the floating ones back, so the gradient c -> p carries only the bytes of
    :meth:`~fxpipe.ir.Plan.gradient_transfers`, none for bool or integer values; a plan without
    ``received_from`` sends all of X_{k+1} over boundary k, each way), and the stages'
    all-reduce seconds on the update lanes; the answer is
    the spacing of batches n-3 and n-2's ends (past the fill, before the drain). When
    2bw's all-reduce outlasts a batch, the stream stalls and refills: about the
    all-reduce plus a fill. Exposed all-reduce = that time minus
    the same run without all-reduce.

    Args:
        plan: a :class:`~fxpipe.ir.Plan` (its stages, num_microbatches, schedule).
        allreduce: seconds per stage, or None (no data parallelism).
        microbatches_per_flush: gpipe only: g microbatches per flush (several flushes per batch).
        batches: batches simulated (>= 3).
        comm: one-way seconds per boundary (d - 1), or a d x d table ``comm[p][c]`` (see
            :func:`simulate`); default: from the plan, as above.
        blocking_sends: a sender waits for its transfer (see :func:`simulate`).
        rendezvous: and the transfer waits for its receiver (see :func:`simulate`).
        overlap_allreduce: False holds each rank for its all-reduce and step after its last backward of a
            batch, as the paper's code does (all-reduce, synchronize, step), so 2bw no longer hides it.

    Long batches (d·m > 512) are priced from two simulated batches of k and 2k
    microbatches (the period per microbatch is steady), gpipe with g < m from one flush of g.
    """
    import dataclasses

    from fxpipe.runtime.schedules import build_schedule

    d, m = plan.num_stages, plan.num_microbatches
    n = max(3, batches)
    g = microbatches_per_flush
    if plan.schedule == "gpipe" and g is not None and g < m:
        # flushes of g serialize: price one flush of g per batch, m / g of them, then the all-reduce
        one = dataclasses.replace(plan, num_microbatches=g)
        t1, exp1 = steady_batch_time(one, allreduce, batches=batches, comm=comm, blocking_sends=blocking_sends,
                                     rendezvous=rendezvous, overlap_allreduce=overlap_allreduce)
        return -(-m // g) * (t1 - exp1) + exp1, exp1
    if plan.schedule != "gpipe" and d * m > _SIM_MAX_SLOTS and not _exact and m > 2 * max(d, 4):
        # long batches: the per-microbatch period is steady; simulate two short batches, extrapolate
        k = min(max(d, 4, _SIM_MAX_SLOTS // (2 * d)), m // 2)
        t_a, exp_a = steady_batch_time(dataclasses.replace(plan, num_microbatches=k), allreduce,
                                       batches=batches, comm=comm, blocking_sends=blocking_sends,
                                       rendezvous=rendezvous, overlap_allreduce=overlap_allreduce, _exact=True)
        t_b, _ = steady_batch_time(dataclasses.replace(plan, num_microbatches=2 * k), None,
                                   batches=batches, comm=comm, blocking_sends=blocking_sends,
                                   rendezvous=rendezvous, _exact=True)
        base_a = t_a - exp_a
        base = base_a + (m - k) * (t_b - base_a) / k
        t = max(base, t_a) if plan.schedule == "2bw" and overlap_allreduce else base + exp_a
        return t, max(0.0, t - base)
    acts = build_schedule(plan.schedule, d, m, n, microbatches_per_flush=microbatches_per_flush)
    fwd = [st.fwd_time for st in plan.stages]
    bwd = [st.bwd_time + (st.fwd_time if st.recompute else 0.0) for st in plan.stages]
    if comm is None:
        comm = plan_links(plan)

    def spacing(ar: Sequence[float] | None) -> float:
        lane = list(ar) if ar is not None else [0.0] * d     # on the update lane, or on the rank
        sim = simulate(acts, fwd, bwd, comm, 0.0 if overlap_allreduce else lane, schedule=plan.schedule,
                       num_microbatches=m, allreduce_time=lane if overlap_allreduce else None,
                       blocking_sends=blocking_sends, rendezvous=rendezvous)
        return sim.batch_end[n - 2] - sim.batch_end[n - 3]    # steady: past the fill, before the drain

    base = spacing(None)
    if allreduce is None or not any(allreduce):
        return base, 0.0
    t = spacing(allreduce)
    return t, max(0.0, t - base)


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


