"""SVG charts of a Plan: time and memory bars per stage, the schedule's timeline, and all three together.

Pure Python on a :class:`~fxpipe.ir.Plan` alone; :mod:`fxpipe.render` embeds them
in its HTML report and falls back to :func:`plan_svg` when Graphviz is missing.
"""

from __future__ import annotations

import html
from typing import Sequence

from fxpipe.ir import Plan
from fxpipe.report import stage_breakdown
from fxpipe.units import fmt_bytes, fmt_time

__all__ = ["stage_bars_svg", "memory_bars_svg", "timeline_svg", "plan_svg", "stage_colour", "esc"]

# Stage colours (fill, border): a qualitative palette that cycles after 12 stages.
_PALETTE = [("#cfe2ff", "#1f5fbf"), ("#d1f2d9", "#1e7b3a"), ("#ffe5c2", "#b35c00"), ("#ecd9fb", "#6a2fa0"),
            ("#fbd5e0", "#a3204a"), ("#d2f1f4", "#137783"), ("#f4efc4", "#7d6d00"), ("#e3e3e3", "#555555"),
            ("#ffd8cc", "#b3300d"), ("#dbe7c6", "#4d6b12"), ("#d6dcf5", "#2c3f8f"), ("#f5d6ef", "#8c2a79")]
_KIND_COLOURS = {"F": "#4c8fdb", "B": "#2e9d57", "U": "#8a8a8a", "R": "#e39b2d", "C": "#b07ad6"}


def _stage_colour(s: int) -> tuple[str, str]:
    return _PALETTE[s % len(_PALETTE)]


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


stage_colour = _stage_colour
esc = _esc


# --------------------------------------------------------------------------- SVG charts

_FONT = 'font-family="Helvetica, Arial, sans-serif"'


def _svg(width: int, height: int, body: list[str], label: str, top: int = 0) -> str:
    """An <svg> element showing ``body`` from y=``top`` down (top > 0 crops an unused heading band)."""
    h = height - top
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" '
            f'viewBox="0 {top} {width} {h}" role="img" aria-label="{_esc(label)}" {_FONT} font-size="12">\n'
            + "\n".join(body) + "\n</svg>")


def _legend(items: Sequence[tuple[str, str]], x: float, y: float) -> list[str]:
    out = []
    for name, colour in items:
        out.append(f'<rect x="{x:.1f}" y="{y - 10:.1f}" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{x + 16:.1f}" y="{y:.1f}">{_esc(name)}</text>')
        x += 22 + 7.5 * len(name)
    return out


def stage_bars_svg(plan: Plan, width: int = 900, heading: bool = True) -> str:
    """Per-stage time per microbatch as stacked horizontal bars (F, B, recompute, comm).

    A dashed line marks the lower bound; the bottleneck stage is labelled.
    """
    parts = stage_breakdown(plan)
    left, right, row = 80, 190, 26
    height = 60 + row * len(parts) + 30
    scale_max = max([p.time for p in parts] + [plan.lower_bound, 1e-30])
    plot = width - left - right
    body = ['<text x="0" y="16" font-size="14" font-weight="bold">Time per microbatch by stage</text>'
            ] if heading else []
    body += _legend([("forward", _KIND_COLOURS["F"]), ("backward", _KIND_COLOURS["B"]),
                     ("recompute", _KIND_COLOURS["R"]), ("comm", _KIND_COLOURS["C"])], left, 40)
    worst = max(parts, key=lambda p: p.time).index if parts else -1
    for i, p in enumerate(parts):
        y = 54 + i * row
        body.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">stage {p.index}</text>')
        x = float(left)
        for name, value, key in (("forward", p.fwd, "F"), ("backward", p.bwd, "B"),
                                 ("recompute", p.recompute, "R"), ("comm", p.comm, "C")):
            w = plot * value / scale_max
            if w > 0:
                body.append(f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{row - 6}" '
                            f'fill="{_KIND_COLOURS[key]}"><title>stage {p.index} {name}: '
                            f'{_esc(fmt_time(value))}</title></rect>')
            x += w
        note = " bottleneck" if p.index == worst else ""
        weight = ' font-weight="bold"' if note else ""
        body.append(f'<text x="{left + plot + 8}" y="{y + 15}"{weight}>{_esc(fmt_time(p.time))}{note}</text>')
    if plan.lower_bound > 0:
        lx = left + plot * plan.lower_bound / scale_max
        y1 = 54 + row * len(parts)
        body.append(f'<line x1="{lx:.2f}" y1="48" x2="{lx:.2f}" y2="{y1}" stroke="#222" '
                    'stroke-dasharray="5,4" stroke-width="1.5"/>')
        body.append(f'<text x="{lx:.2f}" y="{y1 + 16}" text-anchor="middle" font-size="11">lower bound '
                    f'{_esc(fmt_time(plan.lower_bound))}</text>')
    return _svg(width, height, body, "time per microbatch by stage", 0 if heading else 24)


