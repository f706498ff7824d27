"""compile(..., replan_after=N): one automatic re-plan from measurements, with numbers unchanged.

The cost model is deliberately wrong (layers.0/1 priced 31x too high), so the first plan
is off and the re-plan from measured stage times cuts elsewhere; the losses and weights
must still equal the float64 single-device reference loop of each schedule.

(Not TinyGPT here: a re-plan from measurements can cut between ``split`` and its
``getitem``s, a tuple crossing stages, which the local executor does not detach; a fresh
compile with that plan fails the same way — an executor bug outside the re-plan.)
"""

from __future__ import annotations

import pytest
import torch

import fxpipe
import models
from agree_worker import SkewedCostModel
from dist_worker import SGDM
from fxpipe.runtime.agree import plan_digest
from test_pipeline import batches_for, reference_losses


@pytest.mark.parametrize("case,schedule,stages", [("mlp", "2bw", 2), ("mlp", "flush", 2), ("skip", "2bw", 3)])
def test_replan_after_keeps_the_numbers(case, schedule, stages) -> None:
    model, x, y, loss_fn = models.CASES[case]()
    batches = batches_for(x, y, n=5)
    ref_losses, ref = reference_losses(model, batches, loss_fn, 4, schedule)
    pipe = fxpipe.compile(model, (x,), num_stages=stages, num_microbatches=4, schedule=schedule, loss_fn=loss_fn,
                          optimizer=SGDM, cost_model=SkewedCostModel(31), replan_after=2)
    got = []
    for i, (bx, by) in enumerate(batches):
        got.append(pipe.step(bx, by).item())
        assert pipe.replanned == (i >= 1)
    assert pipe.steps_done == 5 and pipe.initial_plan is not None
    if case == "mlp":      # the skew moved the first cut; measuring moves it back
        assert plan_digest(pipe.plan) != plan_digest(pipe.initial_plan)
    assert max(abs(a - b) for a, b in zip(got, ref_losses)) <= 1e-10
    sd, want = pipe.state_dict(), ref.state_dict()
    assert max((sd[k].double() - want[k].double()).abs().max().item() for k in want) <= 1e-10
    assert (pipe(x) - ref(x)).abs().max().item() <= 1e-10


def test_replan_after_must_be_a_positive_int() -> None:
    model, x, _, loss_fn = models.CASES["mlp"]()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(fxpipe.ConfigError, match=r"replan_after must be a number of steps >= 1"):
            fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, loss_fn=loss_fn, replan_after=bad)
