"""Depth × width search and the articulation lower bound: choices, memory, determinism, soundness."""

from __future__ import annotations

import random

import pytest
import torch

from fxpipe.errors import ConfigError, InfeasibleMemoryError, PartitionError
from fxpipe.ir import NodeCost
from fxpipe.passes.coarsen import graph_costs
from fxpipe.passes.partition import articulation_lower_bound, partition, trivial_lower_bound
from fxpipe.passes.search import allreduce_time, microbatch_candidates, search_depth_width
from test_partition import FakeCostModel, brute_force, gpt_like, make_graph, random_costs


def layered(b: int, *, layers: int = 8, params: int = 1000, overhead: float = 1e-4,
            per_sample: float = 1e-4, act: int = 1000, out: int = 100) -> "torch.fx.GraphModule":
    """A residual-style chain of ``layers`` blocks traced at microbatch size b.

    Each block: fc (params) -> act -> add(x, act); times = overhead + b * per_sample.
    """
    preds, costs, ps, pbytes = [], [], {}, {}
    x = -1
    for l in range(layers):
        t = overhead + b * per_sample
        fc = len(costs)
        preds.append([x] if x >= 0 else [])
        costs.append(NodeCost(fwd_time=t, bwd_time=2 * t, activation_bytes=b * act,
                              output_bytes=b * out))
        ps[fc] = (f"w{l}",)
        pbytes[f"w{l}"] = params
        a = len(costs)
        preds.append([fc])
        costs.append(NodeCost(fwd_time=t / 4, bwd_time=t / 4, activation_bytes=b * act // 2,
                              output_bytes=b * out))
        add = len(costs)
        preds.append([x, a] if x >= 0 else [a])
        costs.append(NodeCost(fwd_time=t / 10, bwd_time=t / 10, output_bytes=b * out))
        x = add
    return make_graph(preds, costs, params=ps, param_bytes=pbytes)


def graph_for(bandwidth: float = 1e9, **kw):
    calls: list[int] = []

    def fn(b: int):
        calls.append(b)
        return layered(b, **kw), FakeCostModel(bandwidth=bandwidth)

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def test_microbatch_candidates() -> None:
    assert microbatch_candidates(24) == [1, 2, 4, 8]
    assert microbatch_candidates(64, cap=16) == [1, 2, 4, 8, 16]
    assert microbatch_candidates(12, allowed=[3, 5, 6]) == [3, 6]


def test_allreduce_time_ring() -> None:
    cm = FakeCostModel(bandwidth=100.0)
    assert allreduce_time(800, 1, cm) == 0.0
    assert allreduce_time(800, 4, cm, bandwidth=100.0) == pytest.approx(2 * 3 / 4 * 8)
    assert allreduce_time(800, 4, cm) == pytest.approx(2 * 3 * 200 / 100)


def test_fast_links_pick_pure_data_parallel() -> None:
    fn = graph_for(bandwidth=1e15)
    p = search_depth_width(fn, num_devices=8, global_batch=64, schedule="2bw", memory_limit=None,
                           optimizer_slots=0, time_limit=4.0, allreduce_bandwidth=1e15)
    assert (p.num_stages, p.data_parallel) == (1, 8)
    assert p.microbatch_size * p.num_microbatches * p.data_parallel == 64
    assert len(set(fn.calls)) == len(fn.calls)       # graph_for is cached per b
    table = p.extra["search"]["candidates"]
    assert sum(1 for r in table if r.get("chosen")) == 1
    assert {(r["d"], r["w"]) for r in table} >= {(1, 8), (2, 4), (4, 2), (8, 1)}


def test_slow_allreduce_picks_deep_pipeline() -> None:
    fn = graph_for(bandwidth=1e12, params=10_000_000)
    p = search_depth_width(fn, num_devices=8, global_batch=64, schedule="2bw", memory_limit=None,
                           optimizer_slots=0, time_limit=4.0, allreduce_bandwidth=1e6)
    assert p.data_parallel == 1 and p.num_stages == 8
    assert p.num_microbatches >= p.num_stages


