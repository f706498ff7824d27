"""Checking a schedule: every microbatch forwarded and backwarded once per rank, updates in order, weight versions."""

from __future__ import annotations

from collections.abc import Sequence

from fxpipe.errors import ScheduleError
from fxpipe.runtime.actions import Action, check_config, weight_version
from fxpipe.runtime.simulate import _deadlock_message, _live_versions, _run, render

__all__ = ["validate"]

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
    check_config(schedule, num_stages, num_microbatches, num_batches)
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
