"""Tests of passes/annotate.py: tied parameters counted once, cost-model validation, resolving cost models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fxpipe.cost_models.analytic import AnalyticCostModel
from fxpipe.cost_models.profiled import ProfiledCostModel
from fxpipe.errors import ConfigError, CostModelError
from fxpipe.ir import META_COST, META_PARAM_BYTES, META_PARAMS, NodeCost
from fxpipe.passes.annotate import annotate, resolve_cost_model
from fxpipe.passes.shape_prop import shape_prop
from fxpipe.trace import trace
from models import MLP, SkipNet, TinyGPT


def _gpt_graph() -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    model = TinyGPT()
    x = torch.zeros(2, 8, dtype=torch.long)
    gm = trace(model, (x,))
    shape_prop(gm, x)
    return model, gm


def _unique_param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups ties


def test_tied_parameters_are_counted_once() -> None:
    model, gm = _gpt_graph()
    annotate(gm, "analytic")
    table = gm.meta[META_PARAM_BYTES]
    assert "wte.weight" in table and "lm_head.weight" not in table
    assert sum(table.values()) == _unique_param_bytes(model)
    assert sum(n.meta[META_COST].param_bytes for n in gm.graph.nodes) == _unique_param_bytes(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["lm_head"].meta[META_PARAMS] == ("wte.weight",)  # the tied head reads wte.weight ...
    assert nodes["lm_head"].meta[META_COST].param_bytes == 0        # ... which wte, its first user, paid for
    assert nodes["wte"].meta[META_COST].param_bytes == 37 * 16 * 4
    assert nodes["blocks_0_qkv"].meta[META_PARAMS] == ("blocks.0.qkv.weight", "blocks.0.qkv.bias")


def test_params_read_through_get_attr() -> None:
    model = TinyGPT()
    x = torch.zeros(2, 8, dtype=torch.long)
    gm = torch.export.export(model, (x,), strict=False).module()  # parameters are get_attr nodes here
    shape_prop(gm, x)
    annotate(gm, AnalyticCostModel())
    assert "wte.weight" in gm.meta[META_PARAM_BYTES] and "lm_head.weight" not in gm.meta[META_PARAM_BYTES]
    assert sum(n.meta[META_COST].param_bytes for n in gm.graph.nodes) == _unique_param_bytes(model)
    users = [n for n in gm.graph.nodes if n.op != "get_attr" and "wte.weight" in n.meta[META_PARAMS]]
    assert len(users) == 2  # the embedding and the tied head


def test_placeholders_outputs_and_get_attr_cost_nothing() -> None:
    model = SkipNet()
    x = torch.randn(4, 12)
    gm = trace(model, (x,))
    shape_prop(gm, x)
    annotate(gm, AnalyticCostModel())
    for n in gm.graph.nodes:
        c = n.meta[META_COST]
        if n.op in ("placeholder", "output", "get_attr"):
            assert c.fwd_time == c.bwd_time == c.activation_bytes == c.param_bytes == 0
        else:
            assert isinstance(c, NodeCost)
    x_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert x_node.meta[META_COST].output_bytes == 4 * 12 * 4  # what the planner sends if it is cut
    assert all(n.meta[META_PARAMS] == () for n in gm.graph.nodes if n.op == "get_attr")  # "scale" is a buffer


def test_annotate_requires_shape_prop() -> None:
    gm = trace(MLP(), (torch.randn(2, 16),))
    with pytest.raises(ConfigError, match=r"no node.meta\['val'\].*run fxpipe.passes.shape_prop"):
        annotate(gm, AnalyticCostModel())


class _Returns:
    def __init__(self, fn) -> None:
        self.fn = fn

    def node_cost(self, node: torch.fx.Node):
        return self.fn(node)

    def comm_time(self, nbytes: int) -> float:
        return 0.0


def _nan_cost(node: torch.fx.Node) -> NodeCost:
    c = NodeCost(fwd_time=1.0)
    object.__setattr__(c, "bwd_time", float("nan"))  # a cost model that skipped validation
    return c


@pytest.mark.parametrize("fn, match", [
    (lambda n: {"fwd_time": 1.0}, r"_Returns.node_cost returned dict .* for node .*layers_0.*NodeCost"),
    (lambda n: NodeCost(fwd_time=-1.0), r"_Returns.* failed on node .*layers_0.*fwd_time must be .* >= 0, got -1"),
    (_nan_cost, r"_Returns gave node .*layers_0.* bwd_time=nan; costs must be finite numbers >= 0"),
    (lambda n: 1 / 0, r"failed on node .*layers_0.*ZeroDivisionError"),
])
def test_bad_cost_models_are_named(fn, match) -> None:
    x = torch.randn(2, 16)
    gm = trace(MLP(), (x,))
    shape_prop(gm, x)
    with pytest.raises(CostModelError, match=match):
        annotate(gm, _Returns(fn))


def test_resolve_cost_model(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FXPIPE_CACHE_DIR", str(tmp_path))
    assert isinstance(resolve_cost_model("analytic", "a100-80gb"), AnalyticCostModel)
    assert resolve_cost_model(None, "a100-80gb").device.name == "a100-80gb"
    assert isinstance(resolve_cost_model("profile", "a100-80gb"), ProfiledCostModel)
    custom = _Returns(lambda n: NodeCost())
    assert resolve_cost_model(custom) is custom
    with pytest.raises(ConfigError, match=r"unknown cost_model 'roofline'; choose one of \['analytic', 'profile'\]"):
        resolve_cost_model("roofline")
    with pytest.raises(ConfigError, match=r"cost_model object has no callable node_cost or comm_time"):
        resolve_cost_model(object())  # type: ignore[arg-type]


def test_annotation_is_repeatable() -> None:
    _, gm = _gpt_graph()
    annotate(gm, AnalyticCostModel("a100-80gb"))
    first = {n.name: n.meta[META_COST] for n in gm.graph.nodes}
    annotate(gm, AnalyticCostModel("a100-80gb"))
    assert first == {n.name: n.meta[META_COST] for n in gm.graph.nodes}
    assert all(dataclasses.is_dataclass(c) for c in first.values())


class _Injected:
    """A custom cost model: injected times and activations, parameters priced ``factor`` x their real bytes
    (a model built small to stand for a big one, or another dtype)."""

    def __init__(self, rng, factor: float) -> None:
        self.rng, self.factor, self.costs = rng, factor, {}

    def real_param_bytes(self, node: torch.fx.Node) -> int:
        gm = node.graph.owning_module
        ps = {id(p): p for p in gm.get_submodule(str(node.target)).parameters()} if node.op == "call_module" else {}
        for a in node.all_input_nodes:
            if a.op == "get_attr" and isinstance(getattr(gm, str(a.target), None), torch.nn.Parameter):
                ps[id(a)] = getattr(gm, str(a.target))
        return sum(p.numel() * p.element_size() for p in ps.values())

    def node_cost(self, node: torch.fx.Node) -> NodeCost:
        if node.name not in self.costs:
            out = node.meta["val"]
            self.costs[node.name] = NodeCost(
                # later nodes heavier: the balanced split is not the one that balances parameters
                fwd_time=self.rng.uniform(1, 3) * (1 + len(self.costs)), bwd_time=self.rng.uniform(2, 6),
                activation_bytes=self.rng.randint(1, 20),
                output_bytes=int(out.numel() * out.element_size()) if isinstance(out, torch.Tensor) else 0,
                param_bytes=int(self.factor * self.real_param_bytes(node)))
        return self.costs[node.name]

    def comm_time(self, nbytes: int) -> float:
        return nbytes / 1e4


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_custom_param_bytes_are_what_the_planner_limits(seed, d) -> None:
    """A chain priced by a custom model (parameters at 10x): the plan under a tight memory limit is the
    exact DP's on the injected figures, and differs from the DP's on the real parameter bytes."""
    import itertools
    import random

    from fxpipe.passes.dp import best_contiguous_split
    from fxpipe.passes.partition import partition, plan_from_assignment
    from test_partition import make_graph

    rng = random.Random(seed)
    model, x = MLP((16, 64, 64, 16, 8, 8)), torch.randn(2, 16)    # parameters at the front, time at the back
    gm = trace(model, (x,))
    shape_prop(gm, x)
    cm = _Injected(rng, factor=10.0)
    annotate(gm, cm)
    compute = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert sum(gm.meta[META_PARAM_BYTES].values()) == 10 * _unique_param_bytes(model)
    assert [n.meta[META_COST].param_bytes for n in compute] == [cm.costs[n.name].param_bytes for n in compute]

    def reference(factor: float) -> torch.fx.GraphModule:    # the chain with private parameters, by hand
        costs = [dataclasses.replace(cm.costs[n.name], param_bytes=int(factor * cm.real_param_bytes(n)))
                 for n in compute]
        ref = make_graph([[i - 1] if i else [] for i in range(len(compute))], costs, input_bytes=2 * 16 * 4)
        for nd in ref.graph.nodes:
            nd.meta.pop(META_PARAMS, None)
        return ref

    kw = dict(num_stages=d, num_microbatches=4, optimizer_slots=1)
    # every contiguous split of the injected chain: (bottleneck, peak memory); the tightest limit any meets
    names = [f"n{i}" for i in range(len(compute))]
    figures = []
    for cuts in itertools.combinations(range(1, len(names)), d - 1):
        stage_of = {n: sum(i >= c for c in cuts) for i, n in enumerate(names)}
        p = plan_from_assignment(reference(10.0), cm, stage_of, [False] * d, num_microbatches=4, schedule="2bw",
                                 optimizer_slots=1, check_memory=False)
        figures.append((p.bottleneck, max(s.memory for s in p.stages)))
    free = best_contiguous_split(reference(10.0), cm, recompute=False, **kw)
    free_peak = min(m for b, m in figures if b == pytest.approx(free.bottleneck, rel=1e-12))
    tight = max(m for _, m in figures if m < free_peak)     # the optimum no longer fits, something else does
    want = best_contiguous_split(reference(10.0), cm, memory_limit=tight, recompute=False, **kw)
    real = best_contiguous_split(reference(1.0), cm, memory_limit=tight, recompute=False, **kw)
    assert want.bottleneck == pytest.approx(min(b for b, m in figures if m <= tight), rel=1e-9)
    assert want.bottleneck > free.bottleneck, "the limit must bind on the priced bytes ..."
    assert real.bottleneck == pytest.approx(free.bottleneck, rel=1e-9), "... and not on the real ones"
    plan = partition(gm, cm, memory_limit=tight, recompute=False, **kw)
    assert plan.bottleneck == pytest.approx(want.bottleneck, rel=1e-9)
    assert max(s.memory for s in plan.stages) <= tight


def test_custom_param_bytes_keep_tied_parameters_once_per_stage() -> None:
    import random

    from fxpipe.passes.partition import plan_from_assignment

    model, gm = _gpt_graph()
    cm = _Injected(random.Random(0), factor=2.0)
    annotate(gm, cm)
    table = gm.meta[META_PARAM_BYTES]
    assert table["wte.weight"] == 2 * 37 * 16 * 4 and "lm_head.weight" not in table
    assert sum(table.values()) == 2 * _unique_param_bytes(model)
    compute = [n.name for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    stage_of = {n: i * 3 // len(compute) for i, n in enumerate(compute)}
    plan = plan_from_assignment(gm, cm, stage_of, [False] * 3, num_microbatches=4, schedule="2bw")
    for s in plan.stages:   # every stage holds, once, each parameter its nodes read, at the priced size
        read = {p for n in gm.graph.nodes if n.name in s.nodes for p in n.meta[META_PARAMS]}
        assert s.param_bytes == sum(table[p] for p in read)
    assert "wte.weight" in {p for n in gm.graph.nodes if n.name in plan.stages[0].nodes for p in n.meta[META_PARAMS]}
    assert "wte.weight" in {p for n in gm.graph.nodes if n.name in plan.stages[2].nodes for p in n.meta[META_PARAMS]}
