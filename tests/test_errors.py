"""Every error a user can cause is an FxpipeError subclass whose message names the values and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpipe
from fxpipe.errors import (ConfigError, FxpipeError, InfeasibleMemoryError, InputError, LossError, ModelSpecError,
                           PipelineStateError,
                           ScheduleError, StateDictError, TraceError)
from models import CASES


@pytest.fixture(scope="module")
def mlp_pipe():
    model, x, y, loss = CASES["mlp"]()
    return fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, loss_fn=loss), x, y


def _mlp():
    model, x, y, loss = CASES["mlp"]()
    return model, x


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(num_stages=0), ConfigError, r"num_stages must be an int >= 1, got 0"),
    (dict(num_stages=-2), ConfigError, r"got -2"),
    (dict(num_stages=99, schedule="flush"), ConfigError, r"num_stages=99 is more than the 9 operations in the traced graph of MLP; use at most 9 stages"),
    (dict(schedule="1f1b"), ConfigError, r"unknown schedule '1f1b'; choose one of 2bw, flush, gpipe"),
    (dict(num_stages=4, num_microbatches=2), ScheduleError, r"num_microbatches=2 < num_stages=4.*schedule='flush'"),
    (dict(num_microbatches=0), ConfigError, r"num_microbatches must be an int >= 1, got 0"),
    (dict(memory_limit=-5), ConfigError, r"memory_limit must be a positive number of bytes or None, got -5"),
    (dict(num_stages=None), ConfigError, r"num_stages=None needs num_devices=N"),
    (dict(executor="mpi"), ConfigError, r"unknown executor 'mpi'"),
    (dict(optimizer="sgd"), ConfigError, r"optimizer must be a factory"),
    (dict(loss_fn=3), ConfigError, r"loss_fn must be callable"),
    (dict(num_microbatches=3, num_stages=2), InputError, r"shape \(8, 16\).*divisible by num_microbatches=3"),
    (dict(memory_limit=1000), InfeasibleMemoryError, r"1000"),
    (dict(device="tpu-v9"), ConfigError, r"tpu-v9"),
    (dict(cost_model="magic"), ConfigError, r"magic"),
])
def test_compile_rejects(kwargs, exc, match):
    model, x = _mlp()
    args = dict(num_stages=2, num_microbatches=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match) as info:
        fxpipe.compile(model, (x,), **args)
    assert isinstance(info.value, FxpipeError)


def test_not_a_module():
    with pytest.raises(ConfigError, match=r"model must be a torch.nn.Module, got function"):
        fxpipe.compile(lambda x: x, (torch.randn(4, 2),), num_stages=1, num_microbatches=1)


def test_non_tensor_inputs():
    model, x = _mlp()
    with pytest.raises(InputError, match=r"example input 'arg1' is 3\.0 \(float\), not a tensor.*Pass it by keyword"):
        fxpipe.compile(model, (x, 3.0), num_stages=2, num_microbatches=4)
    # a keyword constant is traced in (tests/test_constant_inputs.py), but only for a parameter forward has
    with pytest.raises(InputError, match=r"example inputs \['return_loss'\] are not parameters of MLP\.forward"):
        fxpipe.plan(model, {"x": x, "return_loss": True}, num_stages=2, num_microbatches=4)
    # a container is neither a tensor nor a constant
    with pytest.raises(InputError, match=r"example input 'y' is \[1, 2\] \(list\), not a tensor.*Leave it out"):
        fxpipe.plan(model, {"x": x, "y": [1, 2]}, num_stages=2, num_microbatches=4)


def test_bad_example_inputs_type():
    model, x = _mlp()
    with pytest.raises(ConfigError, match=r"example_inputs must be a tensor, a tuple of tensors or a dict"):
        fxpipe.compile(model, "hello", num_stages=2, num_microbatches=4)


def test_meta_model_cannot_be_compiled_but_can_be_planned():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(4, 8, device="meta")
    with pytest.raises(ConfigError, match=r"parameters on the meta device.*fxpipe.plan"):
        fxpipe.compile(model, (x,), num_stages=2, num_microbatches=2)
    assert fxpipe.plan(model, (x,), num_stages=2, num_microbatches=2).num_stages == 2


def test_untraceable_model():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x
    with pytest.raises(TraceError, match=r"could not trace Branchy"):
        fxpipe.compile(Branchy(), (torch.randn(4, 2),), num_stages=1, num_microbatches=1)


def test_step_wrong_input_shape(mlp_pipe):
    pipe, x, y = mlp_pipe
    with pytest.raises(InputError, match=r"batch has shape \(8, 15\).*compiled for \(2, 16\).*per microbatch"):
        pipe.step(torch.randn(8, 15, dtype=torch.float64), y)


def test_step_wrong_batch(mlp_pipe):
    pipe, x, y = mlp_pipe
    with pytest.raises(InputError, match=r"batch has shape \(16, 16\).*compiled for \(2, 16\).*batch 8 = 4 microbatches of 2"):
        pipe.step(torch.randn(16, 16, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64))


def test_step_wrong_target_size(mlp_pipe):
    pipe, x, y = mlp_pipe
    with pytest.raises(InputError, match=r"targets leaf 0 has shape \(4, 8\): its dim 0 must be the batch size 8"):
        pipe.step(x, y[:4])


def test_step_without_loss_fn():
    model, x = _mlp()
    pipe = fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4)
    with pytest.raises(ConfigError, match=r"step\(\) needs a loss"):
        pipe.step(x, x)


def test_bad_state_dicts(mlp_pipe):
    pipe, x, y = mlp_pipe
    sd = pipe.state_dict()
    missing = {k: v for k, v in sd.items() if k != "layers.0.weight"}
    with pytest.raises(StateDictError, match=r"missing keys \['layers.0.weight'\]"):
        pipe.load_state_dict(missing)
    with pytest.raises(StateDictError, match=r"unexpected keys \['extra'\]"):
        pipe.load_state_dict({**sd, "extra": torch.zeros(1)})
    bad = dict(sd)
    bad["layers.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(StateDictError, match=r"state_dict\['layers.0.weight'\] has shape \(3, 3\), the model expects \(32, 16\)"):
        pipe.load_state_dict(bad)
    with pytest.raises(StateDictError, match=r"must be a dict"):
        pipe.load_state_dict([1, 2])
    # nothing was loaded by the failed calls
    for k, v in sd.items():
        torch.testing.assert_close(pipe.state_dict()[k], v, atol=0, rtol=0)


def test_unreadable_model_spec():
    from fxpipe.cli import load_model_spec
    with pytest.raises(ModelSpecError, match=r"model file 'missing_dir/none.py' does not exist"):
        load_model_spec("missing_dir/none.py:make")


def test_cost_model_returning_garbage():
    class Bad:
        def node_cost(self, node):
            return fxpipe.NodeCost(fwd_time=-1.0) if node.op == "call_module" else fxpipe.NodeCost()

        def comm_time(self, nbytes):
            return 0.0
    model, x = _mlp()
    with pytest.raises(fxpipe.CostModelError, match=r"fwd_time must be a finite number >= 0, got -1.0"):
        fxpipe.plan(model, (x,), num_stages=2, num_microbatches=4, cost_model=Bad())


# -- a step that raised ---------------------------------------------------------------------------------
def _flaky(loss_fn, fail_at):
    """loss_fn raising on its ``fail_at``-th call (after some microbatches already ran backward)."""
    calls = {"n": 0}

    def fn(out, y):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise ValueError("injected loss failure")
        return loss_fn(out, y)
    return fn


@pytest.mark.parametrize("schedule", ["2bw", "flush"])
def test_failed_step_leaves_no_trace(schedule):
    """BatchNorm statistics, dropout draws and partial gradients of the failed batch are all undone."""
    import copy

    from models import bn_case
    from test_pipeline import SGDM, batches_for

    model, x, y, loss_fn = bn_case()
    batches = batches_for(x, y, n=4)
    clean = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=2, num_microbatches=4, schedule=schedule,
                           loss_fn=loss_fn, optimizer=SGDM)
    torch.manual_seed(5)
    want = [clean.step(bx, by).item() for bx, by in batches]
    # 4 microbatches per step: call 7 is microbatch 2 of batch 1, after backwards of batch 1 have run
    failing = fxpipe.compile(copy.deepcopy(model), (x,), num_stages=2, num_microbatches=4, schedule=schedule,
                             loss_fn=_flaky(loss_fn, 7), optimizer=SGDM)
    torch.manual_seed(5)
    got = [failing.step(*batches[0]).item()]
    with pytest.raises(ValueError, match="injected loss failure"):
        failing.step(x * 3, y)
    got += [failing.step(bx, by).item() for bx, by in batches[1:]]
    assert got == want
    a, b = clean.state_dict(), failing.state_dict()
    assert sorted(a) == sorted(b) and "bn1.running_mean" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_step_failed_mid_update_is_refused_until_load(tmp_path):
    from test_pipeline import SGDM

    model, x, y, loss = CASES["mlp"]()
    pipe = fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, loss_fn=loss, optimizer=SGDM)
    pipe.step(x, y)
    pipe.save(str(tmp_path / "ck"))
    rts = pipe._executor.runtimes
    last_update = rts[0].weights.update         # stage 0 updates after stage 1 (its backward is last)

    def broken(batch, grads=None):
        raise RuntimeError("optimizer blew up")
    rts[0].weights.update = broken
    with pytest.raises(RuntimeError, match="optimizer blew up"):
        pipe.step(x, y)
    rts[0].weights.update = last_update
    with pytest.raises(PipelineStateError, match=r"batch 1\) raised RuntimeError: optimizer blew up after some "
                                                 r"stages had updated.*pipe.load\(checkpoint_dir\)"):
        pipe.step(x, y)
    pipe.load(str(tmp_path / "ck"))
    assert torch.isfinite(pipe.step(x, y))


@pytest.mark.parametrize("bad, match", [
    (lambda out, y: (out - y) ** 2, r"tensor of shape \(2, 8\) for microbatch 0, not a scalar"),
    (lambda out, y: F.mse_loss(out, y).detach(), r"without a gradient \(requires_grad=False\)"),
    (lambda out, y: F.mse_loss(out, y).item(), r"returned a float \(\d\.\d+\) for microbatch 0, not a tensor "
                                               r"\(was \.item\(\) or float\(\) called on it\?\)"),
    (lambda out, y: (out > 0).sum(), r"torch.int64 tensor for microbatch 0"),
])
def test_bad_loss_values(bad, match):
    model, x, y, _ = CASES["mlp"]()
    pipe = fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, loss_fn=bad)
    before = {k: v.clone() for k, v in pipe.state_dict().items()}
    with pytest.raises(LossError, match=match):
        pipe.step(x, y)
    assert all(torch.equal(before[k], v) for k, v in pipe.state_dict().items())


# -- arguments of compile / plan, and plans read back ------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(memory_limit=float("nan")), ConfigError, r"memory_limit must be a positive number of bytes or None, got nan"),
    (dict(memory_limit=float("inf")), ConfigError, r"got inf"),
    (dict(memory_limit=True), ConfigError, r"got True"),
    (dict(memory_limit=0.5), ConfigError, r"memory_limit=0.5 is less than one byte \(it would be taken as 0\)"),
    (dict(time_limit="10"), ConfigError, r"time_limit must be a positive finite number of seconds, got '10' \(str\)"),
    (dict(recompute="yes"), ConfigError, r"recompute must be True .* or None .*, got 'yes'"),
    (dict(num_stages=None, num_devices=0), ConfigError, r"num_devices must be an int >= 1 or None, got 0"),
    (dict(loss_fn=lambda out: out.sum()), ConfigError,
     r"loss_fn\(out\) cannot be called as loss_fn\(model_output, targets\): too many positional arguments"),
    (dict(loss_fn=lambda a, b, c: a), ConfigError, r"missing a required argument: 'c'"),
    (dict(plan="no/such/plan.json"), ConfigError, r"plan='no/such/plan.json': cannot read the plan file"),
    (dict(plan=3), ConfigError, r"plan must be a Plan, a path to a plan JSON file, or None, got int"),
    (dict(leaf_modules=[3]), ConfigError, r"leaf_modules entry 3 is neither an nn.Module subclass"),
    (dict(optimizer=lambda ps: torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)), ConfigError,
     r"returned a SGD holding none of the \d+ parameters it was given \(e.g. 'layers.\d.weight'\), so this "
     r"stage would never train"),
    (dict(optimizer=lambda ps: "adam"), ConfigError, r"returned (a )?str, not a torch.optim.Optimizer"),
])
def test_compile_rejects_more(kwargs, exc, match):
    model, x = _mlp()
    args = dict(num_stages=2, num_microbatches=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fxpipe.compile(model, (x,), **args)


def test_float32_model_with_float64_example_fails_at_compile():
    model, x = _mlp()
    with pytest.raises(InputError, match=r"example input 0 is torch.float32 but every floating parameter of MLP "
                                         r"is torch.float64; convert one of them \(x.to\(torch.float64\)"):
        fxpipe.compile(model, (x.float(),), num_stages=2, num_microbatches=4)


def test_empty_model_says_there_is_nothing_to_cut():
    class Identity(nn.Module):
        def forward(self, x):
            return x
    with pytest.raises(ConfigError, match=r"traced graph of Identity has no operations .*nothing to cut"):
        fxpipe.compile(Identity(), (torch.randn(4, 2),), num_stages=2, num_microbatches=2)


def test_leaf_module_typo_warns():
    model, x = _mlp()
    with pytest.warns(UserWarning, match=r"leaf_modules entry 'layer.0' matches no submodule of MLP; it has no "
                                         r"effect \(did you mean \['layers.0'"):
        fxpipe.plan(model, (x,), num_stages=2, num_microbatches=4, leaf_modules=["layer.0"])


def test_compile_takes_a_plan_path(tmp_path):
    model, x = _mlp()
    p = fxpipe.plan(model, (x,), num_stages=2, num_microbatches=4)
    f = tmp_path / "plan.json"
    f.write_text(p.to_json())
    pipe = fxpipe.compile(model, (x,), num_stages=2, num_microbatches=4, plan=str(f))
    assert pipe.plan.stage_of() == p.stage_of()


@pytest.mark.parametrize("text, match", [
    ("TRUNC", r"the plan is not valid JSON \(.*\d+ characters — truncated\?\)"),
    ("{}", r"not a Plan: missing fields \['stages', 'num_microbatches', 'schedule', 'bottleneck', 'lower_bound', "
           r"'optimal'\], unknown fields \[\]"),
    ("UNKNOWN", r"not a Plan: missing fields \[\], unknown fields \['colour'\]"),
    ("[1, 2]", r"a Plan is a JSON object, got list"),
    ('{"stages": [{"nodes": []}], "num_microbatches": 4, "schedule": "2bw", "bottleneck": 0, "lower_bound": 0, '
     '"optimal": false}', r"Plan stage 0 must be an object with 'index' and a list of 'nodes'"),
])
def test_plan_from_json_rejects(text, match):
    from fxpipe.errors import PlanFormatError
    from fxpipe.ir import Plan

    model, x = _mlp()
    good = fxpipe.plan(model, (x,), num_stages=2, num_microbatches=4).to_json()
    if text == "TRUNC":
        text = good[: len(good) // 2]
    elif text == "UNKNOWN":
        import json
        text = json.dumps({**json.loads(good), "colour": "red"})
    with pytest.raises(PlanFormatError, match=match):
        Plan.from_json(text)
