"""Baselines return valid Plans of the same type, never better than the CP-SAT plan."""

from __future__ import annotations

import pytest

from fxpipe.errors import ConfigError
from fxpipe.passes.baselines import (BASELINES, balanced_partition, baseline, block_partition,
                                     uniform_plan)
from fxpipe.passes.partition import partition
from test_partition import FakeCostModel, check_plan, gpt_like


@pytest.fixture(scope="module")
def gpt():
    return gpt_like(8), FakeCostModel(bandwidth=25e9)


@pytest.mark.parametrize("limit", [None, 3 * 10**9])
def test_baselines_are_valid_and_not_better(gpt, limit) -> None:
    gm, cm = gpt
    kw = dict(num_stages=4, num_microbatches=8, memory_limit=limit, optimizer_slots=2)
    best = partition(gm, cm, time_limit=4.0, **kw)
    for name in BASELINES:
        plan = baseline(name, gm, cm, **kw)
        assert plan.solver == name and plan.num_stages == 4
        over = plan.extra["over_memory"]
        if limit is None:
            assert not over
        if not over:
            check_plan(plan, gm, cm, m=8, k=2)
            assert plan.bottleneck >= best.bottleneck * (1 - 1e-9)


def test_uniform_splits_layers_equally(gpt) -> None:
    gm, cm = gpt
    plan = uniform_plan(gm, cm, num_stages=4, num_microbatches=4)
    assert plan.extra["blocks"] == "h" and plan.extra["num_blocks"] == 8
    st = plan.stage_of()
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if stack:
            layer = int(next(iter(stack)).split(".")[1])
            assert st[n.name] == layer // 2
    assert st["n0"] == 0 and st[max(st, key=lambda x: int(x[1:]))] == 3  # embedding, head


def test_over_memory_is_reported_not_raised(gpt) -> None:
    gm, cm = gpt
    plan = baseline("time", gm, cm, num_stages=4, num_microbatches=8, memory_limit=10**6)
    assert plan.extra["over_memory"] and plan.extra["over_memory_stages"]
    assert plan.stages[0].recompute            # recomputation tried where it saves memory


def test_partition_helpers() -> None:
    assert balanced_partition([4, 1, 1, 1, 3], 2) == [0, 0, 1, 1, 1]
    parts = balanced_partition([0, 0, 0, 5], 3)
    assert sorted(set(parts)) == [0, 1, 2] and parts == sorted(parts) and parts[-1] == 2
    parts = block_partition([5, 5, 1, 1, 1, 1], 3)
    assert sorted(set(parts)) == [0, 1, 2] and parts == sorted(parts)
    assert block_partition([1.0] * 6, 3) == [0, 0, 1, 1, 2, 2]


def test_unknown_baseline(gpt) -> None:
    gm, cm = gpt
    with pytest.raises(ConfigError, match="unknown baseline 'greedy'.*uniform"):
        baseline("greedy", gm, cm, num_stages=2, num_microbatches=2)
    with pytest.raises(ConfigError, match="num_stages=999"):
        baseline("parameters", gm, cm, num_stages=999, num_microbatches=2)
