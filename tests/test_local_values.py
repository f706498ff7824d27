"""Values every stage computes itself (passes/local_values.py): the rule, the plan's figures, the split, training.

A causal mask built from a buffer (or, in HF GPT-2, from ``arange``) is copied into every stage that
reads it instead of being sent; a value with no gradient (bool, int) is priced as one transfer.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpipe
import models
from dist_worker import launch
from fxpipe.frontend import prepare
from fxpipe.passes.annotate import annotate
from fxpipe.passes.local_values import LOCAL_FLOPS, is_local, mark_local
from fxpipe.passes.partition import plan_from_assignment
from fxpipe.passes.shape_prop import shape_prop
from fxpipe.passes.specialize import specialize_shapes
from test_pipeline import SGDM, batches_for, reference_losses

COMPUTE = ("call_function", "call_method", "call_module")


class _Rules(nn.Module):
    """One value of each kind the rule tells apart, all read by the output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("mask", torch.tril(torch.ones(8, 8, dtype=torch.bool)))
        self.register_buffer("big", torch.ones(128, 128))
        self.register_buffer("count", torch.zeros(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.size(0)                                  # 8: every op below reads the graph, none is folded
        hide = ~self.mask.narrow(0, 0, t)              # a buffer: local
        pos = torch.arange(t) * 2                      # constants only: local
        scaled = x * 3.0                               # a model input (no gradient): local
        wpos = self.lin.weight > 0                     # a parameter: not local
        noise = torch.rand_like(x) > 0.5               # random numbers: not local (nor what reads them)
        drop = F.dropout(x, 0.5, training=True)        # random numbers: not local
        heavy = (self.big.narrow(0, 0, 16 * t) @ self.big)[:8, :8]   # 2 * 128^3 FLOPs > LOCAL_FLOPS: not local
        bumped = self.count.narrow(0, 0, t).add_(1.0)  # a buffer updated in place: no read of it is local
        seen = self.count.narrow(0, 0, t) * 2
        h = self.lin(drop + scaled).masked_fill(hide, 0.0)
        return h + pos + wpos + noise + heavy + seen + bumped


def test_rule_marks_buffer_input_and_constant_values_local_but_not_parameter_random_heavy_or_updated():
    model = _Rules()
    gm = torch.fx.symbolic_trace(model)          # plain fx: buffers are get_attr nodes
    x = torch.randn(8, 8)
    shape_prop(gm, x)
    specialize_shapes(gm)                        # x.size(0) -> 8, as fxpipe.compile does
    annotate(gm, "analytic")
    mark_local(gm)
    flag = {n.name: is_local(n) for n in gm.graph.nodes if n.op in COMPUTE}
    # ~mask (narrow, invert), arange * 2, x * 3, and the view of `big` the matmul reads
    assert {n for n, v in flag.items() if v} == {"narrow", "invert", "arange", "mul", "mul_1", "narrow_1"}, flag
    for name in ("gt", "rand_like", "gt_1", "dropout", "matmul", "getitem", "narrow_2", "add_", "narrow_3", "mul_3",
                 "lin", "masked_fill"):
        assert flag[name] is False, (name, flag)
    heavy = next(n for n in gm.graph.nodes if n.name == "matmul")
    assert heavy.meta["fxpipe.cost"].fwd_flops == 2 * 128 ** 3 > LOCAL_FLOPS
    # a higher FLOP bound admits the matmul over buffers (and the slice of it)
    mark_local(gm, max_flops=1e7)
    assert is_local(heavy) and is_local(next(n for n in gm.graph.nodes if n.name == "getitem"))


class _PerByte:
    """Transfers priced at exactly 1 ns per byte, nothing else: C_s is checkable by hand."""

    def node_cost(self, node):  # noqa: ANN001 - graph_costs reads the annotated costs first
        raise AssertionError("every node is annotated")

    def comm_time(self, nbytes: int) -> float:
        return nbytes * 1e-9


def _masknet_plan(local: bool):
    model, x, _, _ = models.mask_case()
    cg = prepare(model, (x,), num_microbatches=4)
    if not local:
        for n in cg.gm.graph.nodes:
            n.meta["fxpipe.local"] = False
    compute = [n.name for n in cg.gm.graph.nodes if n.op in COMPUTE]
    cut = compute.index("fc2")           # stage 0: mask, fc1, masked_fill, tanh; stage 1: fc2, masked_fill_1
    stage_of = {n: int(i >= cut) for i, n in enumerate(compute)}
    return cg, plan_from_assignment(cg.gm, _PerByte(), stage_of, [False, False], num_microbatches=4,
                                    schedule="flush")


def test_plan_figures_drop_by_the_mask_and_a_bool_value_pays_one_transfer():
    _, before = _masknet_plan(local=False)
    cg, after = _masknet_plan(local=True)
    assert [n.name for n in cg.gm.graph.nodes if is_local(n)] == ["narrow", "narrow_1", "invert"]
    h, mask = 2 * 8 * 8 * 8, 8 * 8          # a microbatch's hidden [2, 8, 8] float64; the mask [8, 8] bool
    s1b, s1a = before.stages[1], after.stages[1]
    assert (s1b.received_bytes, s1b.input_bytes, s1b.received_from) == (h + mask, h + mask, ((0, h + mask),))
    assert (s1a.received_bytes, s1a.input_bytes, s1a.received_from) == (h, h, ((0, h),))
    # hidden: sent + gradient back; bool mask: sent only (no runtime sends a gradient of a bool)
    assert s1b.comm_time == pytest.approx((2 * h + mask) * 1e-9, rel=1e-12)
    assert s1a.comm_time == pytest.approx(2 * h * 1e-9, rel=1e-12)
    assert ("invert", "masked_fill_1") in before.cut_edges and ("invert", "masked_fill_1") not in after.cut_edges


def test_split_copies_the_mask_into_the_reading_stage_and_trains_exactly():
    _, plan = _masknet_plan(local=True)
    for schedule in ("2bw", "flush"):
        model, x, y, loss_fn = models.mask_case()       # fresh weights for each pipeline
        batches = batches_for(x, y, n=3)
        ref_losses, ref = reference_losses(model, batches, loss_fn, 4, schedule)
        pipe = fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, schedule=schedule, loss_fn=loss_fn,
                              optimizer=SGDM, plan=plan)
        st1 = pipe.program.stages[1]
        assert sorted(s.kind for s in st1.sources) == ["attr", "stage"], st1.sources     # the mask buffer, tanh's output
        assert sorted(n.name for n in st1.module.graph.nodes if n.name.endswith("_local1")) == \
            ["invert_local1", "narrow_1_local1", "narrow_local1"]
        got = [pipe.step(bx, by).item() for bx, by in batches]
        assert got == pytest.approx(ref_losses, abs=1e-10, rel=0)
        sd = pipe.state_dict()
        for n, w in ref.state_dict().items():
            torch.testing.assert_close(sd[n], w, atol=1e-10, rtol=0, msg=n)


def test_hf_gpt2_at_4_stages_receives_only_from_the_previous_stage_and_trains_exactly():
    transformers = pytest.importorskip("transformers", reason="HF tests need the [dev] extra (transformers)")
    from test_hf_models import M, _logits_ce, _reference

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=4, n_embd=32, n_head=4, vocab_size=64, n_positions=16)).double().eval()
    g = torch.Generator().manual_seed(1)
    batches = [({"input_ids": torch.randint(0, 64, (8, 16), generator=g)}, torch.randint(0, 64, (8, 16), generator=g))
               for _ in range(2)]
    ref_losses, ref_w = _reference(model, batches, _logits_ce, "2bw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # use_cache=False
        pipe = fxpipe.compile(model, batches[0][0], num_stages=4, num_microbatches=M, schedule="2bw",
                              loss_fn=_logits_ce, optimizer=SGDM)
    for st in pipe.plan.stages:
        assert [p for p, _ in st.received_from] == ([st.index - 1] if st.index else []), pipe.plan.summary()
    for st in pipe.program.stages:
        assert {s.stage for s in st.sources if s.kind == "stage"} <= {st.index - 1}, (st.index, st.sources)
    # the mask: [2, 1, 16, 16] bool, built by every stage whose attention reads it
    copies = [[n for n in st.module.graph.nodes if n.name.endswith(f"_local{st.index}")] for st in pipe.program.stages]
    masks = [n for cs in copies for n in cs if n.meta["val"].dtype == torch.bool and tuple(n.meta["val"].shape) == (2, 1, 16, 16)]
    assert len(masks) >= 3, [[n.name for n in cs] for cs in copies]
    got = [pipe.step(x, y).item() for x, y in batches]
    assert got == pytest.approx(ref_losses, abs=1e-10, rel=0)
    sd = pipe.state_dict()
    for n, w in ref_w.items():
        torch.testing.assert_close(sd[n], w, atol=1e-10, rtol=0, msg=n)


@pytest.mark.timeout(120)
def test_two_gloo_ranks_recompute_the_mask_on_stage_1_and_match_the_reference(tmp_path):
    r = launch(2, ["local", str(tmp_path)], timeout=90)
    assert not r.timed_out and r.returncodes == [0, 0], \
        f"exit codes {r.returncodes} after {r.seconds:.0f}s\n" + "\n".join(x[-3000:] for x in r.logs)
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["copies"] == ["invert_local1", "narrow_1_local1", "narrow_local1"], res
        assert res["received_from"] == [[], [[0, 2 * 8 * 8 * 8]]], res
        for schedule in ("2bw", "flush"):
            assert res[schedule]["loss_err"] <= 1e-10, (rank, schedule, res[schedule])
            assert res[schedule]["weight_err"] <= 1e-10, (rank, schedule, res[schedule])


def test_a_stage_on_another_device_builds_its_local_values_there():
    from fxpipe.runtime.stage import _devices_on

    model, x, y, loss_fn = models.gpt_case()       # pos = torch.arange(T, device=idx.device): traced on cpu
    pipe = fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, schedule="flush", loss_fn=loss_fn,
                          optimizer=SGDM)
    mod = pipe.program.stages[0].module
    made = [n for n in mod.graph.nodes if is_local(n) and "device" in n.kwargs]
    assert made and all(torch.device(n.kwargs["device"]) == torch.device("cpu") for n in made), mod.graph
    _devices_on(mod, torch.device("meta"))
    assert all(n.kwargs["device"] == torch.device("meta") for n in made)
    assert "device = device(type='meta')" in mod.code        # recompiled