def memory_bars_svg(plan: Plan, width: int = 900, heading: bool = True) -> str:
    """Per-stage predicted peak memory (weights + stashed activations) against the memory limit."""
    parts = stage_breakdown(plan)
    left, right, row = 80, 190, 26
    height = 60 + row * len(parts) + 30
    limit = plan.memory_limit or 0
    scale_max = max([p.memory for p in parts] + [limit, 1]) * 1.02
    plot = width - left - right
    body = ['<text x="0" y="16" font-size="14" font-weight="bold">Predicted peak memory by stage</text>'
            ] if heading else []
    body += _legend([("weights, grads, optimizer", "#5b7db1"), ("stashed activations", "#e0a458")]
                    + ([("over limit", "#d62728")] if limit else []), left, 40)
    for i, p in enumerate(parts):
        y = 54 + i * row
        over = bool(limit) and p.memory > limit
        stroke = ' stroke="#d62728" stroke-width="2"' if over else ""
        red = ' fill="#d62728"' if over else ""
        body.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">stage {p.index}</text>')
        x = float(left)
        for name, value, colour in (("weights", p.weights, "#5b7db1"), ("stash", p.stash, "#e0a458")):
            w = plot * value / scale_max
            if w > 0:
                body.append(f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{row - 6}" fill="{colour}"'
                            f'{stroke}>'
                            f'<title>stage {p.index} {name}: {_esc(fmt_bytes(value))}</title></rect>')
            x += w
        body.append(f'<text x="{left + plot + 8}" y="{y + 15}"{red}>'
                    f'{_esc(fmt_bytes(p.memory))}{" over limit" if over else ""}</text>')
    if limit:
        lx = left + plot * limit / scale_max
        y1 = 54 + row * len(parts)
        body.append(f'<line x1="{lx:.2f}" y1="48" x2="{lx:.2f}" y2="{y1}" stroke="#d62728" '
                    'stroke-dasharray="6,4" stroke-width="2"/>')
        body.append(f'<text x="{lx:.2f}" y="{y1 + 16}" text-anchor="middle" font-size="11" fill="#d62728">'
                    f'memory limit {_esc(fmt_bytes(limit))}</text>')
    else:
        body.append(f'<text x="{left}" y="{height - 8}" font-size="11" fill="#555">no memory limit given</text>')
    return _svg(width, height, body, "predicted peak memory by stage", 0 if heading else 24)


def _simulate(plan: Plan, num_batches: int):
    from fxpipe.runtime.schedules import build_schedule
    from fxpipe.runtime.simulate import simulate

    d, m = plan.num_stages, plan.num_microbatches
    actions = build_schedule(plan.schedule, d, m, num_batches)
    # C_s is charged on the stage itself (half with F, half with B), as in T_s.
    fwd = [s.fwd_time + s.comm_time / 2 for s in plan.stages]
    bwd = [s.bwd_time + (s.fwd_time if s.recompute else 0.0) + s.comm_time / 2 for s in plan.stages]
    return simulate(actions, fwd, bwd, 0.0, 0.0, schedule=plan.schedule, num_microbatches=m)


