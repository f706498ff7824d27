"""Built-in presets: parameter counts of the real models, built and traced on meta without memory."""

from __future__ import annotations

import resource

import pytest
import torch

from fxpipe.errors import ModelSpecError
from fxpipe.presets import PRESETS, get_preset, num_parameters, preset_names
from fxpipe.trace import trace

# Published sizes: GPT-2 XL 1.558e9 (tied), BERT-large 3.35e8 (MLM head tied), Llama-7B 6.74e9,
# ResNet-50 25,557,032 (torchvision).
EXPECTED = {"gpt2-small": 1.244e8, "gpt2-xl": 1.558e9, "bert-large": 3.35e8, "llama-7b": 6.738e9,
            "resnet-50": 2.5557e7, "gpt-2.2b": 2.2e9, "gpt-3.8b": 3.8e9}   # the last two: PipeDream-2BW's
SHAPES = {"gpt2-xl": (1024,), "bert-large": (512,), "llama-7b": (2048,), "resnet-50": (3, 224, 224),
          "gpt-2.2b": (512,), "gpt-3.8b": (512,)}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_size_presets_on_meta(name):
    before = _peak_rss_bytes()
    model, example = get_preset(name)
    n = num_parameters(model)
    assert abs(n / EXPECTED[name] - 1) < 0.02, (name, n)
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    assert all(x.is_meta for x in example)
    if name in SHAPES:
        assert tuple(example[0].shape[1:]) == SHAPES[name]
    batch = example[0].shape[0]
    assert batch % 8 == 0                     # divisible by the usual microbatch counts
    gm = trace(model, (example[0][: batch // 8],))
    assert gm.meta["fxpipe.tracer"] == "fx"   # plain fx, no export fallback
    assert sum(1 for nd in gm.graph.nodes if nd.op == "call_module") > 10
    # 4 bytes per parameter would be 0.1-27 GB; building and tracing on meta allocates none of it
    assert _peak_rss_bytes() - before < min(4 * n // 4, 1 << 30)


def test_tied_and_untied_heads():
    gpt, _ = get_preset("gpt2-xl")
    assert gpt.lm_head.weight is gpt.wte.weight
    bert, _ = get_preset("bert-large")
    assert bert.decoder.weight is bert.word.weight
    llama, _ = get_preset("llama-7b")
    assert llama.lm_head.weight is not llama.embed.weight
    assert len(llama.layers) == 32 and llama.layers[0].gate_proj.out_features == 11008


@pytest.mark.parametrize("name", ["gpt-small-test", "bert-tiny", "llama-tiny", "resnet-tiny"])
def test_tiny_presets_run_for_real(name):
    model, (x,) = get_preset(name, device="cpu")
    assert num_parameters(model) < 1_000_000
    if x.dtype == torch.long:
        x = torch.randint(0, 50, x.shape)
    else:
        x = torch.randn(x.shape)
    y = model(x)
    assert y.shape[0] == x.shape[0] and torch.isfinite(y).all()
    gm = trace(model, (x,))
    torch.testing.assert_close(gm(x), y)


def test_overrides():
    model, (idx,) = get_preset("gpt2-xl", batch=4, n_layer=2)
    assert idx.shape == (4, 1024) and len(model.h) == 2
    small, (x,) = get_preset("llama-7b", small=True)
    assert num_parameters(small) < 1_000_000 and x.shape[1] == 32
    assert get_preset("resnet-50", small=True)[1][0].shape[-1] == 64


def test_registry_and_errors():
    for name in ("gpt2-small", "gpt2-xl", "bert-large", "llama-7b", "resnet-50", "gpt-small-test", "resnet-tiny"):
        assert name in PRESETS and name in preset_names()
    with pytest.raises(ModelSpecError, match="unknown preset 'gpt5'.*gpt2-xl"):
        get_preset("gpt5")
    with pytest.raises(ModelSpecError, match="preset 'bert-large' does not take"):
        get_preset("bert-large", wings=2)


def test_megatron_layer_saves_korthikanti_bytes():
    """The paper's models keep what Megatron-LM keeps per layer: s*b*h*(34 + 5*a*s/h) bytes in fp16
    (Korthikanti et al., MLSys 2023, Table 2: unfused attention, 1-byte dropout masks on a GPU).
    Megatron-LM runs the model itself in fp16 (no autocast): autocast=False prices every activation so."""
    from fxpipe.api import prepare
    from fxpipe.cost_models.analytic import AnalyticCostModel

    s, h, a, b, layers = 64, 128, 4, 2, 3
    model, _ = get_preset("gpt-1.3b", n_layer=layers, d=h, n_head=a, vocab=96, seq=s)
    cg = prepare(model, (torch.zeros(b, s, dtype=torch.long, device="meta"),), num_microbatches=1,
                 device="v100-16gb", precision="fp16",
                 cost_model=AnalyticCostModel("v100-16gb", precision="fp16", autocast=False))
    acts = {nd.name: nd.meta["fxpipe.cost"].activation_bytes for nd in cg.gm.graph.nodes if "fxpipe.cost" in nd.meta}
    per_layer = s * b * h * (34 + 5 * a * s // h)
    ln_stats = 2 * b * s * 2                           # one LayerNorm's mean and rstd, b*s each, in fp16
    embedding = s * b * h + 8 * b * s + 8 * s + s * s  # dropout mask, token ids, positions, causal mask
    head = 2 * s * b * h + ln_stats + 2 * s * b * h    # final LN's input and statistics, the head's input
    assert sum(acts.values()) == layers * (per_layer + 2 * ln_stats) + embedding + head
    # on this CPU dropout saves a floating noise tensor instead: 2 bytes per element in fp16, not 1
    cpu = prepare(model, (torch.zeros(b, s, dtype=torch.long, device="meta"),), num_microbatches=1,
                  device="cpu", precision="fp16", cost_model=AnalyticCostModel("cpu", precision="fp16", autocast=False))
    cpu_total = sum(nd.meta["fxpipe.cost"].activation_bytes for nd in cpu.gm.graph.nodes if "fxpipe.cost" in nd.meta)
    masks = layers * (a * s * s * b + 2 * s * b * h) + s * b * h
    assert cpu_total - sum(acts.values()) == masks


def test_megatron_tiny_runs_and_traces():
    model, (x,) = get_preset("megatron-tiny", device="cpu")
    model.eval()                                      # dropout off: traced and eager outputs agree
    x = torch.randint(0, 96, x.shape)
    y = model(x)
    assert y.shape == (*x.shape, 96) and torch.isfinite(y).all()
    gm = trace(model, (x,))
    assert gm.meta["fxpipe.tracer"] == "fx"
    torch.testing.assert_close(gm(x), y)
    assert model.lm_head.weight is model.wte.weight
    bert, _ = get_preset("bert-3.8b")
    assert not bert.causal and abs(num_parameters(bert) / 3.8e9 - 1) < 0.02
