"""Exact DP for contiguous splits: against exhaustive search on chains, docstring example, errors."""

from __future__ import annotations

import itertools
import random

import pytest

from fxpipe.errors import ConfigError, InfeasibleMemoryError
from fxpipe.ir import NodeCost
from fxpipe.passes.coarsen import graph_costs
from fxpipe.passes.dp import best_contiguous_split, build_problem, dp_plan, evaluate, split_sequence
from test_partition import FakeCostModel, brute_force, chain, make_graph, ref_eval


def test_docstring_example() -> None:
    costs = [NodeCost(fwd_time=f, bwd_time=0.0) for f in (3, 1, 2, 2)]
    gm = make_graph([[], [0], [1], [2]], costs)
    sp = best_contiguous_split(gm, FakeCostModel(), num_stages=2, num_microbatches=2)
    assert sp.bottleneck == 4
    assert sp.stage_of == {"n0": 0, "n1": 0, "n2": 1, "n3": 1}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("d", [2, 3, 4])
def test_chain_dp_is_exact(seed: int, d: int) -> None:
    rng = random.Random(seed * 10 + d)
    gm = chain(rng, 8, act=300)
    cm = FakeCostModel(bandwidth=rng.choice([3.0, 30.0]))
    m, k = d + 1, 1
    _, mem_any = brute_force(gm, cm, d, m=m, k=k)
    limit = rng.choice([None, int(mem_any * 1.1)])
    best, _ = brute_force(gm, cm, d, m=m, k=k, limit=limit)
    sp = best_contiguous_split(gm, cm, num_stages=d, num_microbatches=m, optimizer_slots=k,
                               memory_limit=limit)
    assert sp.bottleneck == pytest.approx(best, rel=1e-9)
    t, mems = ref_eval(gm, cm, sp.stage_of, sp.recompute, m=m, k=k)
    assert t == pytest.approx(best, rel=1e-9)
    assert limit is None or max(mems) <= limit
    plan = dp_plan(gm, cm, num_stages=d, num_microbatches=m, optimizer_slots=k, memory_limit=limit)
    assert plan.solver == "dp" and plan.bottleneck == pytest.approx(best, rel=1e-9)


def test_dp_with_skips_matches_enumeration_of_contiguous_splits() -> None:
    rng = random.Random(5)
    n, d = 9, 3
    preds = [[]] + [[i - 1] + ([i - 3] if i >= 3 and rng.random() < 0.5 else []) for i in range(1, n)]
    costs = [NodeCost(fwd_time=rng.uniform(1, 2), bwd_time=rng.uniform(1, 4),
                      output_bytes=rng.randint(1, 30), activation_bytes=10) for _ in range(n)]
    gm = make_graph(preds, costs, returns=[n - 1, n - 4])
    cm = FakeCostModel(bandwidth=5.0)
    best = min(ref_eval(gm, cm, {f"n{i}": sum(i >= c for c in cuts) for i in range(n)},
                        [False] * d, m=4)[0]
               for cuts in itertools.combinations(range(1, n), d - 1))
    sp = best_contiguous_split(gm, cm, num_stages=d, num_microbatches=4)
    assert sp.bottleneck == pytest.approx(best, rel=1e-9)


def test_evaluate_agrees_with_split_times() -> None:
    rng = random.Random(1)
    gm = chain(rng, 7)
    gc = graph_costs(gm, FakeCostModel(bandwidth=4.0))
    prob = build_problem(gc, [[v] for v in range(gc.n)], num_stages=3, num_microbatches=3,
                         schedule="flush", memory_limit=None, optimizer_slots=0, recompute=None)
    res = split_sequence(prob)
    assert res is not None
    times, _ = evaluate(prob, res.stage_of_block(), res.recompute)
    assert list(res.times) == pytest.approx(times) and max(times) == pytest.approx(res.bottleneck)


def test_infeasible_and_bad_arguments() -> None:
    gm = chain(random.Random(2), 5)
    cm = FakeCostModel()
    with pytest.raises(InfeasibleMemoryError, match="memory_limit=3"):
        best_contiguous_split(gm, cm, num_stages=2, num_microbatches=2, memory_limit=3)
    with pytest.raises(ConfigError, match="between 1 and the number of compute nodes"):
        best_contiguous_split(gm, cm, num_stages=9, num_microbatches=2)
    with pytest.raises(ConfigError, match="not topological"):
        best_contiguous_split(gm, cm, num_stages=2, num_microbatches=2,
                              order=["n1", "n0", "n2", "n3", "n4"])
    with pytest.raises(ConfigError, match="unknown schedule"):
        best_contiguous_split(gm, cm, num_stages=2, num_microbatches=2, schedule="x")
