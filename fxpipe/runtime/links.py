"""The links a simulated pipeline sends over: one per (producer stage, consumer stage) pair and direction.

A pipeline whose stages talk only to their neighbours has d - 1 of them (boundary k is the
pair k -> k+1); a skip adds its own, e.g. d = 3 with a value made on stage 0 and read on 2::

    stage 0 ──(0,1)──▶ stage 1 ──(1,2)──▶ stage 2       the gradients go back on the reverse
       └───────────────(0,2)───────────────▶┘           links, 2 -> 1, 1 -> 0 and 2 -> 0

so the skip's transfer takes the time of link (0, 2) and never waits behind boundary 1's.
A pair's time is one number (the activation p -> c, and its gradient back in the same time) or
a pair ``(forward seconds, gradient seconds)``: a bool or integer value gets no gradient (both
runtimes send gradients of floating tensors only), so a pair carrying only such values is
``(t, 0.0)``, and a 0-second gradient in a pair means no gradient is sent at all (:func:`directions`).
:func:`comm_links` reads :func:`~fxpipe.runtime.simulate.simulate`'s ``comm_time`` (one
number, one per boundary, or a d x d table) into ``{(p, c): seconds}``;
:func:`plan_links` makes that table from a :class:`~fxpipe.ir.Plan`.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

from fxpipe.errors import ScheduleError

__all__ = ["Links", "per_stage", "chain_links", "comm_links", "plan_links", "directions"]

# (producer stage p, consumer stage c), p < c -> one-way seconds, or (forward seconds, gradient seconds)
Links = dict[tuple[int, int], "float | tuple[float, float]"]


def directions(t: "float | tuple[float, float]") -> tuple[float, float | None]:
    """(forward seconds, gradient seconds or None) of a link's time: one number is both directions
    (0 too: an instant gradient still follows its backward); in a pair a 0-second gradient is None,
    no gradient sent (a bool or integer value), so the producer's backward does not wait for it."""
    if isinstance(t, (int, float)):
        return float(t), float(t)
    f, g = t
    return float(f), (float(g) if g > 0 else None)


def _is_time(t: Any) -> bool:
    return isinstance(t, Real) and not isinstance(t, bool) and t == t and t >= 0


def _seconds(t: Any, where: str, none: str = "") -> "float | tuple[float, float]":
    """A link's time checked: a number, or a (forward, gradient) pair of numbers, all >= 0."""
    if _is_time(t):
        return float(t)
    if isinstance(t, (tuple, list)) and len(t) == 2 and all(_is_time(x) for x in t):
        return float(t[0]), float(t[1])
    raise ScheduleError(f"{where} must be seconds >= 0{none} or a pair (forward seconds, gradient seconds) "
                        f"of them, got {t!r}")


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


def chain_links(d: int, comm: Any) -> Links:
    """The links of ``d`` stages that talk only to their neighbours: boundary k is (k, k+1), ``comm``
    one number or one per boundary, each a number or a (forward, gradient) pair (not checked: see
    :func:`comm_links`)."""
    per = [float(comm)] * max(d - 1, 0) if isinstance(comm, (int, float)) else \
        [c if isinstance(c, tuple) else tuple(c) if isinstance(c, list) else float(c) for c in comm]
    return {(k, k + 1): per[k] for k in range(d - 1)}


def comm_links(comm: Any, d: int) -> Links:
    """The links of ``simulate``'s ``comm_time``: one number, one per boundary, or a d x d table
    ``comm[p][c]`` (None where p sends c nothing; p >= c must be None or 0); a time per boundary or
    in the table may be a (forward seconds, gradient seconds) pair (:func:`directions`).

    Raises:
        ScheduleError: a negative or NaN time, the wrong length or shape, or a time at p >= c.
    """
    if isinstance(comm, (int, float)):
        return chain_links(d, per_stage(comm, 1, "comm_time")[0])
    rows = list(comm)
    if not any(hasattr(row, "__len__") for row in rows):          # numbers, one per boundary
        return chain_links(d, per_stage(rows, max(d - 1, 0), "comm_time"))
    if len(rows) == d - 1 and all(len(r) == 2 and all(_is_time(x) for x in r) if hasattr(r, "__len__")
                                  else _is_time(r) for r in rows):   # one per boundary, some pairs
        return chain_links(d, [_seconds(t, f"comm_time[{k}]") for k, t in enumerate(rows)])
    if len(rows) != d or any(not hasattr(row, "__len__") or len(row) != d for row in rows):
        raise ScheduleError(f"comm_time as a table must be {d} x {d} (comm_time[p][c]: what stage p sends "
                            f"stage c), got {[len(r) if hasattr(r, '__len__') else r for r in rows]} "
                            "as its rows' lengths")
    links: Links = {}
    for p, row in enumerate(rows):
        for c, t in enumerate(list(row)):
            if t is None:
                continue
            t = _seconds(t, f"comm_time[{p}][{c}]", " or None (no transfer)")
            if c <= p:
                if any(directions(t)):
                    raise ScheduleError(
                        f"comm_time[{p}][{c}] = {t!r}, but only p < c send (forward); the gradient of "
                        f"comm_time[{c}][{p}] goes back on its reverse link. Put 0 or None at p >= c")
                continue
            links[p, c] = t
    return links


def plan_links(plan: Any) -> list[list[Any]]:
    """``comm[p][c]`` of a plan's :meth:`~fxpipe.ir.Plan.transfers`: C_c split over stage c's producers
    and both directions in proportion to their bytes, forward what p sends c, back the part of it that
    gets a gradient (:meth:`~fxpipe.ir.Plan.gradient_transfers`), as C_c pays a floating value twice
    and a bool or integer value once. e.g. C_2 = 8 s with X_2 = 30 B from stage 1 and 10 B from stage 0,
    all floating: 3 s on 1 -> 2 and 1 s on 0 -> 2, each way; C_1 = 3 s for 16 B of floats and 16 B of
    int64 ids from stage 0: (2 s, 1 s). A number where the gradient carries every byte (and where
    C_c = 0); evenly when X_c = 0. A plan without ``received_from`` gets C_{k+1} / 2 on each
    boundary k, as before skips had links of their own."""
    d = plan.num_stages
    table: list[list[Any]] = [[None] * d for _ in range(d)]
    into: dict[int, dict[int, tuple[int, int]]] = {}
    grads = plan.gradient_transfers()
    for (p, c), nbytes in plan.transfers().items():
        into.setdefault(c, {})[p] = (nbytes, grads.get((p, c), nbytes))
    for c, senders in into.items():
        comm = plan.stages[c].comm_time
        half = sum(f + g for f, g in senders.values()) / 2    # X_c when every byte gets a gradient
        for p, (f, g) in senders.items():
            one = comm / 2 * (f / half if half else 1 / len(senders))
            table[p][c] = one if g == f or not comm or not half else (one, comm / 2 * (g / half))
    return table
