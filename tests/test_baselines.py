"""Baselines cut where DeepSpeed 0.19.8 and torchgpipe 0.0.7 cut, and return valid Plans of the same type.

The expected partitions below are worked by hand from the libraries' published code
(deepspeed/runtime/utils.py ``partition_uniform`` / ``partition_balanced``,
torchgpipe/balance/blockpartition.py ``solve``); each case says how.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxpipe.errors import ConfigError, PartitionError
from fxpipe.passes.annotate import annotate
from fxpipe.passes.baselines import (BASELINES, balanced_partition, baseline, block_partition, layer_units,
                                     partition_balanced, partition_uniform, uniform_plan)
from fxpipe.passes.partition import partition
from fxpipe.passes.shape_prop import shape_prop
from fxpipe.trace import trace
from models import TinyGPT
from test_partition import FakeCostModel, check_plan, gpt_like


@pytest.fixture(scope="module")
def gpt():
    return gpt_like(8), FakeCostModel(bandwidth=25e9)


@pytest.mark.parametrize("limit", [None, 3 * 10**9])
def test_baselines_are_valid_and_not_better(gpt, limit) -> None:
    gm, cm = gpt
    kw = dict(num_stages=4, num_microbatches=8, memory_limit=limit, optimizer_slots=2)
    best = partition(gm, cm, time_limit=4.0, **kw)
    for name in [*BASELINES, "type:block"]:
        plan = baseline(name, gm, cm, **kw)
        assert plan.solver == name and plan.num_stages == 4
        over = plan.extra["over_memory"]
        if limit is None:
            assert not over
        if not over:
            check_plan(plan, gm, cm, m=8, k=2)
            assert plan.bottleneck >= best.bottleneck * (1 - 1e-9)


def test_deepspeed_partition_uniform() -> None:
    # 10 layers, 4 parts: chunk 2, residual 2 -> the first two parts get 3 layers
    assert partition_uniform(10, 4) == [0, 3, 6, 8, 10]
    assert partition_uniform(8, 4) == [0, 2, 4, 6, 8]
    # fewer layers than parts: the trailing parts are empty (DeepSpeed's edge case)
    assert partition_uniform(2, 3) == [0, 1, 2, 2]


def test_deepspeed_partition_balanced_minimises_max_minus_min() -> None:
    # [4 1 | 1 1 3]: sums 5, 5, max - min 0
    assert partition_balanced([4, 1, 1, 1, 3], 2) == [0, 2, 5]
    # the DP minimises max - min, not max: [5 | 4 2 | 8 3] (5, 6, 11; spread 6) beats
    # [5 4 | 2 8 | 3] (9, 10, 3; spread 7) although its largest part is worse (11 > 10)
    assert partition_balanced([5, 4, 2, 8, 3], 3) == [0, 1, 3, 5]
    # [10 | 1 1 | 1 1]: sums 10, 2, 2 (spread 8); every other cut spreads 9 or more
    assert partition_balanced([10, 1, 1, 1, 1], 3) == [0, 1, 3, 5]
    # ties go to the latest cut (``>=``): [1, 1, 1, 1] into 3 has three cuts of spread 1
    assert partition_balanced([1, 1, 1, 1], 3) == [0, 2, 3, 4]
    # no more items than parts: partition_uniform
    assert partition_balanced([3, 1], 2) == [0, 1, 2]
    assert balanced_partition([4, 1, 1, 1, 3], 2) == [0, 0, 1, 1, 1]


def test_torchgpipe_blockpartition_solve() -> None:
    # normalised [1 1 0 0 0 0], start [1 1 | 0 0 | 0 0]: heaviest p=0, lightest q=1 (lowest index of the
    # two empty ones) takes the last element of block 0 -> [1 | 1 0 0 | 0 0]; max 1 <= min 0 + 1: stop
    assert block_partition([9, 9, 0, 0, 0, 0], 3) == [0, 1, 1, 1, 2, 2]
    # all equal: normalised all 0, the equal-count start already stops
    assert block_partition([1.0] * 6, 3) == [0, 0, 1, 1, 2, 2]
    # 7 items in 3: the start is n // 3 per block, the last takes the remainder
    assert block_partition([1.0] * 7, 3) == [0, 0, 1, 1, 2, 2, 2]
    # [5 5 | 1 1 | 1 1] normalised [1 1 | 0 0 | 0 0]: as the first case
    assert block_partition([5, 5, 1, 1, 1, 1], 3) == [0, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="shorter than intended partitions"):
        block_partition([1.0, 2.0], 3)


def _gpt_graph():
    torch.manual_seed(0)
    model = TinyGPT(n_layer=4)
    x = torch.zeros(2, 8, dtype=torch.long)
    gm = trace(model, (x,))
    shape_prop(gm, x)
    return model, gm


def test_layer_units_of_a_gpt() -> None:
    _, gm = _gpt_graph()
    units = layer_units(gm)
    assert [u.key for u in units] == ["wte", "wpe", "blocks.0", "blocks.1", "blocks.2", "blocks.3",
                                      "ln_f", "lm_head"]
    assert [u.type_name for u in units[:3]] == ["Embedding", "Embedding", "Block"]
    names = [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    assert sum(len(u.nodes) for u in units) == len(names)
    assert [names[v] for v in units[0].nodes][-1] == "wte"       # arange & co. join the first layer
    assert "add" in [names[v] for v in units[1].nodes]           # wte + wpe joins wpe


def test_deepspeed_methods_on_a_gpt() -> None:
    model, gm = _gpt_graph()
    from fxpipe.cost_models.analytic import AnalyticCostModel

    cm = AnalyticCostModel()
    annotate(gm, cm)
    # 8 layers into 4: two each
    p = uniform_plan(gm, cm, num_stages=4, num_microbatches=4)
    assert p.extra["parts"] == [0, 2, 4, 6, 8]
    assert p.stage_of()["lm_head"] == 3 and p.stage_of()["wte"] == 0
    # type:block -> weights [0 0 1 1 1 1 0 0] into 2: [0 0 1 1 | 1 1 0 0] (2 | 2), the only spread-0 cut
    p = baseline("type:block", gm, cm, num_stages=2, num_microbatches=2)
    assert p.extra["parts"] == [0, 4, 8] and p.solver == "type:block"
    # parameters: the tied embedding counts on wte and on lm_head, as DeepSpeed's TiedLayerSpec does
    counts = [sum(q.numel() for q in m.parameters()) for m in
              [model.wte, model.wpe, *model.blocks, model.ln_f, model.lm_head]]
    p = baseline("parameters", gm, cm, num_stages=2, num_microbatches=2)
    assert p.extra["parts"] == partition_balanced(counts, 2)
    with pytest.raises(ConfigError, match=r"'type:conv' found no layer.*'Block', 'Embedding'"):
        baseline("type:conv", gm, cm, num_stages=2, num_microbatches=2)
    with pytest.raises(PartitionError, match="8 layers.*fewer than num_stages=9"):
        baseline("uniform", gm, cm, num_stages=9, num_microbatches=9)


def test_sequential_layers_are_the_children() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 4)
    gm = trace(model, (x,))
    shape_prop(gm, x)
    assert [u.key for u in layer_units(gm)] == ["0", "1", "2", "3", "4"]
    assert [u.type_name for u in layer_units(gm)] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]


def test_over_memory_is_reported_not_raised(gpt) -> None:
    gm, cm = gpt
    plan = baseline("time", gm, cm, num_stages=4, num_microbatches=8, memory_limit=10**6)
    assert plan.extra["over_memory"] and plan.extra["over_memory_stages"]
    assert plan.stages[0].recompute            # recomputation tried where it saves memory


def test_unknown_baseline(gpt) -> None:
    gm, cm = gpt
    with pytest.raises(ConfigError, match="unknown baseline 'greedy'.*uniform"):
        baseline("greedy", gm, cm, num_stages=2, num_microbatches=2)
    with pytest.raises(ConfigError, match="num_stages=999"):
        baseline("parameters", gm, cm, num_stages=999, num_microbatches=2)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        baseline("type:(", gm, cm, num_stages=2, num_microbatches=2)
