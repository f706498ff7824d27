"""Tests of passes/shape_prop.py: fake-tensor shape propagation, meta-device models, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch._subclasses import FakeTensor

from fxpipe.errors import FxpipeError, TraceError
from fxpipe.passes.shape_prop import shape_prop
from fxpipe.trace import trace
from models import MLP, SkipNet, TinyGPT


def _node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def test_vals_match_a_real_forward() -> None:
    model = MLP()
    x = torch.randn(4, 16)
    gm = trace(model, (x,))
    assert shape_prop(gm, x) is gm
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert isinstance(out.meta["val"], FakeTensor)
    assert out.meta["val"].shape == model(x).shape == (4, 8)
    assert out.meta["tensor_meta"].shape == (4, 8)
    assert out.meta["tensor_meta"].dtype == torch.float32
    assert out.meta["val"].requires_grad  # parameters require grad, so the output does
    assert not _node(gm, "x").meta["val"].requires_grad


def test_shape_arithmetic_is_python_ints() -> None:
    model = TinyGPT()
    x = torch.zeros(3, 8, dtype=torch.long)
    gm = trace(model, (x,))
    shape_prop(gm, x)
    getitem = _node(gm, "getitem")  # idx.shape[1]
    assert getitem.meta["val"] == 8 and type(getitem.meta["val"]) is int
    assert "tensor_meta" not in getitem.meta
    assert _node(gm, "lm_head").meta["val"].shape == (3, 8, 37)


def test_meta_device_model_uses_no_real_memory() -> None:
    with torch.device("meta"):
        model = TinyGPT(vocab=1000, d=64, n_layer=2, n_head=4, block=16)
    x = torch.zeros(2, 16, dtype=torch.long)
    gm = trace(model, (x,))
    shape_prop(gm, x)
    out = _node(gm, "lm_head").meta["val"]
    assert out.shape == (2, 16, 1000) and isinstance(out, FakeTensor)
    assert all(p.device.type == "meta" for p in model.parameters())  # the model is untouched
    # meta inputs work too
    gm2 = trace(model, (x,))
    shape_prop(gm2, torch.zeros(2, 16, dtype=torch.long, device="meta"))
    assert _node(gm2, "lm_head").meta["val"].shape == (2, 16, 1000)


def test_buffers_and_deepcopy() -> None:
    model = SkipNet()
    x = torch.randn(5, 12)
    gm = trace(model, (x,))
    shape_prop(gm, x)
    assert _node(gm, "cat").meta["val"].shape == (5, 24)
    copy.deepcopy(gm)  # stored values are leaves, so graphs stay copyable


def test_keyword_inputs() -> None:
    class Two(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x @ y

    gm = torch.fx.symbolic_trace(Two())
    shape_prop(gm, torch.randn(2, 3), y=torch.randn(3, 7))
    assert list(gm.graph.nodes)[2].meta["val"].shape == (2, 7)


def test_failure_names_pass_and_node() -> None:
    model = MLP()
    gm = trace(model, (torch.randn(4, 16),))
    with pytest.raises(TraceError, match=r"shape_prop: node .*layers_0.*failed on fake tensors.*(mat1|shape)"):
        shape_prop(gm, torch.randn(4, 15))


def test_missing_and_unknown_inputs() -> None:
    gm = trace(MLP(), (torch.randn(4, 16),))
    with pytest.raises(TraceError, match=r"no example value for placeholder.*x"):
        shape_prop(gm)
    with pytest.raises(FxpipeError, match=r"keyword inputs \['z'\] match no placeholder"):
        shape_prop(gm, torch.randn(4, 16), z=1)


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: cannot run on fake tensors
            return x * 2
        return x - 1


class _WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.gate = _Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.a(x))


def test_data_dependent_leaf_runs_on_real_tensors() -> None:
    with torch.device("meta"):
        model = _WithGate()
    x = torch.randn(3, 6)
    gm = trace(model, (x,), leaf_modules=[_Gate])
    shape_prop(gm, x)
    val = _node(gm, "gate").meta["val"]
    assert isinstance(val, FakeTensor) and val.shape == (3, 6) and val.requires_grad
