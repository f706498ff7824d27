"""pipe.report(): predicted vs measured per stage; pipe.replan(): a plan from the measurements."""

from __future__ import annotations

import copy

import pytest
import torch

import fxpipe
from fxpipe.calibrate import StageMeasurement, calibrated_cost_model
from models import CASES
from test_pipeline import SGDM, batches_for, reference_losses


def test_report_needs_a_step_then_shows_every_stage():
    model, x, y, loss_fn = CASES["gpt"]()
    pipe = fxpipe.compile(model, (x,), num_stages=3, num_microbatches=4, schedule="flush", loss_fn=loss_fn)
    with pytest.raises(fxpipe.ConfigError, match=r"no measurements yet: call pipe.step"):
        pipe.report()
    pipe.step(x, y)
    text = pipe.report()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["stage", "fwd", "pred"]
    assert [l.split()[0] for l in lines[2:5]] == ["0", "1", "2"]
    assert "bottleneck compute: predicted" in text
    rts = pipe._executor.runtimes
    assert all(len(rt.fwd_seconds) == 4 and len(rt.bwd_seconds) == 4 for rt in rts)
    assert all(t > 0 for rt in rts for t in rt.fwd_seconds + rt.bwd_seconds)


def test_measured_saved_bytes_match_autograd_for_a_linear_chain():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).double()
    x = torch.randn(8, 16, dtype=torch.float64)
    pipe = fxpipe.compile(model, (x,), num_stages=1, num_microbatches=2, schedule="flush",
                          loss_fn=lambda o, t: (o - t).pow(2).mean())
    pipe.step(x, torch.zeros(8, 8, dtype=torch.float64))
    # Linear(16,32) saves its input (a 4x16 view of the 8x16 batch: only the view counts), ReLU its output
    # (4x32), which Linear(32,8) saves again (counted once); weights are not activations. float64: 8 bytes.
    assert pipe._executor.runtimes[0].saved_bytes == [8 * (4 * 16 + 4 * 32)]


@pytest.mark.parametrize("stages", [2, 3])
def test_predicted_stash_per_stage_is_what_the_stage_holds(stages):
    """A_s + X_s per microbatch against what autograd saved plus the received inputs, stage by stage.

    Tanh saves its output, so every cut of this chain is a tensor both sides keep: the producing
    stage in autograd, the consuming stage as its received input (charged once in A, once in X).
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(24, 24), torch.nn.Tanh())]).double()
    x, y = torch.randn(16, 24, dtype=torch.float64), torch.randn(16, 24, dtype=torch.float64)
    pipe = fxpipe.compile(model, (x,), num_stages=stages, num_microbatches=4, schedule="flush",
                          loss_fn=torch.nn.functional.mse_loss)
    pipe.step(x, y)
    for st, rt in zip(pipe.plan.stages, pipe._executor.runtimes):
        assert st.received_bytes == (0 if st.index == 0 else 4 * 24 * 8)
        assert rt.saved_bytes == [st.activation_bytes + st.received_bytes], (st.index, st.nodes)


def test_calibrated_costs_scale_by_stage_ratio():
    model, x, y, loss_fn = CASES["mlp"]()
    plan = fxpipe.plan(model, (x,), num_stages=2, num_microbatches=4, schedule="flush")
    meas = [StageMeasurement(0, plan.stages[0].fwd_time * 3, plan.stages[0].bwd_time * 3, 0),
            StageMeasurement(1, plan.stages[1].fwd_time, plan.stages[1].bwd_time / 2, 0)]

    class Zero:
        def node_cost(self, node):
            return fxpipe.NodeCost(fwd_time=1.0, bwd_time=1.0)

        def comm_time(self, nbytes):
            return 0.0

    cm = calibrated_cost_model(plan, meas, Zero())
    first, last = plan.stages[0].nodes[0], plan.stages[1].nodes[-1]
    assert cm.factors[first][:2] == pytest.approx((3.0, 3.0))
    assert cm.factors[last][:2] == pytest.approx((1.0, 0.5))


def test_replan_keeps_training_exactly():
    model, x, y, loss_fn = CASES["skip"]()
    batches = batches_for(x, y, n=4)
    ref_losses, ref = reference_losses(model, batches, loss_fn, 4, "flush")
    pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=2, num_microbatches=4, schedule="flush",
                          loss_fn=loss_fn, optimizer=SGDM)
    got = [pipe.step(*batches[0]).item(), pipe.step(*batches[1]).item()]
    pipe2 = pipe.replan()
    assert pipe2.plan.num_stages == 2
    got += [pipe2.step(*batches[2]).item(), pipe2.step(*batches[3]).item()]
    assert got == pytest.approx(ref_losses, abs=1e-10, rel=0)   # momentum carried over, flush semantics
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(pipe2.state_dict()[k], v, atol=1e-10, rtol=0)
