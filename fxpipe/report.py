"""Human-readable renderings of a Plan: a text table and byte/time formatting."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fxpipe.ir import Plan

__all__ = ["plan_table", "fmt_bytes", "fmt_time", "parse_bytes"]

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def parse_bytes(text: str) -> int:
    """'16GiB' -> 17179869184; '1e9' -> 1000000000. Raises ValueError on bad text."""
    t = text.strip().lower().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * _UNITS[unit])
    return int(float(t))


def plan_table(plan: "Plan", node_names: bool = True) -> str:
    """One row per stage: nodes, first/last node, time, memory, parameters, recompute."""
    head = ["stage", "nodes", "first", "last", "time/mb", "fwd", "bwd", "comm", "memory", "params", "recompute"]
    rows = []
    for s in plan.stages:
        rows.append([str(s.index), str(len(s.nodes)), s.nodes[0] if s.nodes else "-",
                     s.nodes[-1] if s.nodes else "-", fmt_time(s.time), fmt_time(s.fwd_time),
                     fmt_time(s.bwd_time), fmt_time(s.comm_time), fmt_bytes(s.memory),
                     fmt_bytes(s.param_bytes), "yes" if s.recompute else "no"])
    if not node_names:
        head = [h for h in head if h not in ("first", "last")]
        rows = [[c for i, c in enumerate(r) if i not in (2, 3)] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    gap = plan.gap * 100
    out.append("")
    out.append(f"schedule={plan.schedule} stages={plan.num_stages} microbatches={plan.num_microbatches} "
               f"solver={plan.solver} ({'optimal' if plan.optimal else f'gap {gap:.2f}%'}, "
               f"{plan.solve_time:.2f} s)")
    out.append(f"bottleneck {fmt_time(plan.bottleneck)} per microbatch, lower bound "
               f"{fmt_time(plan.lower_bound)}"
               + (f", memory limit {fmt_bytes(plan.memory_limit)}" if plan.memory_limit else ""))
    return "\n".join(out)
