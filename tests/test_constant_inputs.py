"""Keyword constants in the inputs (``use_cache=False``, ``return_loss=True``, a float scale, a mode string):
traced into the graph by torch.fx and by torch.export, accepted again by ``step`` at the same value, refused
at another; training matches a float64 single-device loop that passes them on every call."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import fxpipe
from fxpipe.errors import InputError
from test_pipeline import SGDM

M = 2


class Flags(torch.nn.Module):
    """A forward whose keyword flags change the computation; ``branch_on_shape`` makes torch.fx fail (a
    Python ``if`` on a shape), so torch.export traces it."""

    def __init__(self, branch_on_shape: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(4, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
        self.branch_on_shape = branch_on_shape

    def forward(self, x, scale: float = 1.0, flag: bool = False, mode: str = "a", extra=None):
        y = torch.relu(self.a(x)) * scale
        if flag:
            y = y + 1
        if self.branch_on_shape and x.shape[0] > 1:
            y = y * 1.5
        y = torch.tanh(self.b(y))
        if mode == "b":
            y = y * 2
        if extra is not None:
            y = y + extra
        return self.c(y)


def _reference(model, batches, loss_fn, consts):
    """float64, one device, flush semantics: every microbatch's forward gets the same constants."""
    ref = copy.deepcopy(model)
    opt = SGDM(list(ref.parameters()))
    losses = []
    for x, y in batches:
        params = {n: p.detach().clone().requires_grad_(True) for n, p in ref.named_parameters()}
        total = 0.0
        for xm, ym in zip(x.chunk(M), y.chunk(M)):
            loss = loss_fn(functional_call(ref, params, (), {"x": xm, **consts}), ym)
            (loss / M).backward()
            total += loss.item()
        losses.append(total / M)
        for n, p in ref.named_parameters():
            p.grad = params[n].grad
        opt.step()
        opt.zero_grad()
    return losses, ref


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_keyword_constants_are_traced_in_and_train_exactly(tracer):
    torch.manual_seed(0)
    model = Flags(branch_on_shape=tracer == "export").double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64))
               for _ in range(3)]
    consts = {"flag": True, "scale": 0.5, "mode": "b", "extra": None}
    loss_fn = F.mse_loss
    pipe = fxpipe.compile(copy.deepcopy(model), {"x": batches[0][0], **consts}, num_stages=2, num_microbatches=M,
                          schedule="flush", loss_fn=loss_fn, optimizer=SGDM)
    gm = pipe._cg.gm
    assert gm.meta["fxpipe.tracer"] == tracer and gm.meta["fxpipe.constant_inputs"] == consts
    assert pipe._cg.input_names == ["x"]          # the graph takes the tensor alone
    ref_losses, ref = _reference(model, batches, loss_fn, consts)
    # the same constants again, then only some of them, then none: the graph has them fixed
    given = [{"x": batches[0][0], **consts}, {"x": batches[1][0], "flag": True}, {"x": batches[2][0]}]
    got = [pipe.step(x, y).item() for x, (_, y) in zip(given, batches)]
    assert got == pytest.approx(ref_losses, abs=1e-12, rel=0)
    assert ref_losses[0] != pytest.approx(_reference(model, batches[:1], loss_fn, {})[0][0], abs=1e-3)
    sd = pipe.state_dict()
    for n, w in ref.named_parameters():
        torch.testing.assert_close(sd[n], w.detach(), atol=1e-12, rtol=0, msg=n)
    before = {n: v.clone() for n, v in pipe.state_dict().items()}
    with pytest.raises(InputError, match=r"input 'flag' is False \(bool\), but the graph was traced with flag=True.*"
                                         r"compile again with that value of flag"):
        pipe.step({"x": batches[0][0], "flag": False}, batches[0][1])
    with pytest.raises(InputError, match=r"input 'extra' is a tensor of shape \(8, 16\), but the graph was traced "
                                         r"with extra=None"):
        pipe.step({"x": batches[0][0], "extra": torch.zeros(8, 16, dtype=torch.float64)}, batches[0][1])
    with pytest.raises(InputError, match=r"input 'scale' is 1 \(int\), but the graph was traced with scale=0\.5"):
        pipe.step({"x": batches[0][0], "scale": 1}, batches[0][1])
    for n, v in pipe.state_dict().items():        # refused before anything ran
        assert torch.equal(v, before[n]), n


def test_constants_the_forward_does_not_take_or_passes_positionally_are_refused():
    model = Flags().double()
    x = torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(InputError, match=r"example inputs \['return_loss'\] are not parameters of Flags\.forward"):
        fxpipe.plan(model, {"x": x, "return_loss": True}, num_stages=2, num_microbatches=M)
    with pytest.raises(InputError, match=r"example input 'arg1' is 0\.5 \(float\), not a tensor.*Pass it by keyword"):
        fxpipe.plan(model, (x, 0.5), num_stages=2, num_microbatches=M)


def test_clip_trains_with_return_loss_true():
    """CLIPModel's contrastive loss comes out of forward when return_loss=True (HF users pass it): traced
    in, the loss is the model's own, per microbatch, as a float64 loop computes it; 2bw's weight rule."""
    transformers = pytest.importorskip("transformers", reason="needs the [dev] extra (transformers)")
    from test_hf_models import M as HF_M, _reference as _hf_reference
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4), projection_dim=16)
    model = transformers.CLIPModel(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 64, (8, 8), generator=g),
                "pixel_values": torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64)} for _ in range(2)]
    loss_fn = lambda out, y: out.loss       # noqa: E731 - the model's own contrastive loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = fxpipe.compile(copy.deepcopy(model), {**batches[0], "return_loss": True}, num_stages=2,
                              num_microbatches=HF_M, loss_fn=loss_fn, optimizer=SGDM)
    assert pipe._cg.gm.meta["fxpipe.constant_inputs"] == {"return_loss": True}
    want, ref_w = _hf_reference(model, [(b, torch.zeros(8)) for b in batches], loss_fn, "2bw",
                                constants={"return_loss": True})       # 2bw's weight rule, float64
    got = [pipe.step({**b, "return_loss": True}, torch.zeros(8)).item() for b in batches]
    assert got == pytest.approx(want, abs=1e-10, rel=0)
    sd = pipe.state_dict()
    for n, w in ref_w.items():
        torch.testing.assert_close(sd[n], w, atol=1e-10, rtol=0, msg=n)
