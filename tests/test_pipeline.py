"""End to end: fxpipe.compile + Pipeline.step against a float64 single-device reference (docs/semantics.md)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

import fxpipe
from models import CASES, gpt_case

SGDM = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731 - one optimizer state, exercised


def reference_losses(model, batches, loss_fn, m, schedule, make_opt=SGDM):
    """Single-device reference: W(t+1) = W(t) - step(grad f(W(max(t-1,0)))) for 2bw, W(t) for flush/gpipe."""
    ref = copy.deepcopy(model)
    opt = make_opt(list(ref.parameters()))
    names = [n for n, _ in ref.named_parameters()]
    prev = None
    losses = []
    for t, (x, y) in enumerate(batches):
        newest = {n: p.detach().clone() for n, p in ref.named_parameters()}
        used = newest if (schedule != "2bw" or prev is None) else prev
        leaves = {n: v.clone().requires_grad_(True) for n, v in used.items()}
        total = 0.0
        for xm, ym in zip(x.chunk(m), y.chunk(m)):
            loss = loss_fn(functional_call(ref, leaves, (xm,)), ym)
            (loss / m).backward()
            total += loss.item()
        losses.append(total / m)
        for n, p in ref.named_parameters():
            p.grad = leaves[n].grad
        opt.step()
        opt.zero_grad()
        prev = newest
    return losses, ref


def batches_for(x, y, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        px = torch.randperm(x.shape[0], generator=g)
        noise = 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype) if x.is_floating_point() else 0
        out.append((x[px] + noise, y[px]))
    return out


def equal_split_plan(model, x, stages, m, schedule):
    """A plan cutting the traced graph into equal runs of operations (long skips then cross stages)."""
    from fxpipe.api import prepare
    from fxpipe.passes.partition import plan_from_assignment

    cg = prepare(model, (x,), num_microbatches=m)
    compute = [n.name for n in cg.gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    stage_of = {n: i * stages // len(compute) for i, n in enumerate(compute)}
    return plan_from_assignment(cg.gm, cg.cost_model, stage_of, [False] * stages, num_microbatches=m,
                                schedule=schedule, solver="equal")


@pytest.mark.parametrize("schedule", ["2bw", "flush", "gpipe"])
@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("case", ["mlp", "skip", "gpt"])
def test_matches_reference(case, stages, schedule):
    model, x, y, loss_fn = CASES[case]()
    m = 4
    batches = batches_for(x, y)
    ref_losses, ref = reference_losses(model, batches, loss_fn, m, schedule)
    # the solver's plan, except for SkipNet whose skips must cross several stages: an equal split
    given = equal_split_plan(model, x, stages, m, schedule) if case == "skip" else None
    pipe = fxpipe.compile(model, (x,), num_stages=stages, num_microbatches=m, schedule=schedule,
                          loss_fn=loss_fn, optimizer=SGDM, plan=given)
    assert pipe.plan.num_stages == stages and len(pipe.stages) == stages
    if case == "skip" and stages >= 3:
        hops = [st.index - src.stage for st in pipe.program.stages for src in st.sources if src.kind == "stage"]
        assert max(hops) >= 2, "a skip connection must cross at least two stage boundaries"
    assert all(isinstance(s, torch.fx.GraphModule) for s in pipe.stages)
    got = [pipe.step(bx, by).item() for bx, by in batches]
    assert got == pytest.approx(ref_losses, abs=1e-10, rel=0)
    sd = pipe.state_dict()
    ref_sd = ref.state_dict()
    assert set(sd) == set(ref_sd)
    for k in ref_sd:
        torch.testing.assert_close(sd[k], ref_sd[k], atol=1e-10, rtol=0, msg=k)
    torch.testing.assert_close(pipe(x), ref(x), atol=1e-10, rtol=0)


def test_2bw_differs_from_flush_so_the_reference_discriminates():
    model, x, y, loss_fn = gpt_case()
    batches = batches_for(x, y)
    a, _ = reference_losses(model, batches, loss_fn, 4, "2bw")
    b, _ = reference_losses(model, batches, loss_fn, 4, "flush")
    assert a[0] == pytest.approx(b[0], abs=1e-12)      # batch 0 uses W(0) under both
    assert abs(a[1] - b[1]) > 1e-6                      # batch 1: 2bw still W(0), flush already W(1)


def test_tied_embedding_gradient_sums_both_uses():
    model, x, y, loss_fn = gpt_case()
    pipe = fxpipe.compile(model, (x,), num_stages=3, num_microbatches=4, schedule="flush", loss_fn=loss_fn,
                          optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    owners = [i for i, st in enumerate(pipe.stages)
              if any(p is model.wte.weight for p in st.parameters())]
    assert owners[0] == 0 and owners[-1] == 2, "tied weight must be read by the first and last stage"
    before = model.wte.weight.detach().clone()
    ref = copy.deepcopy(model)
    loss = sum(loss_fn(ref(xm), ym) for xm, ym in zip(x.chunk(4), y.chunk(4))) / 4
    loss.backward()
    pipe.step(x, y)
    torch.testing.assert_close(pipe.state_dict()["wte.weight"], before - ref.wte.weight.grad, atol=1e-12, rtol=0)
    assert pipe.state_dict()["lm_head.weight"].data_ptr() != 0
    torch.testing.assert_close(pipe.state_dict()["lm_head.weight"], pipe.state_dict()["wte.weight"])


def test_recompute_changes_no_number():
    model, x, y, loss_fn = CASES["skip"]()
    batches = batches_for(x, y, n=3)
    runs = []
    for rc in (False, True):
        pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=3, num_microbatches=4, schedule="2bw",
                              loss_fn=loss_fn, optimizer=SGDM, recompute=rc)
        assert all(s.recompute == rc for s in pipe.plan.stages)
        runs.append([pipe.step(bx, by).item() for bx, by in batches])
    assert runs[0] == pytest.approx(runs[1], abs=1e-12, rel=0)


def test_state_dict_round_trip_restarts_from_loaded_weights():
    model, x, y, loss_fn = CASES["mlp"]()
    batches = batches_for(x, y)
    pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=2, num_microbatches=4, schedule="2bw",
                          loss_fn=loss_fn, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    for bx, by in batches:
        pipe.step(bx, by)
    trained = pipe.state_dict()
    pipe.load_state_dict(model.state_dict())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(pipe.state_dict()[k], v, atol=0, rtol=0)
    ref_losses, _ = reference_losses(model, batches, loss_fn, 4, "2bw", lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert [pipe.step(bx, by).item() for bx, by in batches] == pytest.approx(ref_losses, abs=1e-10)
    assert any(not torch.equal(trained[k], v) for k, v in model.state_dict().items())


def test_at_most_two_weight_versions_alive_under_2bw():
    model, x, y, loss_fn = CASES["mlp"]()
    pipe = fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, schedule="2bw", loss_fn=loss_fn)
    for bx, by in batches_for(x, y, n=5):
        pipe.step(bx, by)
        for rt in pipe._executor.runtimes:
            assert len(rt.weights.alive) <= 2
    assert max(len(rt.weights.alive) for rt in pipe._executor.runtimes) == 2


def test_compile_with_a_plan_for_another_graph_is_rejected():
    model, x, y, loss_fn = CASES["mlp"]()
    other, ox, _, _ = CASES["skip"]()
    wrong = equal_split_plan(other, ox, 2, 4, "2bw")
    with pytest.raises(fxpipe.ConfigError, match=r"plan does not match the traced graph of MLP"):
        fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, loss_fn=loss_fn, plan=wrong)


def test_plan_json_round_trip_compiles_to_the_same_stages():
    model, x, y, loss_fn = CASES["gpt"]()
    p = fxpipe.plan(model, (x,), num_stages=3, num_microbatches=4)
    again = fxpipe.Plan.from_json(p.to_json())
    assert again == p
    pipe = fxpipe.compile(model, (x,), num_stages=3, num_microbatches=4, loss_fn=loss_fn, plan=again)
    assert [s.nodes for s in pipe.plan.stages] == [s.nodes for s in p.stages]
