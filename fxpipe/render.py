"""Draw a Plan: Graphviz DOT of the staged graph, SVG charts, and one self-contained HTML report.

Everything here is pure Python and works on a :class:`~fxpipe.ir.Plan` alone;
the DOT view also takes the graph's data-flow edges (``graph_edges(gm)``)::

    plan, cg = fxpipe.api._plan(...)                    # or fxpipe.plan + prepare
    dot = to_dot(plan, graph_edges(cg.gm), node_labels(cg.gm))
    svg = dot_to_svg(dot) or plan_svg(plan)             # no `dot` binary: charts only
    html = to_html(plan, graph_edges(cg.gm), title="gpt2-small")

A DOT graph has one cluster per stage (``cluster_stage<s>``), cut edges in bold
red labelled with the bytes they carry, and recomputing stages drawn with a
dashed border and "recompute" in their label.  Graphs larger than
``max_nodes`` are collapsed: each stage shows only the nodes on cut edges plus
one summary node::

    stage 0                 stage 1
    ┌──────────────────┐    ┌──────────────────┐
    │ [stage 0: 180 n] │    │ [stage 1: 190 n] │
    │        │         │    │        │         │
    │     h_5_add ─────┼─6MiB─▶ h_6_ln_1       │
    └──────────────────┘    └──────────────────┘
"""

from __future__ import annotations

import html
import shutil
import subprocess
from typing import Mapping, Sequence

import torch
import torch.fx

from fxpipe.ir import META_COST, META_VAL, Plan
from fxpipe.report import fmt_bytes, fmt_time, stage_breakdown

__all__ = [
    "Edge",
    "graph_edges",
    "node_labels",
    "to_dot",
    "dot_to_svg",
    "has_dot",
    "stage_bars_svg",
    "memory_bars_svg",
    "timeline_svg",
    "plan_svg",
    "to_html",
]

Edge = tuple[str, str, int]          # (producer, consumer, bytes the producer's output holds)

_COMPUTE_OPS = ("call_function", "call_method", "call_module")
# Stage colours (fill, border): a qualitative palette that cycles after 12 stages.
_PALETTE = [("#cfe2ff", "#1f5fbf"), ("#d1f2d9", "#1e7b3a"), ("#ffe5c2", "#b35c00"), ("#ecd9fb", "#6a2fa0"),
            ("#fbd5e0", "#a3204a"), ("#d2f1f4", "#137783"), ("#f4efc4", "#7d6d00"), ("#e3e3e3", "#555555"),
            ("#ffd8cc", "#b3300d"), ("#dbe7c6", "#4d6b12"), ("#d6dcf5", "#2c3f8f"), ("#f5d6ef", "#8c2a79")]
_KIND_COLOURS = {"F": "#4c8fdb", "B": "#2e9d57", "U": "#8a8a8a", "R": "#e39b2d", "C": "#b07ad6"}


def _stage_colour(s: int) -> tuple[str, str]:
    return _PALETTE[s % len(_PALETTE)]


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


# --------------------------------------------------------------------------- graph edges


def _value_bytes(node: torch.fx.Node) -> int:
    cost = node.meta.get(META_COST)
    if cost is not None and getattr(cost, "output_bytes", 0):
        return int(cost.output_bytes)
    total = 0
    for v in torch.utils._pytree.tree_leaves(node.meta.get(META_VAL)):
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


def graph_edges(gm: torch.fx.GraphModule) -> list[Edge]:
    """Data-flow edges between compute nodes, with the bytes each producer outputs.

    Args:
        gm: a traced graph; sizes come from ``node.meta["fxpipe.cost"].output_bytes``
            (annotate) or else from ``node.meta["val"]`` (shape_prop), else 0.

    Returns:
        ``[(producer, consumer, bytes), ...]`` in graph order; placeholders,
        get_attr and output nodes are left out (the Plan lists compute nodes only).
    """
    compute = {n.name for n in gm.graph.nodes if n.op in _COMPUTE_OPS}
    out: list[Edge] = []
    for n in gm.graph.nodes:
        if n.op not in _COMPUTE_OPS:
            continue
        nbytes = _value_bytes(n)
        for u in n.users:
            if u.name in compute:
                out.append((n.name, u.name, nbytes))
    return out


