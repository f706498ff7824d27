"""More HuggingFace families, each from a tiny default config, compile with default settings and train
exactly at 2 stages against the float64 reference of tests/test_hf_models.py (2bw's weight-version rule).

One depth per family keeps the suite short; tests/test_hf_models.py re-plans its families at 2, 3 and 4
stages. Mixture-of-experts blocks use ``experts_implementation="eager"``: the default grouped_mm kernel has
no float64 version (that data-dependent loop then becomes an opaque leaf, as Mixtral's does).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import fxpipe
from test_hf_models import B, M, T, TINY, V, _one_thread, _reference  # noqa: F401 - _one_thread: autouse
from test_pipeline import SGDM

transformers = pytest.importorskip("transformers", reason="HF tests need the [dev] extra (transformers)")

KV = dict(num_key_value_heads=2)
EAGER_EXPERTS = dict(experts_implementation="eager")
BERTISH = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=40, num_labels=3)
SEQ2SEQ = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
               pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
VISION = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64)


def _hf(cls: str, cfg: str, tiny: dict | None = None, **kw):
    def make():
        return getattr(transformers, cls)(getattr(transformers, cfg)(**{**(TINY if tiny is None else tiny), **kw}))
    return make


# family -> (factory, input kind, the frontend that traces it)
FAMILIES = {
    "qwen3": (_hf("Qwen3ForCausalLM", "Qwen3Config", **KV, head_dim=8), "causal", "export"),
    "qwen3_moe": (_hf("Qwen3MoeForCausalLM", "Qwen3MoeConfig", **KV, **EAGER_EXPERTS, head_dim=8, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32), "causal", "export+leaves"),
    "gemma": (_hf("GemmaForCausalLM", "GemmaConfig", **KV, head_dim=8), "causal", "export"),
    "gemma3": (_hf("Gemma3ForCausalLM", "Gemma3TextConfig", **KV, head_dim=8, sliding_window=4), "causal", "export"),
    "phi": (_hf("PhiForCausalLM", "PhiConfig"), "causal", "export"),
    "falcon": (_hf("FalconForCausalLM", "FalconConfig"), "causal", "export"),
    "bloom": (_hf("BloomForCausalLM", "BloomConfig", {}, vocab_size=V, hidden_size=32, n_layer=2, n_head=4),
              "causal", "export"),
    "gptj": (_hf("GPTJForCausalLM", "GPTJConfig", {}, vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                 rotary_dim=4), "causal", "export"),
    "starcoder2": (_hf("Starcoder2ForCausalLM", "Starcoder2Config", **KV), "causal", "export"),
    "olmo2": (_hf("Olmo2ForCausalLM", "Olmo2Config", **KV), "causal", "export"),
    "cohere": (_hf("CohereForCausalLM", "CohereConfig", **KV), "causal", "export"),
    "granite": (_hf("GraniteForCausalLM", "GraniteConfig", **KV), "causal", "export"),
    "stablelm": (_hf("StableLmForCausalLM", "StableLmConfig", **KV), "causal", "export"),
    "deepseek_v3": (_hf("DeepseekV3ForCausalLM", "DeepseekV3Config", **EAGER_EXPERTS, moe_intermediate_size=32,
                        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                        n_shared_experts=1), "causal", "export+leaves"),
    "mamba": (_hf("MambaForCausalLM", "MambaConfig", {}, vocab_size=V, hidden_size=32, num_hidden_layers=2,
                  state_size=4, expand=2, conv_kernel=4), "causal32", "export"),
    "roberta": (_hf("RobertaForSequenceClassification", "RobertaConfig", BERTISH, pad_token_id=1), "cls", "export"),
    "distilbert": (_hf("DistilBertForSequenceClassification", "DistilBertConfig", {}, vocab_size=V, dim=32,
                       n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32, num_labels=3),
                   "cls", "export"),
    "deberta_v2": (_hf("DebertaV2ForSequenceClassification", "DebertaV2Config", BERTISH), "cls", "export"),
    "electra": (_hf("ElectraForSequenceClassification", "ElectraConfig", BERTISH, embedding_size=16), "cls", "export"),
    "albert": (_hf("AlbertForSequenceClassification", "AlbertConfig", BERTISH, embedding_size=16), "cls", "export"),
    "bart": (_hf("BartForConditionalGeneration", "BartConfig", SEQ2SEQ), "seq2seq", "export"),
    # routers that cast their classifier in forward (.to(dtype)): opaque leaves, as the experts
    "nllb_moe": (_hf("NllbMoeForConditionalGeneration", "NllbMoeConfig", SEQ2SEQ, num_experts=4, expert_capacity=8,
                     encoder_sparse_step=2, decoder_sparse_step=2), "seq2seq", "export+leaves"),
    # frozen sinusoidal positions in the encoder (requires_grad=False): no update, in both loops
    "whisper": (_hf("WhisperForConditionalGeneration", "WhisperConfig", {}, vocab_size=V, num_mel_bins=8, d_model=32,
                    encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                    encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=8, max_target_positions=32,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0), "speech", "export"),
    "clip_vision": (_hf("CLIPVisionModel", "CLIPVisionConfig", VISION), "pooled", "export"),
    "swin": (_hf("SwinForImageClassification", "SwinConfig", {}, image_size=16, patch_size=2, embed_dim=16,
                 depths=[1, 1], num_heads=[2, 2], window_size=2, num_labels=3), "image", "export"),
    # plain torch.fx traces it, with labels=None left out
    "poolformer": (_hf("PoolFormerForImageClassification", "PoolFormerConfig", {}, num_encoder_blocks=2, depths=[1, 1],
                       hidden_sizes=[8, 16], patch_sizes=[3, 3], strides=[2, 2], padding=[1, 1], pool_size=3,
                       num_labels=3), "image", "fx"),
    "resnet": (_hf("ResNetForImageClassification", "ResNetConfig", {}, embedding_size=8, hidden_sizes=[8, 16],
                   depths=[1, 1], layer_type="basic", num_labels=3), "image", "export"),
}


def _ce(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


LOSSES = {"causal": lambda o, y: _ce(o.logits, y), "causal32": lambda o, y: _ce(o.logits, y),
          "speech": lambda o, y: _ce(o.logits, y), "cls": lambda o, y: _ce(o.logits, y),
          "image": lambda o, y: _ce(o.logits, y), "seq2seq": lambda o, y: o.loss,
          "pooled": lambda o, y: F.mse_loss(o.pooler_output, y)}
FLOAT32_LOSS = {"causal32", "seq2seq"}     # Mamba's logits and HF's own loss are upcast to float32


def _batches(kind: str, n: int = 2) -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids, y = torch.randint(3, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
        labels = torch.randint(0, 3, (B,), generator=g)
        pixels = torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64)
        if kind in ("causal", "causal32"):
            out.append(({"input_ids": ids}, y))
        elif kind == "cls":
            mask = torch.ones(B, T, dtype=torch.long)
            mask[::2, 6:] = 0
            out.append(({"input_ids": ids, "attention_mask": mask}, labels))
        elif kind == "seq2seq":      # labels in the inputs: the model shifts them into decoder inputs itself
            out.append(({"input_ids": ids, "labels": y}, y))
        elif kind == "speech":
            out.append(({"input_features": torch.randn(B, 8, 16, generator=g, dtype=torch.float64),
                         "decoder_input_ids": ids}, y))
        elif kind == "image":
            out.append(({"pixel_values": pixels}, labels))
        else:
            out.append(({"pixel_values": pixels}, torch.randn(B, 32, generator=g, dtype=torch.float64)))
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_config_trains_exactly_at_2_stages(family):
    make, kind, tracer = FAMILIES[family]
    torch.manual_seed(0)
    model = make().double().eval()
    batches, loss_fn = _batches(kind), LOSSES[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the use_cache warning; MoE experts made opaque
        pipe = fxpipe.compile(model, batches[0][0], num_stages=2, num_microbatches=M, loss_fn=loss_fn,
                              optimizer=SGDM)
    gm = pipe._cg.gm
    assert gm.meta["fxpipe.tracer"] == tracer and len(pipe.stages) == 2
    if tracer == "export+leaves":
        assert {p.rsplit(".", 1)[-1] for p in gm.meta["fxpipe.leaves"]} <= {"experts", "router"}
    ref_losses, ref_w = _reference(model, batches, loss_fn, "2bw")
    got = [pipe.step(x, y).item() for x, y in batches]
    assert got == pytest.approx(ref_losses, abs=1e-6 if kind in FLOAT32_LOSS else 1e-10, rel=0)
    sd = pipe.state_dict()
    for n, w in ref_w.items():
        torch.testing.assert_close(sd[n], w, atol=1e-10, rtol=0, msg=n)


@pytest.mark.parametrize("family", ["nllb_moe", "poolformer"])
def test_a_family_the_trace_fixes_opened_plans_on_the_meta_device(family):
    """The routers' leaves and plain fx's graph are planned without weights as well: shape propagation
    runs a leaf that fakes cannot run on random real tensors, meta parameters included."""
    make, kind, _ = FAMILIES[family]
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = make().double()
    inputs = {k: v.to("meta") for k, v in _batches(kind, 1)[0][0].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = fxpipe.plan(model, inputs, num_stages=2, num_microbatches=M, device="a100-80gb", time_limit=2.0)
    assert plan.num_stages == 2 and all(st.memory > 0 and st.fwd_time > 0 for st in plan.stages)
