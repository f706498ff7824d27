"""example_targets=: loss_fn is traced and priced on the last stage, predicted against measured."""

from __future__ import annotations

import statistics
import time
import types
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpipe
import fxpipe.runtime.stage as stage_runtime
from fxpipe.calibrate import measurements
from fxpipe.cost_models.profiled import ProfiledCostModel
from fxpipe.errors import ConfigError

VOCAB = 8192
# The profiled cost model's usual error on this machine: bench/RESULTS.md ("Cost model accuracy") has
# per-round errors of -27%..+2% in wall time at load 0.57; on the 4-helper shared VM (load 2-4) single rounds
# of this test ranged -32%..+37% in thread CPU time, their medians over 3 rounds -18%..+26%.
USUAL_ERROR = 0.30
ROUNDS = 5      # 3 failed once in a quiet fresh-clone run: two of three profiles 43% and 129% high


class HeadLM(nn.Module):
    """A small body and a large-vocabulary head: the cross-entropy dominates the last stage."""

    def __init__(self, vocab: int = VOCAB, d: int = 16) -> None:
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


def test_loss_is_priced_on_the_last_stage() -> None:
    model = HeadLM()
    x, y = torch.randint(0, VOCAB, (8, 16)), torch.randint(0, VOCAB, (8, 16))
    kw = dict(num_stages=2, num_microbatches=2, schedule="flush", cost_model="analytic", time_limit=3.0)
    pipe = fxpipe.compile(model, (x,), loss_fn=lm_loss, example_targets=y, **kw)
    loss, last = pipe.plan.loss, pipe.plan.stages[-1]
    assert loss is not None and loss.nodes >= 2 and loss.fwd_time > 0 and loss.bwd_time > 0
    assert "head" in last.nodes and "loss_fn on stage 1" in pipe.plan.summary()

    # memory: what the loss saves (the log-softmax of the logits), measured here on one microbatch
    logits = model(x[:4]).detach().requires_grad_()
    ref = _saved_bytes(lm_loss, logits, y[:4])
    assert ref >= logits.numel() * logits.element_size()
    assert loss.activation_bytes == pytest.approx(ref, rel=0.01)
    without = fxpipe.plan(model, (x,), **kw)
    with_loss = pipe.plan
    assert with_loss.stages[-1].nodes == without.stages[-1].nodes
    assert with_loss.stages[-1].activation_bytes == without.stages[-1].activation_bytes \
        + with_loss.loss.activation_bytes
    assert with_loss.stages[-1].memory > without.stages[-1].memory
    assert with_loss.stages[-1].fwd_time == pytest.approx(without.stages[-1].fwd_time + loss.fwd_time)
    assert with_loss.stages[-1].bwd_time == pytest.approx(without.stages[-1].bwd_time + loss.bwd_time)