def node_labels(gm: torch.fx.GraphModule) -> dict[str, str]:
    """``name -> "name\\nop"`` for compute nodes (op: module type, function or method name)."""
    labels: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op not in _COMPUTE_OPS:
            continue
        if n.op == "call_module":
            try:
                what = type(gm.get_submodule(str(n.target))).__name__
            except AttributeError:
                what = str(n.target)
        elif n.op == "call_method":
            what = f".{n.target}"
        else:
            what = getattr(n.target, "__name__", str(n.target))
        labels[n.name] = f"{n.name}\n{what}"
    return labels


# --------------------------------------------------------------------------- DOT


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _edge_bytes(plan: Plan, edges: Sequence[Edge] | None) -> dict[tuple[str, str], int]:
    sizes = {(u, v): b for u, v, b in (edges or ())}
    for u, v in plan.cut_edges:
        sizes.setdefault((u, v), -1)   # -1: size unknown (no graph given)
    return sizes


def to_dot(plan: Plan, edges: Sequence[Edge] | None = None, labels: Mapping[str, str] | None = None, *,
           max_nodes: int = 400, title: str | None = None) -> str:
    """A Graphviz ``digraph`` of the graph, one cluster per stage.

    Args:
        plan: the plan (node names per stage, cut edges, recompute flags).
        edges: data-flow edges ``(u, v, bytes)`` (see :func:`graph_edges`); None draws
            only the plan's cut edges, without sizes.
        labels: node name -> label text (default: the name).
        max_nodes: above this many nodes each stage is collapsed to its cut-edge
            nodes plus a summary node.
        title: graph label.

    Returns:
        DOT text starting with ``digraph``.
    """
    stage_of = plan.stage_of()
    sizes = _edge_bytes(plan, edges)
    cut = {(u, v) for (u, v) in sizes if u in stage_of and v in stage_of and stage_of[u] != stage_of[v]}
    cut |= {tuple(e) for e in plan.cut_edges if e[0] in stage_of and e[1] in stage_of}  # type: ignore[misc]
    total = sum(len(s.nodes) for s in plan.stages)
    collapsed = total > max_nodes
    labels = dict(labels or {})
    shown: dict[int, list[str]] = {}
    for s in plan.stages:
        if collapsed:
            ends = {u for u, _ in cut} | {v for _, v in cut}
            shown[s.index] = [n for n in s.nodes if n in ends]
        else:
            shown[s.index] = list(s.nodes)
    heading = (f"{title or 'fxpipe plan'}: {plan.num_stages} stages, {plan.schedule}, "
               f"bottleneck {fmt_time(plan.bottleneck)}")
    if collapsed:
        heading += f" ({total} nodes; stage interiors collapsed)"
    out = ["digraph fxpipe {",
           f"  graph [label={_q(heading)}, labelloc=t, fontname=\"Helvetica\", fontsize=14, rankdir=TB, "
           "newrank=true, compound=true];",
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
           '  edge [color="#777777", arrowsize=0.6, fontname="Helvetica", fontsize=10];']
    for s in plan.stages:
        fill, border = _stage_colour(s.index)
        tag = " (recompute)" if s.recompute else ""
        label = (f"stage {s.index}{tag}\n{len(s.nodes)} nodes, T={fmt_time(s.time)}, "
                 f"M={fmt_bytes(s.memory)}")
        style = "dashed,rounded" if s.recompute else "rounded"
        out.append(f"  subgraph cluster_stage{s.index} {{")
        out.append(f"    label={_q(label)}; style={_q(style)}; color={_q(border)}; penwidth=2; "
                   f"fontcolor={_q(border)};")
        if collapsed:
            summary = (f"stage {s.index}{tag}: {len(s.nodes)} nodes\n"
                       f"{s.nodes[0] if s.nodes else '-'} ... {s.nodes[-1] if s.nodes else '-'}\n"
                       f"F {fmt_time(s.fwd_time)}  B {fmt_time(s.bwd_time)}  params {fmt_bytes(s.param_bytes)}")
            out.append(f"    {_q(f'stage{s.index}_summary')} [label={_q(summary)}, shape=box3d, "
                       f"fillcolor={_q(fill)}, color={_q(border)}];")
        for n in shown[s.index]:
            out.append(f"    {_q(n)} [label={_q(labels.get(n, n))}, fillcolor={_q(fill)}, color={_q(border)}];")
        out.append("  }")
    if collapsed:
        for s in plan.stages:
            node = _q(f"stage{s.index}_summary")
            members = set(s.nodes)
            entering = [v for n in shown[s.index] for (u, v) in cut if v == n and u not in members]
            leaving = [u for n in shown[s.index] for (u, v) in cut if u == n and v not in members]
            for v in dict.fromkeys(entering):
                out.append(f"  {_q(v)} -> {node} [style=dashed];")
            for u in dict.fromkeys(leaving):
                out.append(f"  {node} -> {_q(u)} [style=dashed];")
    else:
        for (u, v), _ in sizes.items():
            if (u, v) in cut or u not in stage_of or v not in stage_of:
                continue
            out.append(f"  {_q(u)} -> {_q(v)};")
    for (u, v) in sorted(cut, key=lambda e: (stage_of[e[0]], stage_of[e[1]], e)):
        b = sizes.get((u, v), -1)
        lab = f", label={_q(fmt_bytes(b))}" if b >= 0 else ""
        out.append(f"  {_q(u)} -> {_q(v)} [color=red, fontcolor=red, style=bold, penwidth=2.5{lab}];")
    out.append("}")
    return "\n".join(out) + "\n"


