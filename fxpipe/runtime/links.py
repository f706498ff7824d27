"""The links a simulated pipeline sends over: one per (producer stage, consumer stage) pair and direction.

A pipeline whose stages talk only to their neighbours has d - 1 of them (boundary k is the
pair k -> k+1); a skip adds its own, e.g. d = 3 with a value made on stage 0 and read on 2::

    stage 0 ──(0,1)──▶ stage 1 ──(1,2)──▶ stage 2       the gradients go back on the reverse
       └───────────────(0,2)───────────────▶┘           links, 2 -> 1, 1 -> 0 and 2 -> 0

so the skip's transfer takes the time of link (0, 2) and never waits behind boundary 1's.
:func:`comm_links` reads :func:`~fxpipe.runtime.simulate.simulate`'s ``comm_time`` (one
number, one per boundary, or a d x d table) into ``{(p, c): one-way seconds}``;
:func:`plan_links` makes that table from a :class:`~fxpipe.ir.Plan`.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

from fxpipe.errors import ScheduleError

__all__ = ["Links", "per_stage", "chain_links", "comm_links", "plan_links"]

Links = dict[tuple[int, int], float]     # (producer stage p, consumer stage c), p < c -> one-way seconds


def per_stage(value: Sequence[float] | float, d: int, name: str) -> list[float]:
    """``value`` as ``d`` numbers >= 0 (one number is repeated).

    Raises:
        ScheduleError: the wrong number of entries, or one negative or NaN.
    """
    if isinstance(value, (int, float)):
        values = [float(value)] * d
    else:
        values = [float(v) for v in value]
        if len(values) != d:
            raise ScheduleError(f"{name} has {len(values)} entries but the schedule has {d} stages")
    if any(v < 0 or v != v for v in values):
        raise ScheduleError(f"{name} must be >= 0 (and not NaN), got {values}")
    return values


def chain_links(d: int, comm: float | Sequence[float]) -> Links:
    """The links of ``d`` stages that talk only to their neighbours: boundary k is (k, k+1), ``comm``
    one number or one per boundary (not checked: see :func:`comm_links`)."""
    per = [float(comm)] * max(d - 1, 0) if isinstance(comm, (int, float)) else [float(c) for c in comm]
    return {(k, k + 1): per[k] for k in range(d - 1)}


def comm_links(comm: Any, d: int) -> Links:
    """The links of ``simulate``'s ``comm_time``: one number, one per boundary, or a d x d table
    ``comm[p][c]`` (None where p sends c nothing; p >= c must be None or 0).

    Raises:
        ScheduleError: a negative or NaN time, the wrong length or shape, or a time at p >= c.
    """
    if isinstance(comm, (int, float)):
        return chain_links(d, per_stage(comm, 1, "comm_time")[0])
    rows = list(comm)
    if not any(hasattr(row, "__len__") for row in rows):          # numbers, one per boundary
        return chain_links(d, per_stage(rows, max(d - 1, 0), "comm_time"))
    if len(rows) != d or any(not hasattr(row, "__len__") or len(row) != d for row in rows):
        raise ScheduleError(f"comm_time as a table must be {d} x {d} (comm_time[p][c]: what stage p sends "
                            f"stage c), got {[len(r) if hasattr(r, '__len__') else r for r in rows]} "
                            "as its rows' lengths")
    links: Links = {}
    for p, row in enumerate(rows):
        for c, t in enumerate(list(row)):
            if t is None:
                continue
            if isinstance(t, bool) or not isinstance(t, Real) or t != t or t < 0:
                raise ScheduleError(f"comm_time[{p}][{c}] must be seconds >= 0 or None (no transfer), got {t!r}")
            if c <= p:
                if t:
                    raise ScheduleError(
                        f"comm_time[{p}][{c}] = {t!r}, but only p < c send (forward); the gradient of "
                        f"comm_time[{c}][{p}] goes back on its reverse link. Put 0 or None at p >= c")
                continue
            links[p, c] = float(t)
    return links


def plan_links(plan: Any) -> list[list[float | None]]:
    """``comm[p][c]`` of a plan's :meth:`~fxpipe.ir.Plan.transfers`: C_c / 2 split over the producers
    of stage c in proportion to their bytes (evenly when X_c = 0), e.g. C_2 = 8 s with X_2 = 30 B from
    stage 1 and 10 B from stage 0: 3 s on 1 -> 2 and 1 s on 0 -> 2. A plan without ``received_from``
    gets C_{k+1} / 2 on each boundary k, as before skips had links of their own."""
    d = plan.num_stages
    table: list[list[float | None]] = [[None] * d for _ in range(d)]
    into: dict[int, dict[int, int]] = {}
    for (p, c), nbytes in plan.transfers().items():
        into.setdefault(c, {})[p] = nbytes
    for c, senders in into.items():
        total = sum(senders.values())
        for p, nbytes in senders.items():
            table[p][c] = plan.stages[c].comm_time / 2 * (nbytes / total if total else 1 / len(senders))
    return table
