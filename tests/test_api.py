"""The public entry points: plan_with_graph returns the plan fxpipe.plan returns with its annotated graph;
the options are checked once into a frozen PlanOptions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fxpipe
from fxpipe.errors import ConfigError, ScheduleError
from fxpipe.ir import META_COST, NodeCost
from fxpipe.options import DEVICE_MEMORY, PlanOptions, check_plan_options
from fxpipe.render import graph_edges, node_labels, to_dot
from models import CASES

_COMPUTE = ("call_function", "call_method", "call_module")


def _mlp():
    model, x, _, _ = CASES["mlp"]()
    return model, x


def test_plan_with_graph_is_plan_plus_the_graph_it_was_cut_from():
    model, x = _mlp()
    r = fxpipe.plan_with_graph(model, (x,), num_stages=3, num_microbatches=4, schedule="flush")
    p = fxpipe.plan(model, (x,), num_stages=3, num_microbatches=4, schedule="flush")
    assert isinstance(r, fxpipe.PlannedGraph)
    assert r.plan.stage_of() == p.stage_of()
    assert r.plan.bottleneck == p.bottleneck and [s.memory for s in r.plan.stages] == [s.memory for s in p.stages]
    compute = [n for n in r.gm.graph.nodes if n.op in _COMPUTE]
    assert {n.name for n in compute} == set(r.plan.stage_of())
    assert all(isinstance(n.meta[META_COST], NodeCost) for n in compute)
    # traced for one microbatch: the example batch of 8 split into 4
    (inp,) = [n for n in r.gm.graph.nodes if n.op == "placeholder"]
    assert tuple(inp.meta["val"].shape) == (x.shape[0] // 4, x.shape[1])
    assert r.cost_model is r.graph.cost_model
    dot = to_dot(r.plan, graph_edges(r.gm), node_labels(r.gm))
    assert all(f"cluster_stage{s}" in dot for s in range(3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.plan = p  # type: ignore[misc]


def test_plan_with_graph_checks_its_arguments_as_plan_does():
    model, x = _mlp()
    with pytest.raises(ConfigError, match=r"unknown schedule '1f1b'; choose one of 2bw, flush, gpipe"):
        fxpipe.plan_with_graph(model, (x,), num_stages=2, num_microbatches=4, schedule="1f1b")
    with pytest.raises(ScheduleError, match=r"num_microbatches=2 < num_stages=4"):
        fxpipe.plan_with_graph(model, (x,), num_stages=4, num_microbatches=2)
    with pytest.raises(ConfigError, match=r"unknown executor 'mpi'"):
        fxpipe.plan(model, (x,), num_stages=2, num_microbatches=4, executor="mpi")


def test_options_are_resolved_once():
    model, _ = _mlp()
    leaves = (name for name in ["layers.0"])            # a generator is read once, not once per check
    opts = check_plan_options(model, num_stages=2, num_microbatches=4, schedule="2bw",
                              optimizer=lambda ps: torch.optim.Adam(ps), cost_model="analytic",
                              memory_limit="1GiB", device=None, executor="auto", leaf_modules=leaves)
    assert isinstance(opts, PlanOptions)
    assert (opts.memory_limit, opts.optimizer_slots, opts.executor, opts.leaf_modules) == \
        (2**30, 2, "local", ("layers.0",))
    on_a100 = check_plan_options(model, num_stages=2, num_microbatches=4, schedule="2bw", optimizer=None,
                                 cost_model="analytic", memory_limit=DEVICE_MEMORY, device="a100-80gb",
                                 executor="local")
    # less the CUDA context and the 5% headroom
    assert on_a100.memory_limit == (81920 - 768 - 4096) * 2**20 and on_a100.optimizer_slots == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.schedule = "flush"  # type: ignore[misc]


def test_a_leaf_module_warning_names_the_callers_line():
    model, x = _mlp()
    with pytest.warns(UserWarning, match=r"leaf_modules entry 'layer.0' matches no submodule") as seen:
        fxpipe.plan_with_graph(model, (x,), num_stages=2, num_microbatches=4, leaf_modules=["layer.0"])
    assert [w.filename for w in seen] == [__file__]


def test_a_plan_records_where_each_stage_receives_from() -> None:
    """SkipNet (tests/models.py): h0 feeds the head, h_i is added three blocks later. On 4 stages some
    stage reads a value made two or more stages before it; received_from says how many bytes come from
    each earlier stage, summing to received_bytes, as counted here from the graph itself."""
    model, x, _, _ = CASES["skip"]()
    r = fxpipe.plan_with_graph(model, (x,), num_stages=4, num_microbatches=2, schedule="flush", time_limit=5.0)
    stage = r.plan.stage_of()
    output = next(n for n in r.gm.graph.nodes if n.op == "output")
    want: list[dict[int, int]] = [{} for _ in range(4)]
    for n in r.gm.graph.nodes:
        if n.name not in stage:
            continue
        into = {stage[u.name] for u in n.users if u.name in stage} | ({3} if n in output.all_input_nodes else set())
        for s in into - {stage[n.name]}:
            want[s][stage[n.name]] = want[s].get(stage[n.name], 0) + n.meta[META_COST].output_bytes
    assert [dict(st.received_from) for st in r.plan.stages] == want
    assert all(sum(b for _, b in st.received_from) == st.received_bytes for st in r.plan.stages)
    assert any(p < st.index - 1 for st in r.plan.stages for p, _ in st.received_from)   # a long skip
