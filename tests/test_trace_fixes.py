"""In-place updates and torch.no_grad regions: every 2-stage cut trains like a float64 reference loop."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpipe
from fxpipe.api import prepare
from fxpipe.passes.partition import plan_from_assignment
from fxpipe.trace import trace
from fxpipe.trace_fixes import META_NO_GRAD, detach_no_grad_values, fx_mutations, grad_toggles_to_meta
from test_pipeline import SGDM, batches_for, reference_losses

COMPUTE = ("call_function", "call_method", "call_module")
M = 2


def _train_at_every_cut(model: nn.Module, x: torch.Tensor, y: torch.Tensor, schedule: str = "flush") -> int:
    """Compile ``model`` once per 2-stage cut of its traced graph (in graph order) and train 3 batches."""
    batches = batches_for(x, y, n=3)
    want, ref = reference_losses(model, batches, F.mse_loss, M, schedule)
    cg = prepare(model, (x,), num_microbatches=M)
    compute = [n.name for n in cg.gm.graph.nodes if n.op in COMPUTE]
    for k in range(1, len(compute)):
        stage_of = {n: int(i >= k) for i, n in enumerate(compute)}
        plan = plan_from_assignment(cg.gm, cg.cost_model, stage_of, [False, False], num_microbatches=M,
                                    schedule=schedule, solver="hand")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=2, num_microbatches=M, schedule=schedule,
                                  loss_fn=F.mse_loss, optimizer=SGDM, plan=plan)
        got = [pipe.step(bx, by).item() for bx, by in batches]
        assert got == pytest.approx(want, abs=1e-12, rel=0), f"cut after {compute[k - 1]!r}"
        for name, v in ref.state_dict().items():
            torch.testing.assert_close(pipe.state_dict()[name], v, atol=1e-12, rtol=0,
                                       msg=f"{name}, cut after {compute[k - 1]!r}")
        assert torch.is_grad_enabled()
    return len(compute) - 1


# -- torch.no_grad ----------------------------------------------------------------------------------------


class NoGradMiddle(nn.Module):
    """``with torch.no_grad():`` between two trainable layers: plain fx records no trace of it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            y = torch.sin(self.b(h)) * 2
        return self.c(h + y)


class Rotary(nn.Module):
    """HF's rotary embedding pattern: a ``@torch.no_grad()`` forward from a buffer and the positions."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)))

    @torch.no_grad()
    def forward(self, x):
        pos = torch.arange(x.shape[1], dtype=x.dtype)
        f = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((f, f), dim=-1)
        return emb.cos() + x.mean() * 0, emb.sin()


class HFStyle(nn.Module):
    """Shape-dependent control flow as in HF's masking code (plain fx fails, torch.export specialises on it)
    around a no-grad rotary embedding."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.rot = Rotary(d)

    def forward(self, x, **kwargs):
        h = self.a(x)
        if x.shape[1] > 1:
            h = h * 0.5
        cos, sin = self.rot(h)
        return self.b(h * cos + torch.tanh(h) * sin)


def test_fx_marks_no_grad_nodes_and_detaches_where_the_region_ends():
    model = NoGradMiddle().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    gm = trace(model, (x,))
    assert gm.meta["fxpipe.tracer"] == "fx"
    marked = [n.name for n in gm.graph.nodes if n.meta.get(META_NO_GRAD)]
    assert marked == ["b", "sin", "mul"], marked
    from fxpipe.ir import META_COST

    cg = prepare(model, (x,), num_microbatches=1)
    for n in cg.gm.graph.nodes:         # backward never reaches the region, and it saves nothing
        if n.name in marked:
            assert n.meta[META_COST].bwd_time == 0 and n.meta[META_COST].activation_bytes == 0, n.name
        elif n.name == "a":
            assert n.meta[META_COST].bwd_time > 0
    gm(x).sum().backward()
    assert model.b.weight.grad is None and model.a.weight.grad is not None
    want = copy.deepcopy(model)
    want(x).sum().backward()
    torch.testing.assert_close(model.a.weight.grad, want.a.weight.grad, atol=0, rtol=0)


