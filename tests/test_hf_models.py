"""HuggingFace families with DEFAULT configs (tiny sizes only) train exactly at 2, 3 and 4 stages (issue 10).

Per family: ``fxpipe.compile`` once (one trace, the use_cache warning), then the same traced graph is
re-planned at 2, 3 and 4 stages under 2bw and flush, and every pipeline is checked against a float64
single-device reference loop written here: the losses of every batch, and every parameter by name.
Dropout is the only default switched off (``model.eval()``): the reference could not replay its noise.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import fxpipe
from fxpipe.passes.partition import partition
from fxpipe.pipeline import Pipeline
from test_pipeline import SGDM

transformers = pytest.importorskip("transformers", reason="HF tests need the [dev] extra (transformers)")

V, T, B, M = 64, 8, 8, 4          # vocab, sequence, batch, microbatches
TINY = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32)


def _causal(cls: str, cfg: str, **kw):
    def make():
        return getattr(transformers, cls)(getattr(transformers, cfg)(**{**TINY, **kw}))
    return make


FAMILIES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4)),
    "llama": _causal("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2),
    "mistral": _causal("MistralForCausalLM", "MistralConfig", num_key_value_heads=2),
    "qwen2": _causal("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2),
    "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, word_embed_proj_dim=32)),
    "gpt_neox": _causal("GPTNeoXForCausalLM", "GPTNeoXConfig"),
    "gemma2": _causal("Gemma2ForCausalLM", "Gemma2Config", num_key_value_heads=2, head_dim=8),
    "phi3": _causal("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=2, pad_token_id=0),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)),
    "bert": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3)),
    "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3)),
}
# default configs that turn the key/value cache on (BERT's too; ViT has none)
CACHED = {"gpt2", "llama", "mistral", "qwen2", "opt", "gpt_neox", "gemma2", "phi3", "t5", "bert"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine ops such as index_add_
    (Mixtral's experts) spin for milliseconds each waiting for them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _logits_ce(out, y):
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))


def _hf_loss(out, y):
    return out.loss


def _batches(family: str, n: int = 2):
    """``n`` batches of (inputs as a dict of kwargs, targets) and the loss; targets are labels in-model
    for the ``out.loss`` cases (gpt2, t5)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (B, T), generator=g)
        y = torch.randint(0, V, (B, T), generator=g)
        if family == "vit":
            out.append(({"pixel_values": torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64)},
                        torch.randint(0, 3, (B,), generator=g)))
        elif family == "bert":
            mask = torch.ones(B, T, dtype=torch.long)
            mask[::2, 6:] = 0
            out.append(({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (B,), generator=g)))
        elif family == "t5":         # labels in the inputs: the model shifts them into decoder inputs itself
            out.append(({"input_ids": ids, "labels": y}, y))
        elif family == "gpt2":       # labels in the inputs: out.loss is the loss
            out.append(({"input_ids": ids, "labels": y}, y))
        else:
            out.append(({"input_ids": ids}, y))
    if family in ("vit", "bert"):
        return out, lambda o, y: F.cross_entropy(o.logits, y)
    return out, (_hf_loss if family in ("gpt2", "t5") else _logits_ce)


def _reference(model, batches, loss_fn, schedule, constants=None):
    """float64, one device: W(t+1) = W(t) - step(grad f(W(max(t-1, 0)))) for 2bw, W(t) for flush;
    ``constants`` (``return_loss=True``) go to every microbatch's forward as they are."""
    ref = copy.deepcopy(model)
    opt = SGDM(list(ref.parameters()))
    trains = {n: p.requires_grad for n, p in ref.named_parameters()}
    prev, losses = None, []
    for inputs, y in batches:
        newest = {n: p.detach().clone() for n, p in ref.named_parameters()}
        used = newest if (schedule != "2bw" or prev is None) else prev
        # frozen weights (Whisper's and Marian's sinusoidal positions) get no gradient, as in the pipeline
        leaves = {n: v.clone().requires_grad_(trains[n]) for n, v in used.items()}
        total = 0.0
        for i in range(M):
            kw = {**{k: v.chunk(M)[i] for k, v in inputs.items()}, **(constants or {})}
            loss = loss_fn(functional_call(ref, leaves, (), kw), y.chunk(M)[i])
            (loss / M).backward()
            total += loss.item()
        losses.append(total / M)
        for n, p in ref.named_parameters():
            p.grad = leaves[n].grad
        opt.step()
        opt.zero_grad()
        prev = newest
    return losses, {n: p.detach().clone() for n, p in ref.named_parameters()}


