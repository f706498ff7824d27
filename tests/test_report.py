"""Plan renderings: text table, per-stage breakdown, DOT, SVG charts and the HTML report (hand-built plans)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from fxpipe import render
from fxpipe.ir import Plan, StagePlan
from fxpipe.report import fmt_bytes, parse_bytes, plan_table, stage_breakdown
from fxpipe.runtime.schedules import build_schedule


def hand_plan(d: int = 3, per: int = 4, recompute: tuple[int, ...] = (1,), limit: int | None = 3_000_000,
              schedule: str = "2bw", m: int = 4) -> tuple[Plan, list[tuple[str, str, int]]]:
    """A chain n0..n{d*per-1} cut into d equal stages; edge i carries 4096*(i+1) bytes."""
    stages, names = [], []
    for s in range(d):
        nodes = tuple(f"n{s * per + i}" for i in range(per))
        names += nodes
        f, c, r = 1e-3 * (1 + 0.2 * s), (2e-4 if s else 0.0), s in recompute
        stages.append(StagePlan(index=s, nodes=nodes, recompute=r, time=3 * f + (f if r else 0) + c, fwd_time=f,
                                bwd_time=2 * f, comm_time=c, memory=1_000_000 * (1 + s), param_bytes=200_000,
                                activation_bytes=100_000, input_bytes=1000, in_flight=min(d - s, m)))
    cut = tuple((f"n{s * per + per - 1}", f"n{(s + 1) * per}") for s in range(d - 1))
    edges = [(names[i], names[i + 1], 4096 * (i + 1)) for i in range(len(names) - 1)]
    worst = max(st.time for st in stages)
    plan = Plan(stages=tuple(stages), num_microbatches=m, schedule=schedule, bottleneck=worst,
                lower_bound=0.9 * worst, optimal=False, solve_time=0.12, memory_limit=limit, cut_edges=cut,
                microbatch_size=8)
    return plan, edges


def test_plan_table_footer():
    plan, _ = hand_plan()
    text = plan_table(plan)
    assert text.splitlines()[0].split()[:4] == ["stage", "nodes", "first", "last"]
    assert "bottleneck 5.000 ms per microbatch (stage 1), lower bound 4.500 ms, gap 10.00%" in text
    assert "solver time 0.12 s" in text and "cut edges 2" in text and "1,600.0 samples/s" in text
    assert plan.summary() == text


def test_parse_bytes():
    assert parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("8e9") == 8_000_000_000
    assert parse_bytes(" 1.5 MB ") == 1_500_000 and parse_bytes("512") == 512
    for bad in ("lots", "-1GiB", "0", "nan", "GiB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_stage_breakdown_adds_up():
    plan, _ = hand_plan()
    for part, s in zip(stage_breakdown(plan), plan.stages):
        assert part.time == pytest.approx(s.time) and part.memory == s.memory
        assert part.weights == 3 * s.param_bytes          # 2bw, SGD: weights + grads + second version
        assert part.recompute == (s.fwd_time if s.recompute else 0.0)


def test_dot_clusters_cut_edges_and_recompute():
    plan, edges = hand_plan()
    dot = render.to_dot(plan, edges)
    assert dot.startswith("digraph")
    for s in range(3):
        assert f"subgraph cluster_stage{s} {{" in dot
    cluster1 = dot.split("subgraph cluster_stage1 {")[1].split("}")[0]
    assert 'style="dashed,rounded"' in cluster1 and "recompute" in cluster1
    assert '"n3" -> "n4" [color=red' in dot and 'label="16.00 KiB"' in dot
    assert '"n7" -> "n8" [color=red' in dot and 'label="32.00 KiB"' in dot
    assert '"n0" -> "n1";' in dot                          # intra-stage edges are plain
    assert dot.count("{") == dot.count("}")


def test_dot_collapses_big_graphs():
    plan, edges = hand_plan(per=200)
    dot = render.to_dot(plan, edges, max_nodes=400)
    assert "stage interiors collapsed" in dot and "stage0_summary" in dot
    assert '"n5"' not in dot                                # interior nodes are gone
    assert '"n199" -> "n200" [color=red' in dot
    assert dot.count("\n") < 60


def test_dot_without_edges_and_quoting():
    plan, _ = hand_plan()
    dot = render.to_dot(plan, None, {"n0": 'we"ird\nname'})
    assert '"n3" -> "n4" [color=red, fontcolor=red, style=bold, penwidth=2.5]' in dot
    assert r'label="we\"ird\nname"' in dot


def _rect_titles(svg: str) -> list[str]:
    return re.findall(r"<title>(\d+[FBU]\d+) ", svg)


@pytest.mark.parametrize("schedule", ["2bw", "flush", "gpipe"])
def test_timeline_has_every_action(schedule):
    plan, _ = hand_plan(schedule=schedule)
    svg = render.timeline_svg(plan, num_batches=2)
    ET.fromstring(svg)
    actions = build_schedule(schedule, plan.num_stages, plan.num_microbatches, 2)
    assert sorted(_rect_titles(svg)) == sorted(str(a) for row in actions for a in row)
    assert "stage 0" in svg and "makespan" in svg


def test_timeline_reports_bad_schedule():
    plan, _ = hand_plan(m=2)                              # 2bw with m < d
    assert "schedule timeline unavailable" in render.timeline_svg(plan)


def test_bars_and_memory_limit_line():
    plan, _ = hand_plan(limit=2_500_000)
    svg = render.memory_bars_svg(plan)
    ET.fromstring(svg)
    assert "memory limit 2.38 MiB" in svg and "over limit" in svg   # stage 2 (3 MB) is over
    bars = render.stage_bars_svg(plan)
    assert "bottleneck" in bars and "lower bound" in bars and "recompute" in bars


def test_plan_svg_is_well_formed():
    plan, _ = hand_plan()
    root = ET.fromstring(render.plan_svg(plan, title="hand <plan>"))
    assert root.tag.endswith("svg")


def test_html_report_self_contained():
    plan, edges = hand_plan()
    page = render.to_html(plan, edges, title="hand plan", include_graph=False)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for s in range(3):
        assert f"stage {s}" in page
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert page.count("<svg") >= 3 and "Schedule timeline" in page
    assert "n3" in page and fmt_bytes(16384) in page       # cut edge table
    assert "dot -Tsvg" in page                              # DOT source shown when no graph drawing


def test_html_embeds_given_graph_svg():
    plan, edges = hand_plan()
    page = render.to_html(plan, edges, graph_svg='<?xml version="1.0"?>\n<svg id="g"></svg>')
    assert '<div class="graph"><svg id="g"></svg></div>' in page


def test_dot_to_svg_missing_binary(monkeypatch):
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    assert render.dot_to_svg("digraph { a -> b }") is None and not render.has_dot()


def test_dot_to_svg_uses_graphviz_when_present():
    plan, edges = hand_plan()
    svg = render.dot_to_svg(render.to_dot(plan, edges))
    if render.has_dot():
        assert svg is not None and "<svg" in svg and "stage 1 (recompute)" in svg
    else:  # no Graphviz on this machine: the caller falls back to the pure-Python SVG
        assert svg is None


def test_graph_edges_from_traced_model():
    import torch

    from fxpipe.passes.shape_prop import shape_prop
    from fxpipe.trace import trace
    from models import MLP

    model = MLP()
    x = torch.randn(4, 16)
    gm = trace(model, (x,))
    shape_prop(gm, x)
    edges = render.graph_edges(gm)
    assert ("layers_0", "tanh", 4 * 32 * 4) in edges
    assert all(u != "x" for u, _, _ in edges)               # placeholders are not plan nodes
    labels = render.node_labels(gm)
    assert labels["layers_0"] == "layers_0\nLinear" and labels["tanh"] == "tanh\ntanh"


def test_plan_json_keeps_typed_fields_and_loads_old_extra():
    import dataclasses

    from fxpipe.ir import LossCost, SolveInfo

    plan, _ = hand_plan()
    p = dataclasses.replace(plan, solve_info=SolveInfo(status="OPTIMAL", blocks=7, imbalance=0.5),
                            over_memory_stages=(1,), loss=LossCost(fwd_time=1e-3, activation_bytes=10),
                            extra={"note": 1})
    back = Plan.from_json(p.to_json())
    assert back == p and back.solve_info == p.solve_info and back.loss == p.loss
    assert back.over_memory_stages == (1,) and dict(back.extra) == {"note": 1}
    assert back.extra["status"] == "OPTIMAL" and back.extra.get("over_memory") is True   # old keys still read
    old = p.to_dict()
    for key in ("solve_info", "over_memory_stages", "loss"):
        old.pop(key)
    old["extra"] = {"status": "FEASIBLE", "first_blocks": 3, "over_memory": True, "over_memory_stages": [2]}
    legacy = Plan.from_dict(old)                       # a plan saved before the typed fields
    assert legacy.solve_info == SolveInfo(status="FEASIBLE", first_blocks=3)
    assert legacy.over_memory_stages == (2,) and dict(legacy.extra) == {}
    assert "OVER MEMORY on stages [2]" in legacy.summary()