class _Dear:
    """Every transfer costs a second: the cheapest cut is one no value crosses."""

    def node_cost(self, node):  # noqa: ANN001
        raise AssertionError("every node is annotated")

    def comm_time(self, nbytes: int) -> float:
        return 1.0


def test_every_stage_holds_a_node_that_is_not_local():
    from fxpipe.passes.partition import partition

    model, x, _, _ = models.gpt_case()        # pos = arange(T): local, and free to "cut" after
    cg = prepare(model, (x,), num_microbatches=4)
    plan = partition(cg.gm, _Dear(), num_stages=2, num_microbatches=4, schedule="flush")
    local = {n.name for n in cg.gm.graph.nodes if is_local(n)}
    assert local and all(set(st.nodes) - local for st in plan.stages), [st.nodes for st in plan.stages]
    assert plan.stages[1].comm_time >= 2.0          # so a value crosses: the hidden state, sent and sent back


def test_a_buffer_an_exported_graph_updates_is_not_local():
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.register_buffer("steps", torch.zeros(8))
            self.register_buffer("scale", torch.ones(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.steps.add_(1.0)                       # export: a copy_ into the buffer
            return self.lin(x) * (self.steps * 2) + self.scale * 3

    gm = torch.export.export(Counter(), (torch.randn(4, 8),)).module()
    shape_prop(gm, torch.randn(4, 8))
    annotate(gm, "analytic")
    mark_local(gm)
    reads = {str(n.target): [u for u in n.users if u.op in COMPUTE] for n in gm.graph.nodes if n.op == "get_attr"}
    assert reads["steps"] and not any(is_local(u) for u in reads["steps"]), gm.graph
    assert reads["scale"] and all(is_local(u) for u in reads["scale"]), gm.graph
