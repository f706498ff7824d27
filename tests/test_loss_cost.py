"""example_targets=: loss_fn is traced and priced on the last stage, predicted against measured."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpipe
from fxpipe.calibrate import measurements
from fxpipe.cost_models.profiled import ProfiledCostModel
from fxpipe.errors import ConfigError

VOCAB = 8192


class HeadLM(nn.Module):
    """A small body and a large-vocabulary head: the cross-entropy dominates the last stage."""

    def __init__(self, vocab: int = VOCAB, d: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.emb(idx))))))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def _saved_bytes(fn, *args) -> int:
    """Bytes autograd saves while ``fn`` runs, each storage once."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def test_loss_is_priced_on_the_last_stage_and_matches_measurement() -> None:
    torch.manual_seed(0)
    model = HeadLM()
    x, y = torch.randint(0, VOCAB, (8, 16)), torch.randint(0, VOCAB, (8, 16))
    # prices measured now (not from the cache), so they see the machine as the steps below do
    pipe = fxpipe.compile(model, (x,), num_stages=2, num_microbatches=2, schedule="flush",
                          loss_fn=lm_loss, example_targets=y, cost_model=ProfiledCostModel(cache="off"),
                          time_limit=3.0)
    loss, last = pipe.plan.loss, pipe.plan.stages[-1]
    assert loss is not None and loss.nodes >= 2 and loss.fwd_time > 0 and loss.bwd_time > 0
    assert "head" in last.nodes and "loss_fn on stage 1" in pipe.plan.summary()

    # memory: what the loss saves (the log-softmax of the logits), measured here on one microbatch
    logits = model(x[:4]).detach().requires_grad_()
    ref = _saved_bytes(lm_loss, logits, y[:4])
    assert ref >= logits.numel() * logits.element_size()
    assert loss.activation_bytes == pytest.approx(ref, rel=0.01)
    without = fxpipe.plan(model, (x,), num_stages=2, num_microbatches=2, schedule="flush",
                          cost_model="analytic", time_limit=3.0)
    with_loss = fxpipe.plan(model, (x,), num_stages=2, num_microbatches=2, schedule="flush",
                            cost_model="analytic", time_limit=3.0, loss_fn=lm_loss, example_targets=y)
    assert with_loss.stages[-1].nodes == without.stages[-1].nodes
    assert with_loss.stages[-1].activation_bytes == without.stages[-1].activation_bytes \
        + with_loss.loss.activation_bytes
    assert with_loss.stages[-1].memory > without.stages[-1].memory

    # time: the last stage measured (its forward and backward include loss_fn) against predicted
    for _ in range(3):
        pipe.step((x,), y)
    meas = measurements(pipe)[-1]
    measured = meas.fwd_time + meas.bwd_time
    predicted = last.fwd_time + last.bwd_time
    blind = predicted - loss.fwd_time - loss.bwd_time          # what the plan said before
    # on this shared 2-vCPU machine the profiled prices drift with the load (bench/RESULTS.md, cost model
    # accuracy), so the test asks only that pricing the loss moves the prediction towards the measurement
    assert abs(math.log(predicted / measured)) < abs(math.log(blind / measured)), (predicted, blind, measured)


def test_example_targets_need_a_loss_fn() -> None:
    model = HeadLM(vocab=64, d=8)
    x, y = torch.randint(0, 64, (4, 4)), torch.randint(0, 64, (4, 4))
    with pytest.raises(ConfigError, match="example_targets= needs loss_fn"):
        fxpipe.plan(model, (x,), num_stages=2, num_microbatches=2, example_targets=y)
    with pytest.raises(ConfigError, match="loss_fn must return a scalar"):
        fxpipe.plan(model, (x,), num_stages=2, num_microbatches=2, example_targets=y,
                    loss_fn=lambda out, t: out)
