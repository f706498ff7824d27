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