@pytest.mark.parametrize("make", [NoGradMiddle, HFStyle])
def test_no_grad_region_trains_exactly_at_every_cut(make):
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(8, 5, 6, dtype=torch.float64), torch.randn(8, 5, 6, dtype=torch.float64)
    gm = trace(model, (x[:4],))
    if make is HFStyle:   # export keeps the region as one higher-order node, which no plan can cut
        assert gm.meta["fxpipe.tracer"] == "export"
        assert any(n.target is torch.ops.higher_order.wrap_with_set_grad_enabled for n in gm.graph.nodes)
    else:
        assert gm.meta["fxpipe.tracer"] == "fx" and any(n.meta.get(META_NO_GRAD) for n in gm.graph.nodes)
    assert _train_at_every_cut(model, x, y) >= 4


def test_grad_toggles_become_marks_and_the_region_stays_exact():
    """make_fx (pre-dispatch) writes ``torch._C._set_grad_enabled`` nodes, which read nothing: gone after."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model = NoGradMiddle().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    params = dict(model.named_parameters())
    gm = make_fx(lambda p, x: torch.func.functional_call(model, p, (x,)), pre_dispatch=True)(params, x)
    toggles = [n for n in gm.graph.nodes if n.target is torch._C._set_grad_enabled]
    assert len(toggles) == 2
    grad_toggles_to_meta(gm)
    detach_no_grad_values(gm)
    assert not any(n.target is torch._C._set_grad_enabled for n in gm.graph.nodes)
    assert sum(bool(n.meta.get(META_NO_GRAD)) for n in gm.graph.nodes) >= 3
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    gm(leaves, x).sum().backward()
    model(x).sum().backward()
    assert leaves["b.weight"].grad is None and model.b.weight.grad is None
    torch.testing.assert_close(leaves["a.weight"].grad, model.a.weight.grad, atol=0, rtol=0)
    assert torch.is_grad_enabled()


# -- in-place updates -------------------------------------------------------------------------------------


class InPlace(nn.Module):
    """``x.add_``, ``torch.relu_``, ``x += y`` and ``s[:, 1:] = x`` on tensors that later nodes read."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = self.a(x)
        g = h * 2
        g.add_(1.0)
        r = torch.relu_(g * 1)
        t = h.clone()
        t += r
        s = torch.zeros_like(h)
        s[:, 1:] = h[:, :-1]
        return self.b(t + g + s)


class AugmentedAlias(nn.Module):
    """``k += 1`` where another name (``z``) holds the same tensor: plain fx records ``k + 1`` and z misses it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        k = h * 1.0
        z = k
        k += 1.0
        return self.b(z) + h


class InplaceReLU(nn.Module):
    """``nn.ReLU(inplace=True)`` on a value a residual reads afterwards (torchgpipe's ResNet blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 6)

    def forward(self, x):
        h = self.a(x) * 1.0
        r = self.act(h)
        return self.b(r) + h


@pytest.mark.parametrize("make", [InPlace, AugmentedAlias, InplaceReLU])
def test_in_place_updates_go_to_export_and_train_exactly_at_every_cut(make):
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    gm = trace(model, (x,))
    assert gm.meta["fxpipe.tracer"] == "export"
    out = gm(x)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, model(x), atol=0, rtol=0)
    assert _train_at_every_cut(model, x, y) >= 4


def test_fx_sees_every_kind_of_in_place_update():
    from fxpipe.trace import FxpipeTracer

    class Methods(nn.Module):
        def forward(self, x):
            g = x * 2
            g.add_(1.0)
            return torch.relu_(g * 1) + F.relu(g, inplace=True)

    cases = {Methods: {"add_", "relu_", "relu"}, AugmentedAlias: {"iadd"}, InplaceReLU: {"act"}}
    for make, want in cases.items():
        model = make()
        gm = torch.fx.GraphModule(model, FxpipeTracer().trace(model))
        got = set(fx_mutations(gm))
        assert want <= got, (make.__name__, got)
    clean = torch.fx.symbolic_trace(NoGradMiddle())
    assert fx_mutations(clean) == []