def test_what_the_loss_saves_is_stashed_per_microbatch_under_recompute() -> None:
    """loss_fn runs after the last stage's checkpointed forward, so under gpipe (n_s = m) each in-flight
    microbatch keeps the loss's saved tensors even when the stage recomputes: the plan counts
    n_s*(I_s + K_s) + A_s - K_s, and the executor measured holds m x K_s outside the checkpoints."""
    model = HeadLM()
    x, y = torch.randint(0, VOCAB, (8, 16)), torch.randint(0, VOCAB, (8, 16))
    pipe = fxpipe.compile(model, (x,), loss_fn=lm_loss, example_targets=y, num_stages=2, num_microbatches=4,
                          schedule="gpipe", cost_model="analytic", time_limit=3.0, recompute=True,
                          optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    last, kept = pipe.plan.stages[-1], pipe.plan.loss.activation_bytes
    assert last.recompute and last.in_flight == 4 and kept > 100 * last.input_bytes
    weights = 2 * last.param_bytes                          # SGD: weights + gradients
    assert last.memory == weights + 4 * (last.input_bytes + kept) + last.activation_bytes - kept

    refs: list[tuple[weakref.ref, int]] = []
    peak = 0

    def pack(t: torch.Tensor) -> torch.Tensor:            # sees only what is saved outside checkpoints
        nonlocal peak
        refs.append((weakref.ref(t), t.untyped_storage().nbytes()))
        alive = {o.untyped_storage().data_ptr(): n for r, n in refs if (o := r()) is not None}
        peak = max(peak, sum(alive.values()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pipe.step(x, y)
    assert peak == pytest.approx(4 * kept, rel=0.01)


def test_last_stage_time_with_the_loss_matches_measurement(monkeypatch) -> None:
    """The last stage's predicted F+B, loss included, is within the profiled model's usual error of the executor's.

    Both sides in CPU time of one torch thread (``time.thread_time``; the executor's stage clock
    is switched to it here), so other processes on the shared machine do not enter directly.
    Each round profiles afresh between two measurements of the steps (medians), so a drift of
    the machine's speed during the round moves the measurement as it moves the prices; the
    error is the median over the rounds (as in bench/cost_accuracy.py). The same measurement
    against the plan without the loss must miss by more than the bound, or the bound tests nothing.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(stage_runtime, "time", types.SimpleNamespace(perf_counter=time.thread_time))
    try:
        model = HeadLM()
        x, y = torch.randint(0, VOCAB, (8, 16)), torch.randint(0, VOCAB, (8, 16))
        kw = dict(num_stages=2, num_microbatches=2, schedule="flush", loss_fn=lm_loss, example_targets=y,
                  time_limit=3.0)
        pipe = fxpipe.compile(model, (x,), cost_model="analytic", **kw)

        def last_stage(steps: int = 5) -> float:
            out = []
            for _ in range(steps):
                pipe.step((x,), y)
                m = measurements(pipe)[-1]
                out.append(m.fwd_time + m.bwd_time)
            return statistics.median(out)

        last_stage(2)                                                         # warm-up
        measured, predicted, blind = [last_stage()], [], []
        for _ in range(ROUNDS):
            priced = fxpipe.compile(model, (x,), cost_model=ProfiledCostModel(cache="off", timer=time.thread_time),
                                    plan=pipe.plan, **kw).plan
            measured.append(last_stage())
            last, loss = priced.stages[-1], priced.loss
            assert last.nodes == pipe.plan.stages[-1].nodes
            predicted.append(last.fwd_time + last.bwd_time)
            blind.append(predicted[-1] - loss.fwd_time - loss.bwd_time)     # the plan without the loss
    finally:
        torch.set_num_threads(threads)
    around = [(a + b) / 2 for a, b in zip(measured, measured[1:])]
    err = statistics.median((p - m) / m for p, m in zip(predicted, around))
    blind_err = statistics.median((p - m) / m for p, m in zip(blind, around))
    print(f"\nissue-10: last stage predicted {[round(p * 1e3, 2) for p in predicted]} ms, measured "
          f"{[round(m * 1e3, 2) for m in measured]} ms: error {err:+.1%}; without the loss {blind_err:+.1%}")
    assert abs(blind_err) > USUAL_ERROR, ("the loss must matter here, or the bound below tests nothing",
                                          predicted, blind, measured)
    assert abs(err) < USUAL_ERROR, (predicted, blind, measured)


def test_example_targets_need_a_loss_fn() -> None:
    model = HeadLM(vocab=64, d=8)
    x, y = torch.randint(0, 64, (4, 4)), torch.randint(0, 64, (4, 4))
    with pytest.raises(ConfigError, match="example_targets= needs loss_fn"):
        fxpipe.plan(model, (x,), num_stages=2, num_microbatches=2, example_targets=y)
    with pytest.raises(ConfigError, match="loss_fn must return a scalar"):
        fxpipe.plan(model, (x,), num_stages=2, num_microbatches=2, example_targets=y,
                    loss_fn=lambda out, t: out)