def _check_all_depths(model, first: fxpipe.Pipeline, batches, loss_fn, *, first_config=(2, "2bw"),
                      pipe_loss=None):
    """Train ``first`` and pipelines re-planned from its traced graph at 2/3/4 stages x 2bw/flush
    (``pipe_loss``, default ``loss_fn``, is what the pipelines get: it may record what it sees)."""
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    refs = {s: _reference(model, batches, loss_fn, s) for s in ("2bw", "flush")}

    cg = first._cg
    for d in (2, 3, 4):
        for schedule in ("2bw", "flush"):
            if (d, schedule) == first_config:
                pipe = first
            else:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        p.data = init[n].clone()
                plan = partition(cg.gm, cg.cost_model, num_stages=d, num_microbatches=M, schedule=schedule)
                pipe = Pipeline(model, cg, plan, loss_fn=pipe_loss or loss_fn, optimizer=SGDM)
            assert len(pipe.stages) == d
            got = [pipe.step(x, y).item() for x, y in batches]
            ref_losses, ref_w = refs[schedule]
            # HF's own loss upcasts logits with .float(): a float32 loss, averaged over microbatches in
            # float32 by the executor and in Python floats here
            tol = 1e-6 if loss_fn is _hf_loss else 1e-10
            assert got == pytest.approx(ref_losses, abs=tol, rel=0), (d, schedule)
            sd = pipe.state_dict()
            for n, w in ref_w.items():
                torch.testing.assert_close(sd[n], w, atol=1e-10, rtol=0, msg=f"{n} at d={d} {schedule}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_config_trains_exactly_at_2_3_4_stages(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().double().eval()
    assert model.config.to_dict().get("use_cache", False) == (family in CACHED), "the default config changed"
    batches, loss_fn = _batches(family)
    seen = []

    def recording(out, y):
        seen.append(out)
        return loss_fn(out, y)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = fxpipe.compile(model, batches[0][0], num_stages=2, num_microbatches=M, schedule="2bw",
                              loss_fn=recording, optimizer=SGDM)
    cache_warnings = [w for w in caught if "use_cache=False" in str(w.message)]
    assert len(cache_warnings) == (1 if family in CACHED else 0), [str(w.message) for w in caught]
    assert model.config.to_dict().get("use_cache", False) == (family in CACHED), "the config must be restored"
    # forward through the stages: the model's own output object, batch concatenated
    inputs = batches[0][0]
    out, want_out = pipe(inputs), model(**inputs)
    assert type(out) is type(want_out)
    torch.testing.assert_close(out.logits, want_out.logits, atol=1e-10, rtol=0)
    _check_all_depths(model, pipe, batches, loss_fn, pipe_loss=recording)
    # the model's own output object reaches loss_fn, without the cache
    want = type(model(**{k: v[:2] for k, v in batches[0][0].items()}))
    assert {type(o) for o in seen} == {want}
    assert all(getattr(o, "past_key_values", None) is None for o in seen)
    if loss_fn is _hf_loss:
        assert all(o.loss.dim() == 0 and o.logits.dim() == 3 for o in seen)


def test_t5_with_decoder_input_ids():
    torch.manual_seed(0)
    model = FAMILIES["t5"]().double().eval()
    g = torch.Generator().manual_seed(2)
    batches = [({"input_ids": torch.randint(0, V, (B, T), generator=g),
                 "decoder_input_ids": torch.randint(0, V, (B, T - 2), generator=g)},
                torch.randint(0, V, (B, T - 2), generator=g)) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = fxpipe.compile(model, batches[0][0], num_stages=3, num_microbatches=M, schedule="flush",
                              loss_fn=_logits_ce, optimizer=SGDM)
    ref_losses, ref_w = _reference(model, batches, _logits_ce, "flush")
    assert [pipe.step(x, y).item() for x, y in batches] == pytest.approx(ref_losses, abs=1e-10, rel=0)
    sd = pipe.state_dict()
    for n, w in ref_w.items():
        torch.testing.assert_close(sd[n], w, atol=1e-10, rtol=0, msg=n)


def _mixtral():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**TINY, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                     experts_implementation="eager")
    return transformers.MixtralForCausalLM(cfg).double().eval()


def test_mixtral_eager_experts_become_opaque_leaves_and_train_exactly():
    model = _mixtral()
    batches, _ = _batches("mixtral")
    with pytest.warns(UserWarning, match=r"submodule 'model\.layers\.0\.mlp\.experts' \(MixtralExperts\) could "
                                         r"not be traced \(GuardOnDataDependentSymNode"):
        pipe = fxpipe.compile(model, batches[0][0], num_stages=2, num_microbatches=M, schedule="2bw",
                              loss_fn=_logits_ce, optimizer=SGDM)
    gm = pipe._cg.gm
    assert gm.meta["fxpipe.tracer"] == "export+leaves"
    assert gm.meta["fxpipe.leaves"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == gm.meta["fxpipe.leaves"]
    _check_all_depths(model, pipe, batches, _logits_ce)


def test_mixtral_moe_block_as_chosen_leaf():
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    model = _mixtral()
    batches, _ = _batches("mixtral")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = fxpipe.compile(model, batches[0][0], num_stages=3, num_microbatches=M, schedule="flush",
                              loss_fn=_logits_ce, optimizer=SGDM, leaf_modules=[MixtralSparseMoeBlock])
    assert not [w for w in caught if "could not be traced" in str(w.message)], "nothing opaque behind the user's back"
    gm = pipe._cg.gm
    assert gm.meta["fxpipe.tracer"] == "export"
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    ref_losses, ref_w = _reference(model, batches, _logits_ce, "flush")
    assert [pipe.step(x, y).item() for x, y in batches] == pytest.approx(ref_losses, abs=1e-10, rel=0)
    sd = pipe.state_dict()
    for n, w in ref_w.items():
        torch.testing.assert_close(sd[n], w, atol=1e-10, rtol=0, msg=n)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "gpt_neox", "bert"])
