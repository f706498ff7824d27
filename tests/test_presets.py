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
