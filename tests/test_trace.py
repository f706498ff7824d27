"""Real models in: HF transformers (GPT-2, BERT, Llama), shape-dependent code, partial tracing, clear trace errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpipe
from fxpipe.errors import TraceError
from fxpipe.trace import trace
from test_pipeline import SGDM, reference_losses

transformers = pytest.importorskip("transformers", reason="HF tests need the [dev] extra (transformers)")


def _lm_loss(out, y):
    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _check_against_reference(model, example, batches, loss_fn, stages, schedule, call=None):
    m = 4
    ref_losses, ref = reference_losses(model, batches, loss_fn, m, schedule) if call is None else call(model)
    pipe = fxpipe.compile(model, example, num_stages=stages, num_microbatches=m, schedule=schedule,
                          loss_fn=loss_fn, optimizer=SGDM)
    got = [pipe.step(bx, by).item() for bx, by in batches]
    assert got == pytest.approx(ref_losses, abs=1e-10, rel=0)
    sd, rsd = pipe.state_dict(), ref.state_dict()
    for k in rsd:
        torch.testing.assert_close(sd[k], rsd[k], atol=1e-10, rtol=0, msg=k)
    return pipe


@pytest.mark.parametrize("schedule", ["2bw", "flush"])
def test_hf_gpt2(schedule):
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    x, y = torch.randint(0, 50, (8, 8)), torch.randint(0, 50, (8, 8))
    batches = [(x, y), (x.flip(0), y.flip(0)), (x.roll(1, 0), y.roll(1, 0))]
    pipe = _check_against_reference(model, (x,), batches, _lm_loss, 3, schedule)
    assert pipe._cg.gm.meta["fxpipe.tracer"] == "export"
    assert isinstance(pipe(x), transformers.modeling_outputs.CausalLMOutputWithCrossAttentions)


def test_hf_llama():
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    x, y = torch.randint(0, 50, (8, 8)), torch.randint(0, 50, (8, 8))
    _check_against_reference(model, (x,), [(x, y), (x.flip(0), y.flip(0)), (x, y)], _lm_loss, 2, "2bw")


def test_hf_bert_with_attention_mask_kwargs():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    ids = torch.randint(0, 50, (8, 8))
    mask = torch.ones(8, 8, dtype=torch.long)
    mask[:, 6:] = 0
    labels = torch.randint(0, 3, (8,))
    loss_fn = lambda out, y: F.cross_entropy(out.logits, y)  # noqa: E731

    def reference(model):
        ref = copy.deepcopy(model)
        opt = SGDM(list(ref.parameters()))
        losses, prev = [], None
        from torch.func import functional_call
        for t in range(3):
            newest = {n: p.detach().clone() for n, p in ref.named_parameters()}
            leaves = {n: v.clone().requires_grad_() for n, v in (newest if prev is None else prev).items()}
            tot = 0.0
            for i, l, y in zip(ids.chunk(4), mask.chunk(4), labels.chunk(4)):
                loss = loss_fn(functional_call(ref, leaves, (), {"input_ids": i, "attention_mask": l}), y)
                (loss / 4).backward()
                tot += loss.item()
            losses.append(tot / 4)
            for n, p in ref.named_parameters():
                p.grad = leaves[n].grad
            opt.step()
            prev = newest
        return losses, ref

    example = {"input_ids": ids, "attention_mask": mask}
    batches = [(example, labels)] * 3
    _check_against_reference(model, example, batches, loss_fn, 2, "2bw", call=reference)


class ShapeDependent(nn.Module):
    """``torch.ones(T, T)`` from ``x.shape``: plain fx cannot trace it; fxpipe specialises on the example shape."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 11)

    def forward(self, idx):
        T = idx.shape[1]
        mask = torch.ones(T, T).tril()
        x = self.emb(idx)
        a = (x @ x.transpose(1, 2)).masked_fill(mask == 0, -1e9).softmax(-1) @ x
        return self.fc2(torch.tanh(self.fc1(a)))


def test_shape_dependent_code_is_specialised():
    torch.manual_seed(0)
    model = ShapeDependent().double()
    x, y = torch.randint(0, 11, (8, 5)), torch.randint(0, 11, (8, 5))
    loss = lambda o, t: F.cross_entropy(o.reshape(-1, 11), t.reshape(-1))  # noqa: E731
    _check_against_reference(model, (x,), [(x, y), (x.flip(0), y), (x, y)], loss, 2, "2bw")


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:          # data-dependent control flow
            return x * 2
        return x - 1


class WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.gate = Gate()
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.gate(self.a(x)))))


def test_untraceable_submodule_becomes_opaque_leaf_with_warning():
    torch.manual_seed(0)
    model = WithGate().double()
    x = torch.randn(8, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"submodule 'gate' \(Gate\) could not be traced"):
        gm = trace(model, (x[:2],))
    assert gm.meta["fxpipe.tracer"] == "fx+leaves"
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["a", "gate", "b", "c"]
    y = torch.randn(8, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_against_reference(model, (x,), [(x, y), (-x, y), (x, y)], F.mse_loss, 2, "flush")


def test_leaf_modules_option():
    model = WithGate().double()
    gm = trace(model, (torch.randn(2, 6, dtype=torch.float64),), leaf_modules=[Gate])
    assert gm.meta["fxpipe.tracer"] == "fx"
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)


class RootBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        if h.mean() > 0:
            return h
        return -h


def test_data_dependent_control_flow_names_the_line_and_fix():
    with pytest.raises(TraceError, match=r"test_trace\.py:\d+ `if h\.mean\(\) > 0:`.*torch\.where"):
        trace(RootBranch(), (torch.randn(2, 4),))


class ShiftRight(nn.Module):
    """T5's ``_shift_right``: a tensor of the graph's own, updated in place through views, read later."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, ids):
        sh = ids.new_zeros(ids.shape)
        sh[:, 1:] = ids[:, :-1]
        sh[:, 0] = 3
        return self.b(torch.tanh(self.a(self.emb(ids)))) + self.emb(sh)


def test_in_place_updates_become_edges_so_every_valid_split_is_exact():
    import random

    from fxpipe.passes.split import split
    from test_split_property import _random_valid_stages, _run

    torch.manual_seed(0)
    model = ShiftRight().double()
    ids = torch.randint(0, 16, (2, 6))
    gm = trace(model, (ids,))
    assert gm.meta["fxpipe.tracer"] == "export"
    mutating = [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                and n.target._schema.is_mutable]
    assert mutating == [], [n.format_node() for n in mutating]
    want = model(ids)
    rng = random.Random(0)
    for d in (2, 3, 4):
        done = 0
        while done < 15:
            stage_of = _random_valid_stages(rng, gm, d)
            if stage_of is None:
                continue
            torch.testing.assert_close(_run(split(gm, stage_of, d), ids)[0], want, atol=0, rtol=0)
            done += 1


class _KV:
    def __init__(self, k) -> None:
        self.k = k


class ReturnsCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        return h, _KV(h)


def test_cache_in_the_output_gets_the_cache_advice():
    with pytest.raises(TraceError, match=r"Found <class 'test_trace\._KV'> in output.*key/value cache.*"
                                         r"use_cache=False"):
        trace(ReturnsCache(), (torch.randn(2, 4),))


class KwargsBranch(nn.Module):
    """``forward(x, **kwargs)`` as in HF models, with data-dependent control flow in the root."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, **kwargs):
        h = self.fc(x)
        if h.mean() > 0:
            return h
        return -h


def test_export_failure_names_the_line():
    with pytest.raises(TraceError, match=r"tracing stopped at .*test_trace\.py:\d+ `if h\.mean\(\) > 0:`"):
        trace(KwargsBranch(), (torch.randn(2, 4),))


class ExportOnly(nn.Module):
    """Shape-dependent code (fx cannot trace it) around a data-dependent submodule (export cannot)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.gate = Gate()
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        mask = torch.ones(x.shape[0], 6, dtype=x.dtype).tril()
        return self.b(torch.relu(self.gate(self.a(x))) * mask)


@pytest.mark.parametrize("chosen", [False, True])
def test_leaves_under_export_run_eagerly_and_train_exactly(chosen):
    torch.manual_seed(0)
    model = ExportOnly().double()
    x = torch.randn(8, 6, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = trace(model, (x[:2],), leaf_modules=[Gate] if chosen else ())
    opaque = [str(w.message) for w in caught if "could not be traced" in str(w.message)]
    assert gm.meta["fxpipe.tracer"] == ("export" if chosen else "export+leaves")
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["gate"]
    assert (opaque == []) if chosen else (len(opaque) == 1 and "submodule 'gate' (Gate)" in opaque[0])
    y = torch.randn(8, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_against_reference(model, (x,), [(x, y), (-x, y), (x, y)], F.mse_loss, 2, "2bw")
