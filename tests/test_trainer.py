"""The trainer: clipping, LR schedulers, evaluate, bf16/fp16 and their checkpoints, against the loop in trainer_ref.

Every test compares fxpipe with the same training written with torch alone (``trainer_ref.reference``).
bf16/fp16 tolerances come from the autocast reference itself: fxpipe must be far closer to it than
the autocast reference is to the fp32 one.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxpipe
import models
from test_pipeline import batches_for
from trainer_ref import SGDM, max_err, reference

LAMBDA = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 3))  # noqa: E731
COSINE = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3, eta_min=0.001)  # noqa: E731


def _run(pipe, batches):
    return [pipe.step(bx, by).item() for bx, by in batches]


@pytest.mark.parametrize("schedule", ["2bw", "flush", "gpipe"])
def test_clipping_matches_clip_grad_norm_with_tied_weights(schedule):
    model, x, y, loss_fn = models.gpt_case()
    batches = batches_for(x, y, n=4)
    ref_losses, ref_norms, _, ref = reference(model, batches, loss_fn, 4, schedule, max_norm=0.3)
    assert min(ref_norms) > 0.3, "the norm must exceed max_grad_norm so clipping acts"
    pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=3, num_microbatches=4, schedule=schedule,
                          loss_fn=loss_fn, optimizer=SGDM, max_grad_norm=0.3)
    owners = [i for i, st in enumerate(pipe.stages) if any(p is pipe.model.wte.weight for p in st.parameters())]
    assert owners == [0, 2], "the tied embedding must be read by the first and the last stage"
    assert _run(pipe, batches) == pytest.approx(ref_losses, abs=1e-10, rel=0)
    assert max_err(pipe.state_dict(), ref.state_dict()) <= 1e-10
    assert pipe.last_grad_norm == pytest.approx(ref_norms[-1], abs=1e-10, rel=0)
    assert pipe.last_grad_norm_batch == len(batches) - 1      # the local executor: the step just taken
    unclipped, _, _, _ = reference(model, batches, loss_fn, 4, schedule)
    assert abs(unclipped[-1] - ref_losses[-1]) > 1e-6, "clipping changed nothing: the test would not discriminate"


@pytest.mark.parametrize("factory", [LAMBDA, COSINE], ids=["LambdaLR-warmup", "CosineAnnealingLR"])
@pytest.mark.parametrize("schedule", ["2bw", "flush"])
def test_lr_scheduler_steps_once_per_batch_after_the_update(schedule, factory):
    model, x, y, loss_fn = models.mlp_case()
    batches = batches_for(x, y, n=5)
    ref_losses, _, _, ref = reference(model, batches, loss_fn, 4, schedule, sched=factory)
    pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=2, num_microbatches=4, schedule=schedule,
                          loss_fn=loss_fn, optimizer=SGDM, lr_scheduler=factory)
    assert _run(pipe, batches) == pytest.approx(ref_losses, abs=1e-10, rel=0)
    assert max_err(pipe.state_dict(), ref.state_dict()) <= 1e-10
    lrs = {w.optimizer.param_groups[0]["lr"] for w in pipe._executor.weight_versions() if w.optimizer is not None}
    plain = factory(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05))
    for _ in batches:
        plain.optimizer.step()
        plain.step()
    assert lrs == {plain.get_last_lr()[0]}
    fixed, _, _, _ = reference(model, batches, loss_fn, 4, schedule)
    assert max(abs(a - b) for a, b in zip(fixed, ref_losses)) > 1e-6, "the schedule must change the run"


def test_evaluate_is_the_mean_loss_with_the_newest_weights_and_changes_nothing():
    model, x, y, loss_fn = models.bn_case()
    batches = batches_for(x, y, n=3)
    a = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=2, num_microbatches=4, schedule="2bw",
                       loss_fn=loss_fn, optimizer=SGDM)
    b = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=2, num_microbatches=4, schedule="2bw",
                       loss_fn=loss_fn, optimizer=SGDM)
    for i, (bx, by) in enumerate(batches[:2]):        # dropout: both draw the same numbers
        torch.manual_seed(i)
        a.step(bx, by)
        torch.manual_seed(i)
        b.step(bx, by)
    before = a.state_dict()
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    got = a.evaluate(*batches[2])
    after = a.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "evaluate changed weights or buffers"
    assert torch.equal(torch.get_rng_state(), rng)
    newest = copy.deepcopy(model)
    newest.load_state_dict(before)
    torch.manual_seed(5)
    with torch.no_grad():
        want = sum(loss_fn(newest(xm), ym).item() for xm, ym in zip(batches[2][0].chunk(4), batches[2][1].chunk(4)))
    assert got.item() == pytest.approx(want / 4, abs=1e-10, rel=0)
    assert any("running_mean" in k for k in before), "the model must have BatchNorm buffers to protect"
    torch.manual_seed(9)
    after_eval = a.step(*batches[2]).item()
    torch.manual_seed(9)
    assert after_eval == b.step(*batches[2]).item(), "a step after evaluate differs"


@pytest.mark.parametrize("schedule,stages", [("2bw", 2), ("flush", 3)])
def test_bf16_matches_the_autocast_loop(schedule, stages):
    model, x, y, loss_fn = models.gpt_case(torch.float32)
    batches = batches_for(x, y, n=4)
    ref_losses, _, _, ref = reference(model, batches, loss_fn, 4, schedule, precision="bf16")
    fp32_losses, _, _, ref32 = reference(model, batches, loss_fn, 4, schedule)
    loss_tol = 0.01 * max(abs(a - b) for a, b in zip(ref_losses, fp32_losses))
    w_tol = 0.01 * max_err(ref32.state_dict(), ref.state_dict())
    assert loss_tol > 0 and w_tol > 0, "bf16 autocast must change the numbers"
    pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=stages, num_microbatches=4, schedule=schedule,
                          loss_fn=loss_fn, optimizer=SGDM, precision="bf16")
    got = _run(pipe, batches)
    assert max(abs(a - b) for a, b in zip(got, ref_losses)) <= loss_tol
    assert max_err(pipe.state_dict(), ref.state_dict()) <= w_tol
    assert all(p.dtype == torch.float32 for p in pipe.model.parameters()), "master weights must stay fp32"


def _overflow_batches(x, y):
    batches = batches_for(x, y, n=4)
    batches[1] = (batches[1][0], batches[1][1] * 1e4)      # loss x scale overflows fp16 in backward
    return batches


@pytest.mark.parametrize("schedule", ["2bw", "flush"])
def test_fp16_overflow_step_is_skipped_by_every_stage(schedule):
    model, x, y, loss_fn = models.mlp_case(torch.float32)
    batches = _overflow_batches(x, y)
    ref_losses, ref_norms, ref_scales, ref = reference(model, batches, loss_fn, 4, schedule, precision="fp16",
                                                       max_norm=1.0)
    fp32_losses, _, _, ref32 = reference(model, batches, loss_fn, 4, schedule, max_norm=1.0)
    assert ref_scales == [65536.0, 65536.0, 32768.0, 32768.0], "the reference must skip batch 1 exactly"
    pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=3, num_microbatches=4, schedule=schedule,
                          loss_fn=loss_fn, optimizer=SGDM, precision="fp16", max_grad_norm=1.0)
    states, scales, got = [], [], []
    for bx, by in batches:
        scales.append(pipe.scaler.scale)
        got.append(pipe.step(bx, by).item())
        states.append(pipe.state_dict())
    assert scales == ref_scales
    # batch 1's update makes W(2) = W(1): every stage skipped it (2bw and flush alike)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[1][k], states[2][k]) for k in states[0])
    tol = 0.01 * max(abs(a - b) for i, (a, b) in enumerate(zip(ref_losses, fp32_losses)) if i != 1)
    assert max(abs(a - b) for i, (a, b) in enumerate(zip(got, ref_losses)) if i != 1) <= tol
    assert max_err(pipe.state_dict(), ref.state_dict()) <= 0.01 * max_err(ref32.state_dict(), ref.state_dict())
    assert pipe.scaler.skipped == 1


def test_resume_with_scheduler_and_scaler_is_bit_identical(tmp_path):
    model, x, y, loss_fn = models.mlp_case(torch.float32)
    batches = _overflow_batches(x, y) + batches_for(x, y, n=2, seed=1)
    kw = dict(num_stages=3, num_microbatches=4, schedule="2bw", loss_fn=loss_fn, optimizer=SGDM, precision="fp16",
              max_grad_norm=1.0, lr_scheduler=LAMBDA)
    pipe = fxpipe.compile(copy.deepcopy(model), (x,), **kw)
    _run(pipe, batches[:3])
    pipe.save(str(tmp_path / "ck"))
    first = _run(pipe, batches[3:])
    fresh = fxpipe.compile(copy.deepcopy(model), (x,), **kw)
    fresh.load(str(tmp_path / "ck"))
    assert fresh.scaler.scale == 32768.0 and fresh.scaler.skipped == 1
    second = _run(fresh, batches[3:])
    assert first == second
    a, b = pipe.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lr = lambda p: [w.scheduler.get_last_lr() for w in p._executor.weight_versions() if w.scheduler]  # noqa: E731
    assert lr(pipe) == lr(fresh) and pipe.scaler.state_dict() == fresh.scaler.state_dict()
    other = fxpipe.compile(copy.deepcopy(model), (x,), **{**kw, "lr_scheduler": None, "precision": "fp32"})
    other.save(str(tmp_path / "plain"))
    with pytest.raises(fxpipe.errors.StateDictError, match=r"holds no LR scheduler state, this pipeline's "
                                                           r"lr_scheduler is LambdaLR"):
        pipe.load(str(tmp_path / "plain"))
    with pytest.raises(fxpipe.errors.StateDictError, match=r"holds an LR scheduler state.*lr_scheduler is none"):
        other.load(str(tmp_path / "ck"))


# -- bad input ------------------------------------------------------------------------------------
def _compile(**kw):
    model, x, y, loss_fn = models.mlp_case()
    return fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, loss_fn=loss_fn, **kw)


@pytest.mark.parametrize("kw,match", [
    ({"precision": "fp8"}, r"unknown precision 'fp8'.*'fp32', 'bf16', 'fp16'"),
    ({"precision": None}, r"unknown precision None"),
    ({"max_grad_norm": 0}, r"max_grad_norm must be a positive finite number.*got 0"),
    ({"max_grad_norm": -1.0}, r"got -1.0"),
    ({"max_grad_norm": float("nan")}, r"got nan"),
    ({"max_grad_norm": True}, r"got True"),
    ({"lr_scheduler": lambda opt: None}, r"lr_scheduler must be a factory.*returned NoneType"),
    ({"lr_scheduler": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt)}, r"ReduceLROnPlateau needs"),
    ({"lr_scheduler": "cosine"}, r"lr_scheduler must be a factory optimizer -> LR scheduler, got 'cosine'"),
    ({"devices": ["cpu"]}, r"devices has 1 entries but num_stages=2"),
    ({"devices": ["cuda:7", "cuda:7"]}, r"devices entry 'cuda:7': this machine has \d+ CUDA device"),
])
def test_bad_trainer_options(kw, match):
    with pytest.raises(fxpipe.errors.ConfigError, match=match):
        _compile(**kw)


def test_fp16_on_a_device_without_fp16_autocast(monkeypatch):
    real = torch.amp.is_autocast_available
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda t: False if t == "cpu" else real(t))
    with pytest.raises(fxpipe.errors.ConfigError, match=r"precision='fp16' needs torch.autocast with torch.float16 "
                                                        r"on the 'cpu' device.*precision='fp32'"):
        _compile(precision="fp16")


def test_devices_on_cpu_place_every_stage():
    model, x, y, loss_fn = models.mlp_case()
    batches = batches_for(x, y, n=3)
    ref_losses, _, _, ref = reference(model, batches, loss_fn, 4, "flush")
    pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=2, num_microbatches=4, schedule="flush",
                          loss_fn=loss_fn, optimizer=SGDM, devices=["cpu", "cpu"])
    assert _run(pipe, batches) == pytest.approx(ref_losses, abs=1e-10, rel=0)
    assert [rt.device for rt in pipe._executor.runtimes] == [torch.device("cpu")] * 2