def timeline_svg(plan: Plan, num_batches: int = 2, width: int = 1200, heading: bool = True) -> str:
    """The schedule as a rank x time Gantt chart of F/B/U actions, simulated with the plan's stage times.

    Forward and backward boxes are shaded by batch and labelled with the
    microbatch when there is room; recomputation is drawn inside B boxes.
    """
    from fxpipe.errors import ScheduleError

    try:
        sim = _simulate(plan, num_batches)
    except ScheduleError as e:
        first = str(e).splitlines()[0]
        return _svg(width, 40, [f'<text x="0" y="24" fill="#d62728">schedule timeline unavailable: '
                                f'{_esc(first)}</text>'], "schedule timeline")
    d, m = plan.num_stages, plan.num_microbatches
    left, right, row, top = 70, 20, 28, 56
    plot = width - left - right
    span = sim.makespan or 1.0
    height = top + row * d + 44
    caption = (f"Schedule timeline: {plan.schedule}, {d} stages x {m} microbatches x {num_batches} batches "
               "(simulated)")
    body = [f'<text x="0" y="16" font-size="14" font-weight="bold">{_esc(caption)}</text>'] if heading else []
    body += _legend([("F forward", _KIND_COLOURS["F"]), ("B backward", _KIND_COLOURS["B"]),
                     ("recompute (in B)", _KIND_COLOURS["R"]), ("U update", _KIND_COLOURS["U"])], left, 40)
    for r in range(d):
        y = top + r * row
        body.append(f'<text x="{left - 8}" y="{y + 17}" text-anchor="end">stage {r}</text>')
        body.append(f'<rect x="{left}" y="{y}" width="{plot}" height="{row - 4}" fill="#f4f4f4"/>')
        st = plan.stages[r]
        for start, stop, a in sim.timeline[r]:
            x, w = left + plot * start / span, max(plot * (stop - start) / span, 0.8 if stop > start else 1.5)
            batch = a.microbatch if a.kind == "U" else a.microbatch // m
            opacity = 1.0 if batch % 2 == 0 else 0.65
            body.append(f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{row - 4}" '
                        f'fill="{_KIND_COLOURS[a.kind]}" fill-opacity="{opacity}" stroke="#fff" '
                        f'stroke-width="0.5"><title>{a} ({a.kind} of stage {r}, '
                        f'{"batch" if a.kind == "U" else "microbatch"} {a.microbatch}): '
                        f'{_esc(fmt_time(start))} .. {_esc(fmt_time(stop))}</title></rect>')
            if a.kind == "B" and st.recompute and stop > start:
                rw = w * st.fwd_time / (stop - start)
                body.append(f'<rect x="{x:.2f}" y="{y + row - 10}" width="{rw:.2f}" height="5" '
                            f'fill="{_KIND_COLOURS["R"]}"/>')
            text = f"{a.kind}{a.microbatch}"
            if w >= 7 * len(text) + 2:
                body.append(f'<text x="{x + w / 2:.2f}" y="{y + 16}" text-anchor="middle" fill="#fff" '
                            f'font-size="10">{text}</text>')
    y_axis = top + row * d + 6
    for k in range(6):
        t = span * k / 5
        x = left + plot * k / 5
        body.append(f'<line x1="{x:.2f}" y1="{top - 4}" x2="{x:.2f}" y2="{y_axis}" stroke="#ccc" '
                    'stroke-width="0.5"/>')
        anchor = "start" if k == 0 else ("end" if k == 5 else "middle")
        body.append(f'<text x="{x:.2f}" y="{y_axis + 14}" text-anchor="{anchor}" font-size="10">'
                    f'{_esc(fmt_time(t))}</text>')
    body.append(f'<text x="{left}" y="{y_axis + 32}" font-size="11" fill="#333">makespan '
                f'{_esc(fmt_time(sim.makespan))}, bubble {sim.bubble_fraction * 100:.1f}%, peak in-flight '
                f'microbatches per stage {sim.peak_in_flight}</text>')
    return _svg(width, height, body, "schedule timeline", 0 if heading else 24)


def plan_svg(plan: Plan, title: str | None = None, num_batches: int = 2) -> str:
    """One standalone SVG: header, stage time bars, memory bars and the schedule timeline.

    This is what ``fxpipe dump --format svg`` writes when Graphviz is not installed.
    """
    width = 1200
    pieces = [stage_bars_svg(plan, width), memory_bars_svg(plan, width), timeline_svg(plan, num_batches, width)]
    heights = [int(p.split('height="', 1)[1].split('"', 1)[0]) for p in pieces]
    head = title or "fxpipe plan"
    summary = (f"{plan.num_stages} stages, {plan.schedule}, {plan.num_microbatches} microbatches; bottleneck "
               f"{fmt_time(plan.bottleneck)}, lower bound {fmt_time(plan.lower_bound)}, gap "
               f"{plan.gap * 100:.2f}%, solver {plan.solver} {plan.solve_time:.2f} s")
    body = [f'<rect width="{width + 20}" height="{sum(heights) + 110}" fill="#fff"/>',
            f'<text x="10" y="24" font-size="18" font-weight="bold">{_esc(head)}</text>',
            f'<text x="10" y="44" font-size="12">{_esc(summary)}</text>']
    y = 64
    for p, h in zip(pieces, heights):
        body.append(f'<g transform="translate(10,{y})">')
        body.append(p.replace('xmlns="http://www.w3.org/2000/svg" ', ""))
        body.append("</g>")
        y += h + 20
    return _svg(width + 20, y, body, head)
