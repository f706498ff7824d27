"""GPUs: stages placed on CUDA devices in one process, a model already on CUDA, and bf16 there.

Skipped without CUDA (this project's CI machine has none); each compares with trainer_ref's loop.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxpipe
import models
from test_pipeline import batches_for
from trainer_ref import SGDM, max_err, reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _devices(n: int) -> list[str]:
    return [f"cuda:{i % torch.cuda.device_count()}" for i in range(n)]


@cuda
@pytest.mark.parametrize("schedule", ["2bw", "flush"])
def test_stages_on_cuda_devices_match_the_cpu_loop(schedule):
    model, x, y, loss_fn = models.gpt_case()
    batches = batches_for(x, y, n=3)
    ref_losses, ref_norms, _, ref = reference(model, batches, loss_fn, 4, schedule, max_norm=0.3)
    pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=3, num_microbatches=4, schedule=schedule,
                          loss_fn=loss_fn, optimizer=SGDM, devices=_devices(3), max_grad_norm=0.3)
    assert [rt.device.type for rt in pipe._executor.runtimes] == ["cuda"] * 3
    got = [pipe.step(bx, by).item() for bx, by in batches]
    assert got == pytest.approx(ref_losses, abs=1e-10, rel=0)
    assert max_err({k: v.cpu() for k, v in pipe.state_dict().items()}, ref.state_dict()) <= 1e-10
    assert pipe.last_grad_norm == pytest.approx(ref_norms[-1], abs=1e-10, rel=0)


@cuda
def test_a_model_on_cuda_stays_there():
    model, x, y, loss_fn = models.mlp_case()
    batches = batches_for(x, y, n=3)
    ref_losses, _, _, _ = reference(model, batches, loss_fn, 4, "2bw")
    pipe = fxpipe.compile(copy.deepcopy(model).cuda(), (x.cuda(),), num_stages=2, num_microbatches=4,
                          loss_fn=loss_fn, optimizer=SGDM)
    got = [pipe.step(bx.cuda(), by.cuda()).item() for bx, by in batches]
    assert got == pytest.approx(ref_losses, abs=1e-10, rel=0)
    assert all(p.device.type == "cuda" for p in pipe.model.parameters())


@cuda
def test_bf16_on_cuda_matches_the_cuda_autocast_loop():
    model, x, y, loss_fn = models.gpt_case(torch.float32)
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    batches = batches_for(x, y, n=3)
    ref_losses, _, _, ref = reference(model, batches, loss_fn, 4, "flush", precision="bf16", device_type="cuda")
    fp32_losses, _, _, _ = reference(model, batches, loss_fn, 4, "flush", device_type="cuda")
    pipe = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=2, num_microbatches=4, schedule="flush",
                          loss_fn=loss_fn, optimizer=SGDM, precision="bf16")
    got = [pipe.step(bx, by).item() for bx, by in batches]
    tol = 0.01 * max(abs(a - b) for a, b in zip(ref_losses, fp32_losses))
    assert max(abs(a - b) for a, b in zip(got, ref_losses)) <= tol
