"""One cost and memory evaluator: the same stages give the same T_s and M_s in the DP, CP-SAT and the re-checker."""

from __future__ import annotations

import random

import pytest
from ortools.sat.python import cp_model

from fxpipe.cost_models.evaluator import CostContext, StageFigures
from fxpipe.ir import META_LOSS, LossCost, NodeCost
from fxpipe.passes.coarsen import graph_costs
from fxpipe.passes.dp import build_problem, evaluate, stage_table
from fxpipe.passes.cpsat_model import build_model as _build
from fxpipe.passes.plan_build import plan_from_assignment
from test_partition import FakeCostModel, make_graph


def test_docstring_example() -> None:
    ctx = CostContext(schedule="2bw", num_stages=4, num_microbatches=8, optimizer_slots=0)
    fig = StageFigures(param_bytes=100, activation_bytes=10, input_bytes=2, received_bytes=2,
                       in_flight=ctx.in_flight(1))
    assert fig.in_flight == 3
    assert fig.memory(ctx, False) == 336 and fig.memory(ctx, True) == 316


def gm_without_loss(gm):
    out = _graph()
    assert META_LOSS not in out.meta and out.graph.python_code("self").src == gm.graph.python_code("self").src
    return out


def _graph():
    """9 nodes with skips, a tied parameter on stages 0 and 2, two model outputs."""
    rng = random.Random(3)
    n = 9
    preds = [[]] + [[i - 1] + ([i - 3] if i >= 3 and i % 2 else []) for i in range(1, n)]
    costs = [NodeCost(fwd_time=rng.uniform(1, 2), bwd_time=rng.uniform(1, 4),
                      output_bytes=rng.randint(10, 90), activation_bytes=rng.randint(20, 200))
             for _ in range(n)]
    params = {1: ("tied",), 2: ("p2",), 5: ("p5",), 7: ("tied", "p7")}
    sizes = {"tied": 400, "p2": 120, "p5": 60, "p7": 30}
    return make_graph(preds, costs, params=params, param_bytes=sizes, returns=[n - 1, 4],
                      input_bytes=48)


@pytest.mark.parametrize("schedule,k,loss", [("2bw", 1, False), ("gpipe", 2, False), ("flush", 0, True)])
def test_same_stage_same_numbers_in_dp_cpsat_and_rechecker(schedule: str, k: int, loss: bool) -> None:
    gm, cm = _graph(), FakeCostModel(bandwidth=7.0, latency=0.5)
    if loss:   # loss_fn's cost (example_targets=) is part of the last stage everywhere
        gm.meta[META_LOSS] = LossCost(fwd_time=2.5, bwd_time=4.0, activation_bytes=333)
    d, m = 3, 4
    bounds = [0, 3, 6, 9]
    stage = [s for s in range(d) for _ in range(bounds[s + 1] - bounds[s])]
    flags = [False, True, False]
    opts = dict(num_microbatches=m, schedule=schedule, optimizer_slots=k)
    plan = plan_from_assignment(gm, cm, {f"n{v}": stage[v] for v in range(9)}, flags, **opts)
    gc = graph_costs(gm, cm)
    singles = [[v] for v in range(gc.n)]
    kw = dict(num_stages=d, recompute=None, **opts)

    # the DP's evaluate (float units) is the re-checker's numbers exactly
    prob = build_problem(gc, singles, memory_limit=None, **kw)
    times, mems = evaluate(prob, stage, flags)
    assert times == [st.time for st in plan.stages] and mems == [st.memory for st in plan.stages]
    assert len({st.memory for st in plan.stages}) == d and plan.stages[2].param_bytes == 430
    if loss:
        bare = plan_from_assignment(gm_without_loss(gm), cm, {f"n{v}": stage[v] for v in range(9)}, flags, **opts)
        assert plan.loss == gm.meta[META_LOSS] and bare.loss is None
        assert plan.stages[2].fwd_time == pytest.approx(bare.stages[2].fwd_time + 2.5)
        assert plan.stages[2].activation_bytes == bare.stages[2].activation_bytes + 333
        assert plan.stages[:2] == bare.stages[:2]

    # the DP's numpy form of every contiguous stage, read at this plan's stages
    for s in range(d):
        t_arr, m_arr = stage_table(prob, s)[flags[s]]
        idx = (bounds[s], bounds[s + 1]) if s < d - 1 else (bounds[s],)
        assert t_arr[idx] == pytest.approx(plan.stages[s].time, rel=1e-12)
        assert m_arr[idx] == plan.stages[s].memory

    # CP-SAT's stage expressions with the assignment fixed (integer time units)
    scale = 1000.0
    sprob = build_problem(gc, singles, memory_limit=10**9, time_scale=scale, **kw)
    stimes, smems = evaluate(sprob, stage, flags)
    built = _build(sprob, objective="time")
    for b in range(gc.n):
        for s in range(1, d):
            built.model.add(built.z[b][s] == int(stage[b] >= s))
    for s in range(d):
        built.model.add(built.r[s] == int(flags[s]))
    # every entry / parameter indicator is only bounded below: minimising makes them exact
    built.model.minimize(sum(built.times[s][flags[s]] + built.mems[s][flags[s]] for s in range(d)))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    assert solver.solve(built.model) == cp_model.OPTIMAL
    assert [solver.value(built.times[s][flags[s]]) for s in range(d)] == stimes
    assert [solver.value(built.mems[s][flags[s]]) for s in range(d)] == smems == mems
    for s in range(d):
        assert stimes[s] / scale == pytest.approx(plan.stages[s].time, abs=gc.n / scale)
