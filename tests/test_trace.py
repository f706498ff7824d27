"""Tracing: shape-dependent code, opaque leaves under fx and export, in-place updates, clear trace errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpipe
from fxpipe.errors import InputError, TraceError
from fxpipe.trace import trace
from test_pipeline import SGDM, batches_for, reference_losses


def _check_against_reference(model, example, batches, loss_fn, stages, schedule):
    m = 4
    ref_losses, ref = reference_losses(model, batches, loss_fn, m, schedule)
    pipe = fxpipe.compile(model, example, num_stages=stages, num_microbatches=m, schedule=schedule,
                          loss_fn=loss_fn, optimizer=SGDM)
    got = [pipe.step(bx, by).item() for bx, by in batches]
    assert got == pytest.approx(ref_losses, abs=1e-10, rel=0)
    sd, rsd = pipe.state_dict(), ref.state_dict()
    for k in rsd:
        torch.testing.assert_close(sd[k], rsd[k], atol=1e-10, rtol=0, msg=k)
    return pipe


# HF families (GPT-2, Llama, BERT with attention_mask, ...) are in tests/test_hf_models.py.


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


class CastingRouter(nn.Module):
    """Casts its classifier in forward, as NLLB-MoE's and Switch Transformers' routers do: neither export
    nor shape propagation can (a module's fake parameters must be swapped, and cannot be)."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(6, 6)

    def forward(self, x):
        self.classifier = self.classifier.to(x.dtype)
        return x * torch.softmax(self.classifier(x), -1)


class ExportRouted(ExportOnly):
    def __init__(self) -> None:
        super().__init__()
        self.gate = CastingRouter()


def test_a_leaf_around_a_failing_leaf_replaces_it_and_runs_for_real_in_shape_prop():
    """export stops in router.classifier's ``.to()``: that Linear becomes a leaf, export stops again in the
    router, which becomes the leaf and holds the Linear (whose stand-in op had raised when the router ran
    eagerly); the router cannot run on fakes either, so shape propagation runs it on real random tensors."""
    torch.manual_seed(0)
    model = ExportRouted().double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"submodule 'gate' \(CastingRouter\) could not be traced \(RuntimeError: "
                                         r"_apply\(\): Couldn't swap Linear.weight\)") as caught:
        pipe = _check_against_reference(model, (x,), [(x, y), (-x, y), (x, y)], F.mse_loss, 2, "2bw")
    assert len([w for w in caught if "could not be traced" in str(w.message)]) == 1
    gm = pipe._cg.gm
    assert gm.meta["fxpipe.tracer"] == "export+leaves" and gm.meta["fxpipe.leaves"] == ["gate"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["gate"]


class TwoGates(ExportOnly):
    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.Sequential(Gate(), nn.Linear(6, 6), Gate())

    def forward(self, x):
        return super().forward(self.gates(x))


def test_every_block_of_the_failing_class_becomes_a_leaf_in_one_retrace(monkeypatch):
    """The layers of a model repeat: the blocks of the class that stopped export all become leaves at once
    (one retrace for a 32-layer MoE, not 32); torch's own classes only where they failed."""
    import fxpipe.trace as fxtrace

    calls = []
    export = fxtrace._export
    monkeypatch.setattr(fxtrace, "_export", lambda *a: calls.append(list(a[3])) or export(*a))
    with pytest.warns(UserWarning, match="could not be traced"):
        gm = trace(TwoGates().double(), (torch.randn(2, 6, dtype=torch.float64),))
    assert gm.meta["fxpipe.leaves"] == ["gate", "gates.0", "gates.2"]
    assert calls == [[], ["gate", "gates.0", "gates.2"]]


class DefaultMask(nn.Module):
    """Builds its default mask only when not compiling, as HF LongT5 and Switch Transformers do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, attention_mask=None):
        if attention_mask is None and not torch.compiler.is_compiling():
            attention_mask = torch.ones(x.shape[0], x.shape[1], dtype=x.dtype)
        return self.fc(x) * attention_mask[:, :, None]


def test_a_default_mask_left_to_the_model_gets_the_attention_mask_advice():
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    with pytest.raises(TraceError, match=r"'NoneType' object is not subscriptable.*pass "
                                         r"attention_mask=torch\.ones_like\(input_ids\)"):
        trace(DefaultMask().double(), (x,))
    gm = trace(DefaultMask().double(), (x,), {"attention_mask": torch.ones(4, 3, dtype=torch.float64)})
    assert gm.meta["fxpipe.tracer"] == "fx"     # the mask given: no default to build, fx traces it


class _Noisy(nn.Module):
    """Adds fresh noise of a constant shape each call: torch.fx would draw it once at trace time."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) + torch.randn(8))


def test_random_draws_with_constant_arguments_are_not_frozen() -> None:
    from fxpipe.trace import _fx

    model, x = _Noisy(), torch.randn(4, 8)
    with pytest.raises(TraceError, match=r"freeze torch\.randn\(\.\.\.\) into a constant"):
        _fx(model, (x,), {}, [], "fx")
    gm = trace(model, (x,))
    assert gm.meta["fxpipe.tracer"] == "export"
    assert any("randn" in str(n.target) for n in gm.graph.nodes)
    pipe = fxpipe.compile(model, (torch.randn(8, 8),), num_stages=2, num_microbatches=2, time_limit=2.0,
                          loss_fn=lambda out, t: out.square().mean())
    x8 = torch.randn(8, 8)
    assert not torch.equal(pipe(x8), pipe(x8))           # fresh noise each call, as the model draws it
    torch.manual_seed(3)
    first = pipe(x8)
    torch.manual_seed(3)
    assert torch.equal(first, pipe(x8))                  # and from torch's generator


class _Counter(nn.Module):
    """Counts its calls in a buffer through a view: torch.fx does not trace the buffer, so the update ran
    once at trace time and was left out of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.register_buffer("count", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count.narrow(0, 0, 1).add_(1)
        return self.b(torch.relu(self.a(x)))


def test_an_update_of_an_untraced_buffer_is_not_lost() -> None:
    from fxpipe.trace import _fx

    model, x = _Counter(), torch.randn(4, 4)
    with pytest.raises(TraceError, match=r"torch\.Tensor\.add_ on a tensor it does not trace"):
        _fx(model, (x[:2],), {}, [], "fx")
    assert model.count.tolist() == [0.0, 0.0]            # refused before the update ran
    pipe = fxpipe.compile(model, (x,), num_stages=2, num_microbatches=2, time_limit=2.0,
                          loss_fn=lambda out, t: out.square().mean(),
                          optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    for _ in range(3):
        pipe.step(x, x)
    assert pipe.state_dict()["count"].tolist() == [6.0, 0.0]      # 3 steps x 2 microbatches, as eager counts


class _Moves(nn.Module):
    """torch.export bakes the example's device into arange(device=x.device) and .to(x.device) (as HF GPT-2's
    `inputs_embeds + position_embeds.to(inputs_embeds.device)`); the `if` on a shape stops torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.pos = nn.Linear(8, 8), nn.Embedding(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x) + self.pos(torch.arange(x.shape[1], device=x.device)).to(x.device)
        if x.shape[1] > 2:
            h = torch.relu(h)
        return self.lin(h)