def test_tight_memory_picks_deeper_pipeline_that_fits() -> None:
    fn = graph_for(bandwidth=1e15, params=1_000_000)
    loose = search_depth_width(fn, num_devices=8, global_batch=64, schedule="2bw",
                               memory_limit=None, optimizer_slots=2, time_limit=4.0,
                               allreduce_bandwidth=1e15)
    assert loose.num_stages == 1
    limit = 10_000_000       # all 8 layers' weights need 8e6 * (2 + 2 + 1) bytes on one device
    p = search_depth_width(fn, num_devices=8, global_batch=64, schedule="2bw", memory_limit=limit,
                           optimizer_slots=2, time_limit=4.0, allreduce_bandwidth=1e15)
    assert p.num_stages >= 4 and p.num_stages * p.data_parallel <= 8
    assert max(s.memory for s in p.stages) <= limit
    assert p.memory_limit == limit


@pytest.mark.parametrize("schedule", ["flush", "gpipe"])
def test_other_schedules_pay_the_bubble(schedule: str) -> None:
    fn = graph_for(bandwidth=1e9)
    p = search_depth_width(fn, num_devices=4, global_batch=16, schedule=schedule,
                           memory_limit=None, optimizer_slots=0, time_limit=2.0)
    s = p.extra["search"]
    work = [st.fwd_time + st.bwd_time + (st.fwd_time if st.recompute else 0.0) for st in p.stages]
    # fill and drain every batch: the bottleneck stage m times, every other stage once on the critical path
    assert s["batch_time"] >= (p.num_microbatches - 1) * max(work) + sum(work) - 1e-12
    from fxpipe.runtime.simulate import steady_batch_time

    g = p.extra.get("microbatches_per_flush")
    assert (g is not None) == (schedule == "gpipe")
    assert s["batch_time"] == pytest.approx(steady_batch_time(
        p, [2 * (p.data_parallel - 1) * FakeCostModel(bandwidth=1e9).comm_time(-(-st.param_bytes // p.data_parallel))
            for st in p.stages] if p.data_parallel > 1 else None, microbatches_per_flush=g)[0])


def test_search_is_deterministic() -> None:
    kw = dict(num_devices=8, global_batch=32, schedule="2bw", memory_limit=20_000_000,
              optimizer_slots=1, time_limit=3.0)
    a = search_depth_width(graph_for(bandwidth=1e8, params=2_000_000), **kw)
    b = search_depth_width(graph_for(bandwidth=1e8, params=2_000_000), **kw)
    assert a.stage_of() == b.stage_of()
    assert (a.data_parallel, a.microbatch_size, a.num_microbatches) == \
        (b.data_parallel, b.microbatch_size, b.num_microbatches)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "gap"} for r in rows]  # noqa: E731
    assert strip(a.extra["search"]["candidates"]) == strip(b.extra["search"]["candidates"])


def test_every_candidate_has_an_outcome_and_a_partition_failure_does_not_abort(monkeypatch) -> None:
    import fxpipe.passes.search as search_mod

    real = search_mod.partition

    def flaky(gm, cm, *, num_stages, **kw):
        if num_stages == 2:
            raise PartitionError("partition: CP-SAT found no plan for 2 stages (status UNKNOWN)")
        return real(gm, cm, num_stages=num_stages, **kw)

    monkeypatch.setattr(search_mod, "partition", flaky)
    fn = graph_for(bandwidth=1e12, params=10_000_000)
    p = search_depth_width(fn, num_devices=8, global_batch=64, schedule="2bw", memory_limit=None,
                           time_limit=30.0, allreduce_bandwidth=1e6)
    rows = p.extra["search"]["candidates"]
    assert {r["status"] for r in rows} <= {"solved", "infeasible", "pruned", "gave up"}
    assert all(r["status"] for r in rows) and all(r["reason"] for r in rows if r["status"] != "solved")
    two = [r for r in rows if r["d"] == 2 and r["status"] == "gave up"]
    assert two and all("status UNKNOWN" in r["reason"] for r in two)
    assert p.num_stages == 8 and sum(p.extra["search"]["counts"].values()) == len(rows)