def test_a_model_built_on_the_meta_device_plans(family):
    """A model too big to build is planned with its weights on the meta device (no memory, no init):
    GPT-2 goes through torch.export, whose graph asserted and moved values to the meta device."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = FAMILIES[family]()
    x = torch.randint(0, V, (B, T), device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the use_cache warning
        plan = fxpipe.plan(model, (x,), num_stages=2, num_microbatches=M, device="a100-80gb", time_limit=2.0)
    assert plan.num_stages == 2 and all(st.memory > 0 and st.fwd_time > 0 for st in plan.stages)


def test_bf16_bytes_of_a_meta_built_model_match_the_cpu_built_one():
    """Autocast's activation bytes are read on fakes too: GPT-2's .to(x.device) baked as device=meta fell
    back to fp32 bytes on 3 nodes of the meta-built model (passes.shape_prop.autocast_shape_prop)."""
    saved = []
    for where in ("cpu", "meta"):
        with warnings.catch_warnings(), torch.device(where):
            warnings.simplefilter("ignore")
            model = FAMILIES["gpt2"]()
            x = torch.randint(0, V, (B, T))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = fxpipe.plan_with_graph(model, (x,), num_stages=2, num_microbatches=M, precision="bf16",
                                       time_limit=2.0)
        saved.append({n.name: n.meta["fxpipe.cost"].activation_bytes for n in r.gm.graph.nodes
                      if "fxpipe.cost" in n.meta})
    cpu, meta = saved
    assert len(cpu) > 100 and meta == cpu