def test_a_model_on_the_meta_device_plans_through_export() -> None:
    # export asserted device=meta (`_assert_tensor_metadata`) and moved values to meta, which the planner's
    # fake CPU tensors refused: "Tensor device mismatch! Expected: meta, Got: cpu"
    with torch.device("meta"):
        model = _Moves()
    gm = trace(model, (torch.randn(4, 6, 8, device="meta"),))
    assert gm.meta["fxpipe.tracer"] == "export"
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten._assert_tensor_metadata.default]
    plan = fxpipe.plan(model, (torch.randn(8, 6, 8, device="meta"),), num_stages=2, num_microbatches=2,
                       device="a100-80gb", time_limit=2.0)
    assert plan.num_stages == 2 and all(st.memory > 0 for st in plan.stages)


def test_a_stage_makes_every_traced_device_its_own() -> None:
    # traced on the CPU, a stage on another device must build its positions there and not move its
    # activations back to the CPU (aten.to.dtype_layout(device=cpu)): the stage rewrites every device
    from fxpipe.runtime.stage import _devices_on

    gm = trace(_Moves(), (torch.randn(4, 6, 8),))
    baked = [n for n in gm.graph.nodes if n.op == "call_function" and n.kwargs.get("device") is not None]
    assert {n.kwargs["device"] for n in baked} == {torch.device("cpu")} and len(baked) >= 2
    _devices_on(gm, torch.device("meta"))
    assert {n.kwargs["device"] for n in baked} == {torch.device("meta")}
    out = gm.to("meta")(torch.randn(4, 6, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 6, 8)


class Scores(dict):
    """A dict subclass with attribute access, registered with pytree: what HF's ``ModelOutput`` is."""

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


torch.utils._pytree.register_pytree_node(
    Scores, lambda s: (list(s.values()), list(s.keys())), lambda vs, ks: Scores(zip(ks, vs)))


class OptionalArgs(nn.Module):
    """Optional arguments left at their defaults (HF's ``labels=None``) and a dict-subclass output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, double: bool = False) -> Scores:
        h = self.fc2(torch.tanh(self.fc1(x)))
        if mask is not None:
            h = h * mask
        if double:
            h = 2 * h
        return Scores(out=h, aux=h.pow(2).mean(-1))


def test_optional_arguments_left_out_and_a_dict_subclass_output_under_fx() -> None:
    """torch.fx names the placeholder of an argument fixed to its default ``mask_1`` and guards it
    (``_assert_is_none``): compile asked for an input 'mask_1' that forward does not have. And the
    graph's output node keeps a dict subclass as a plain dict: loss_fn got an immutable_dict, no
    ``out.aux``. Both as torch.fx's frontend gives them now: the model's own arguments and output type."""
    torch.manual_seed(0)
    model = OptionalArgs().double()
    seen = set()

    def loss_fn(o, y):
        seen.add(type(o))
        return F.mse_loss(o.out, y) + o.aux.mean()

    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    pipe = _check_against_reference(model, (x,), batches_for(x, y, n=3), loss_fn, 2, "2bw")
    assert pipe._cg.gm.meta["fxpipe.tracer"] == "fx" and seen == {Scores}
    assert type(pipe(x)) is Scores
    with pytest.raises(InputError, match=r"inputs \['mask'\] of OptionalArgs.forward were not in example_inputs"):
        pipe.step((x, torch.ones_like(x)), y)
