"""Draw a Plan: Graphviz DOT of the staged graph and one self-contained HTML report (charts: fxpipe.charts).

Everything here is pure Python and works on a :class:`~fxpipe.ir.Plan` alone;
the DOT view also takes the graph's data-flow edges (``graph_edges(gm)``)::

    r = fxpipe.plan_with_graph(model, example_inputs, num_stages=4)   # r.plan, r.gm
    dot = to_dot(r.plan, graph_edges(r.gm), node_labels(r.gm))
    svg = dot_to_svg(dot) or plan_svg(r.plan)           # no `dot` binary: charts only
    html = to_html(r.plan, graph_edges(r.gm), title="gpt2-small")

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

import shutil
import subprocess
from typing import Mapping, Sequence

import torch
import torch.fx

from fxpipe.charts import _esc, _stage_colour, memory_bars_svg, plan_svg, stage_bars_svg, timeline_svg
from fxpipe.ir import META_COST, META_VAL, Plan
from fxpipe.units import fmt_bytes, fmt_time

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