def has_dot() -> bool:
    """Whether the Graphviz ``dot`` binary is on PATH."""
    return shutil.which("dot") is not None


def dot_to_svg(dot: str, timeout: float = 120.0) -> str | None:
    """Lay out DOT text with Graphviz ``dot -Tsvg``.

    Returns:
        The SVG text, or None when ``dot`` is not installed or fails.
    """
    exe = shutil.which("dot")
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, "-Tsvg"], input=dot, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0 or "<svg" not in r.stdout:
        return None
    return r.stdout


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
    from fxpipe.runtime.schedules import build_schedule, simulate

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


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px 32px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 6px 0; } h2 { font-size: 17px; margin: 26px 0 8px 0;
  border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.kv { display: grid; grid-template-columns: repeat(4, auto); gap: 4px 22px; width: max-content;
  font-size: 13px; margin: 10px 0; } .kv b { color: #555; font-weight: normal; }
table { border-collapse: collapse; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.l { text-align: left; font-family: monospace; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 5px; border: 1px solid #999; }
.warn { color: #d62728; font-weight: bold; } .note { color: #555; font-size: 12px; }
.graph { max-width: 100%; overflow: auto; border: 1px solid #ddd; max-height: 900px; }
"""


def _stage_table_html(plan: Plan) -> str:
    head = ["stage", "nodes", "first node", "last node", "time/mb", "fwd", "bwd", "comm", "memory",
            "params", "in-flight", "recompute"]
    rows = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    over = set(plan.over_memory_stages)
    for s in plan.stages:
        fill, border = _stage_colour(s.index)
        mem_cls = ' class="warn"' if s.index in over or (plan.memory_limit and s.memory > plan.memory_limit) else ""
        rows.append(
            "<tr>"
            f'<td class="l"><span class="swatch" style="background:{fill};border-color:{border}"></span>'
            f"stage {s.index}</td><td>{len(s.nodes)}</td>"
            f'<td class="l">{_esc(s.nodes[0] if s.nodes else "-")}</td>'
            f'<td class="l">{_esc(s.nodes[-1] if s.nodes else "-")}</td>'
            f"<td>{_esc(fmt_time(s.time))}</td><td>{_esc(fmt_time(s.fwd_time))}</td>"
            f"<td>{_esc(fmt_time(s.bwd_time))}</td><td>{_esc(fmt_time(s.comm_time))}</td>"
            f"<td{mem_cls}>{_esc(fmt_bytes(s.memory))}</td><td>{_esc(fmt_bytes(s.param_bytes))}</td>"
            f"<td>{s.in_flight}</td><td>{'yes' if s.recompute else 'no'}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _cut_table_html(plan: Plan, edges: Sequence[Edge] | None, limit: int = 200) -> str:
    stage_of = plan.stage_of()
    sizes = _edge_bytes(plan, edges)
    cut = [tuple(e) for e in plan.cut_edges]
    if not cut:
        return '<p class="note">no cut edges (one stage)</p>'
    rows = ["<table><tr><th>from stage</th><th>producer</th><th>to stage</th><th>consumer</th>"
            "<th>bytes / microbatch</th></tr>"]
    for u, v in cut[:limit]:
        b = sizes.get((u, v), -1)
        rows.append(f'<tr><td>stage {stage_of.get(u, "?")}</td><td class="l">{_esc(u)}</td>'
                    f'<td>stage {stage_of.get(v, "?")}</td><td class="l">{_esc(v)}</td>'
                    f"<td>{_esc(fmt_bytes(b)) if b >= 0 else '?'}</td></tr>")
    rows.append("</table>")
    if len(cut) > limit:
        rows.append(f'<p class="note">... and {len(cut) - limit} more cut edges</p>')
    return "\n".join(rows)


def _strip_xml_prolog(svg: str) -> str:
    i = svg.find("<svg")
    return svg[i:] if i >= 0 else svg


def to_html(plan: Plan, edges: Sequence[Edge] | None = None, labels: Mapping[str, str] | None = None, *,
            title: str = "fxpipe plan", num_batches: int = 2, graph_svg: str | None = None,
            include_graph: bool = True, max_nodes: int = 400) -> str:
    """One self-contained HTML report (inline CSS and SVG; no scripts, no network).

    Sections: summary and stage table; time bars (F/B/recompute/comm); memory bars
    against the limit; the simulated schedule timeline; cut edges; and the staged
    graph drawn by Graphviz when ``dot`` is installed (else its DOT summary).

    Args:
        plan: the plan to show.
        edges: data-flow edges for the graph section (:func:`graph_edges`).
        labels: node labels for the graph drawing.
        title: page heading (e.g. the model name).
        num_batches: batches simulated in the timeline.
        graph_svg: a pre-rendered graph SVG to embed (skips running ``dot``).
        include_graph: draw the graph with ``dot`` when it is installed.
        max_nodes: collapse threshold passed to :func:`to_dot`.

    Returns:
        The HTML text.
    """
    gap = plan.gap * 100
    kv = [("schedule", plan.schedule), ("stages", plan.num_stages), ("microbatches", plan.num_microbatches),
          ("data parallel", plan.data_parallel),
          ("bottleneck", fmt_time(plan.bottleneck) + " / microbatch"), ("lower bound", fmt_time(plan.lower_bound)),
          ("gap", f"{gap:.2f}%" + (" (optimal)" if plan.optimal else "")),
          ("solver", f"{plan.solver}, {plan.solve_time:.2f} s"),
          ("memory limit", fmt_bytes(plan.memory_limit) if plan.memory_limit else "none"),
          ("optimizer slots", plan.optimizer_slots),
          ("cut edges", len(plan.cut_edges)),
          ("nodes", sum(len(s.nodes) for s in plan.stages))]
    if plan.microbatch_size and plan.bottleneck > 0:
        kv.append(("throughput", f"{plan.microbatch_size * plan.data_parallel / plan.bottleneck:,.1f} samples/s"))
    kv_html = "".join(f"<div><b>{_esc(k)}</b> {_esc(v)}</div>" for k, v in kv)
    warn = ""
    if plan.over_memory_stages:
        warn = (f'<p class="warn">stages {list(plan.over_memory_stages)} exceed the memory limit '
                "(baseline plan)</p>")
    if graph_svg is None and include_graph and has_dot():
        graph_svg = dot_to_svg(to_dot(plan, edges, labels, max_nodes=max_nodes))
    if graph_svg:
        graph_html = f'<div class="graph">{_strip_xml_prolog(graph_svg)}</div>'
    else:
        dot = to_dot(plan, edges, labels, max_nodes=max_nodes)
        graph_html = ('<p class="note">Graphviz <code>dot</code> is not installed; the DOT source is below '
                      '(render it with <code>dot -Tsvg</code>).</p>'
                      f'<details><summary>DOT source ({dot.count(chr(10))} lines)</summary>'
                      f"<pre>{_esc(dot)}</pre></details>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{_esc(title)}</h1>
<div class="kv">{kv_html}</div>
{warn}
<h2>Stages</h2>
{_stage_table_html(plan)}
<h2>Time per microbatch by stage</h2>
{stage_bars_svg(plan, heading=False)}
<h2>Predicted peak memory by stage</h2>
{memory_bars_svg(plan, heading=False)}
<h2>Schedule timeline ({_esc(plan.schedule)}, {num_batches} batches, simulated)</h2>
{timeline_svg(plan, num_batches, heading=False)}
<h2>Cut edges</h2>
{_cut_table_html(plan, edges)}
<h2>Graph</h2>
{graph_html}
<p class="note">Generated by fxpipe. Times are predicted by the cost model, per microbatch.</p>
</body></html>
"""