def test_nothing_solved_says_why(monkeypatch) -> None:
    import fxpipe.passes.search as search_mod

    def never(*a, **kw):
        raise PartitionError("status UNKNOWN")

    monkeypatch.setattr(search_mod, "partition", never)
    with pytest.raises(PartitionError, match=r"was solved: \d+ given up \(first: d=\d+ b=\d+: partition found no"):
        search_depth_width(graph_for(), num_devices=2, global_batch=8, time_limit=5.0)


def test_time_limit_bounds_the_search_tracing_included() -> None:
    import time

    slow = graph_for()

    def fn(b: int):
        time.sleep(0.4)          # a slow trace
        return slow(b)

    t0 = time.perf_counter()
    p = search_depth_width(fn, num_devices=4, global_batch=64, schedule="flush", time_limit=1.0)
    took = time.perf_counter() - t0
    s = p.extra["search"]
    assert took < 1.0 + 0.4 + 0.5          # at most one trace and one candidate past the limit
    late = [r for r in s["candidates"] if r["status"] == "gave up"]
    assert late and all("time_limit=1.0 s ran out" in r["reason"] for r in late)
    assert s["trace_time"] >= 0.4 and s["search_time"] == pytest.approx(took, abs=0.05)


def test_time_limit_holds_when_deeper_candidates_price_slower() -> None:
    # The simulator's pricing grows with the depth (d=32 ~3x d=16 on the paper's GPT-3.8B): a search that
    # keeps back only the slowest pricing seen so far overran its limit when a deeper candidate came last.
    import time

    def price(plan, w, cm):
        time.sleep(0.02 * plan.num_stages ** 2)     # d=1: 0.02 s ... d=8: 1.28 s
        return 1000.0, 0.0                          # slow enough that no candidate is pruned

    t0 = time.perf_counter()
    p = search_depth_width(graph_for(), num_devices=8, global_batch=8, schedule="flush", microbatch_sizes=[1],
                           time_limit=2.0, price=price)
    took = time.perf_counter() - t0
    rows = {r["d"]: r for r in p.extra["search"]["candidates"]}
    assert [rows[d]["status"] for d in (1, 2)] == ["solved", "solved"]   # visited first (best optimistic)
    assert rows[8]["status"] == "gave up" and "ran out" in rows[8]["reason"]
    assert took <= 2.0 + 0.1


def test_gpipe_runs_as_many_microbatches_per_flush_as_fit() -> None:
    fn = graph_for(bandwidth=1e15, params=1000, act=100_000)
    free = search_depth_width(fn, num_devices=2, global_batch=16, schedule="gpipe", memory_limit=None,
                              microbatch_sizes=[1], time_limit=30.0)
    assert (free.num_stages, free.extra["microbatches_per_flush"]) == (1, free.num_microbatches) == (1, 8)
    # room for about 2 microbatches' activations: several flushes per step, same batch
    limit = 2 * max(s.activation_bytes for s in free.stages) + 10 * sum(s.param_bytes for s in free.stages)
    p = search_depth_width(fn, num_devices=2, global_batch=16, schedule="gpipe", memory_limit=limit,
                           microbatch_sizes=[1], recompute=False, time_limit=30.0)
    g = p.extra["microbatches_per_flush"]
    assert p.num_microbatches * p.data_parallel == 16 and g < p.num_microbatches
    assert max(s.memory for s in p.stages) <= limit and all(s.in_flight <= g for s in p.stages)
    assert p.extra["search"]["batch_time"] >= free.extra["search"]["batch_time"]


def test_nothing_fits_raises_with_smallest_memory() -> None:
    fn = graph_for(params=1_000_000)
    with pytest.raises(InfeasibleMemoryError, match="smallest per-device memory seen") as e:
        search_depth_width(fn, num_devices=2, global_batch=8, schedule="2bw", memory_limit=1000,
                           optimizer_slots=0, time_limit=1.0)
    assert e.value.min_feasible is not None and e.value.min_feasible > 1000