class _UpdatedInPlace(nn.Module):
    """``h`` is read before (``h * 2``) and after (``self.c(h)``) an in-place update, made directly
    (``h.add_``) or, with ``through_view``, through a view of it (``h[:, :4].add_``)."""

    def __init__(self, through_view: bool = False) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(8, 8), nn.Linear(8, 8)
        self.through_view = through_view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        g = h * 2.0
        (h[:, :4] if self.through_view else h).add_(1.0)
        return self.c(h) + g


@pytest.fixture
def no_export(monkeypatch):
    """torch.export fails on every model: fxpipe keeps the plain fx graph."""
    import fxpipe.trace as trace_mod

    def refuse(*a, **k):
        raise RuntimeError("export refused (test)")

    monkeypatch.setattr(trace_mod, "_export", refuse)


def _three_stage_plans(cg):
    compute = [n.name for n in cg.gm.graph.nodes if n.op in COMPUTE]
    for i in range(1, len(compute)):
        for j in range(i + 1, len(compute)):
            stage_of = {n: (k >= i) + (k >= j) for k, n in enumerate(compute)}
            yield stage_of, plan_from_assignment(cg.gm, cg.cost_model, stage_of, [False] * 3, num_microbatches=M,
                                                 schedule="flush", solver="hand")


def test_fx_in_place_updates_become_edges_when_export_fails(no_export):
    """Export failing leaves a plain fx graph: the update of a tensor nothing aliases becomes an update of a
    copy that later readers read, so every 3-stage plan trains like the model (before: 5 of 6 refused)."""
    torch.manual_seed(0)
    model = _UpdatedInPlace().double()
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    batches = batches_for(x, y, n=2)
    want, ref = reference_losses(model, batches, F.mse_loss, M, "flush")
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # nothing is left to warn about
        cg = prepare(model, (x,), num_microbatches=M)
    compute = [n.name for n in cg.gm.graph.nodes if n.op in COMPUTE]
    assert compute == ["a", "mul", "mutated_copy", "c", "add"], compute
    assert "fxpipe.fx_mutations" not in cg.gm.meta
    trained = 0
    for _, plan in _three_stage_plans(cg):
        pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=3, num_microbatches=M,
                              schedule="flush", loss_fn=F.mse_loss, optimizer=SGDM, plan=plan)
        got = [pipe.step(bx, by).item() for bx, by in batches]
        assert got == pytest.approx(want, abs=1e-12, rel=0), plan.stage_of()
        for name, v in ref.state_dict().items():
            torch.testing.assert_close(pipe.state_dict()[name], v, atol=1e-12, rtol=0, msg=name)
        trained += 1
    assert trained == 6


def test_plans_that_split_an_fx_update_through_a_view_are_refused_when_export_fails(no_export):
    """An update through a view stays an fx node: each 3-stage plan trains exactly or is refused."""
    torch.manual_seed(0)
    model = _UpdatedInPlace(through_view=True).double()
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    batches = batches_for(x, y, n=2)
    want, ref = reference_losses(model, batches, F.mse_loss, M, "flush")
    with pytest.warns(UserWarning, match="updates tensors in place .*alias"):
        cg = prepare(model, (x,), num_microbatches=M)
    assert cg.gm.meta["fxpipe.fx_mutations"] == ["add_"]
    refused, trained = [], []
    for stage_of, plan in _three_stage_plans(cg):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=3, num_microbatches=M,
                                      schedule="flush", loss_fn=F.mse_loss, optimizer=SGDM, plan=plan)
            except fxpipe.PartitionError as e:
                assert "in-place update 'add_'" in str(e) and "out of place" in str(e)
                refused.append(stage_of)
                continue
        got = [pipe.step(bx, by).item() for bx, by in batches]
        assert got == pytest.approx(want, abs=1e-12, rel=0), stage_of
        trained.append(stage_of)
    assert refused and trained, (refused, trained)