def test_config_errors() -> None:
    fn = graph_for()
    with pytest.raises(ConfigError, match="num_devices"):
        search_depth_width(fn, num_devices=0, global_batch=8, schedule="2bw", memory_limit=None,
                           optimizer_slots=0)
    with pytest.raises(ConfigError, match="no \\(depth, width, microbatch\\)"):
        search_depth_width(fn, num_devices=4, global_batch=6, schedule="2bw", memory_limit=None,
                           optimizer_slots=0, microbatch_sizes=[4])


# ----------------------------------------------------------------------------- the lower bound


def residual_dag(rng: random.Random, blocks: int) -> "torch.fx.GraphModule":
    """Blocks of 1-3 nodes between articulation adds, with one skip inside each block."""
    preds: list[list[int]] = []
    x = -1
    for _ in range(blocks):
        k = rng.randint(1, 2)
        inner = []
        for j in range(k):
            src = [x] if x >= 0 else []
            if j and rng.random() < 0.5:
                src = [inner[-1]]
            preds.append(src)
            inner.append(len(preds) - 1)
        preds.append(sorted({*inner, *([x] if x >= 0 else [])}))
        x = len(preds) - 1
    costs = random_costs(rng, len(preds), params=False)
    return make_graph(preds, costs)


@pytest.mark.parametrize("seed", range(12))
def test_articulation_bound_is_sound_against_exhaustive_search(seed: int) -> None:
    rng = random.Random(seed)
    gm = residual_dag(rng, 3)
    cm = FakeCostModel(bandwidth=rng.choice([5.0, 20.0, 100.0]))
    gc = graph_costs(gm, cm)
    for d in (2, 3):
        if d > gc.n:
            continue
        best, _ = brute_force(gm, cm, d, m=4)
        lb = articulation_lower_bound(gc, d)
        assert trivial_lower_bound(gc, d) <= lb + 1e-12
        assert lb <= best * (1 + 1e-9)


def test_articulation_bound_closes_the_gap_on_gpt_like() -> None:
    gm = gpt_like(12)
    cm = FakeCostModel(bandwidth=1e9)
    plan = partition(gm, cm, num_stages=8, num_microbatches=8, time_limit=4.0)
    gc = graph_costs(gm, cm)
    assert trivial_lower_bound(gc, 8) < 0.8 * plan.bottleneck      # the old bound: > 20% gap
    assert plan.gap <= 0.01
    assert plan.lower_bound <= plan.bottleneck


# ----------------------------------------------------------------------------- fxpipe.plan


def test_plan_api_searches_depth_and_width() -> None:
    pytest.importorskip("fxpipe.passes.annotate")
    import fxpipe
    from fxpipe.cost_models.device import get_device
    from models import MLP

    fast = get_device("a100-80gb").replace(intra_node_bandwidth=1e18, link_latency=0.0)
    x = torch.randn(16, 16)
    # a generous limit: the first trace of a process warms torch up (seconds on a busy machine), and
    # a search that hits its limit gives candidates up (see test_time_limit_bounds_the_search)
    p = fxpipe.plan(MLP(), (x,), num_stages=None, num_devices=4, global_batch=64, device=fast,
                    time_limit=60.0)
    assert p.extra["search"]["counts"]["gave up"] == 0
    assert (p.num_stages, p.data_parallel) == (1, 4)
    assert p.microbatch_size * p.num_microbatches * p.data_parallel == 64
    q = fxpipe.plan(MLP(), (x,), num_stages=None, num_devices=4, global_batch=64, device=fast,
                    time_limit=60.0)
    assert q.stage_of() == p.stage_of() and q.microbatch_size == p.microbatch_size
    limit = max(s.memory for s in p.stages) // 3
    r = fxpipe.plan(MLP(), (x,), num_stages=None, num_devices=4, global_batch=64, device=fast,
                    memory_limit=limit, recompute=False, time_limit=60.0)
    assert r.num_stages > 1 and max(s.memory for s in r.stages) <= limit
