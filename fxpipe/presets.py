"""Built-in model presets (GPT-2, BERT, Llama, ResNet shapes) built on the meta device, for planning.

Every preset is a factory ``f(**overrides) -> (model, example_inputs)``; the model's
parameters live on ``torch.device("meta")`` (no weights are allocated), and the
example inputs are one whole batch, also on meta, as :func:`fxpipe.plan` takes it
(it is split into ``num_microbatches`` along dim 0)::

    >>> model, (idx,) = get_preset("gpt2-xl")              # 1.56e9 parameters, 0 bytes
    >>> plan = fxpipe.plan(model, (idx,), num_stages=16, num_microbatches=16)
    >>> model, inputs = get_preset("gpt2-xl", batch=32, n_layer=4)   # overrides

Overrides common to all presets: ``batch`` (whole-batch size), ``device``
(default ``"meta"``; pass ``"cpu"`` to get real, randomly initialised weights) and
``small=True`` (the family's tiny shape, for fast tests; other overrides apply on
top). Each family also takes its shape fields (``n_layer``, ``d``, ``n_head``,
``vocab``, ``seq`` ...), see the factory functions.

The models are written here with plain ``nn`` layers so that ``torch.fx`` traces
them (no torchvision, no hub downloads; ``nn.TransformerEncoderLayer`` is avoided
because plain fx cannot trace it).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxpipe.errors import ModelSpecError
from fxpipe.examples.gpt import GPT, GPTConfig

__all__ = [
    "PRESETS",
    "get_preset",
    "preset_names",
    "num_parameters",
    "gpt2",
    "bert",
    "megatron",
    "llama",
    "resnet",
    "BertEncoder",
    "MegatronLM",
    "Llama",
    "ResNet",
]

Factory = Callable[..., tuple[nn.Module, tuple[torch.Tensor, ...]]]


def _device(device: str | torch.device) -> torch.device:
    return torch.device(device)


# --------------------------------------------------------------------------- GPT-2 (nanoGPT)


def gpt2(*, n_layer: int = 12, d: int = 768, n_head: int = 12, vocab: int = 50257, block: int = 1024,
         seq: int | None = None, batch: int | None = None, small: bool = False,
         device: str | torch.device = "meta") -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A nanoGPT-style GPT-2 (pre-LN blocks, tied embeddings) and a batch of token ids.

    Defaults are GPT-2 small (124M), batch 32. ``small=True``: 2 layers, d=64, 4 heads, vocab 96,
    block 32, batch 8.

    Returns:
        ``(GPT, (idx,))`` with ``idx`` of shape ``(batch, seq)`` (``seq`` defaults to ``block``).
    """
    if small:
        n_layer, d, n_head, vocab, block = 2, 64, 4, 96, 32
    batch = batch or (8 if small else 32)
    dev = _device(device)
    with dev:
        model = GPT(GPTConfig(vocab=vocab, block=block, d=d, n_layer=n_layer, n_head=n_head))
    idx = torch.zeros(batch, seq or block, dtype=torch.long, device=dev)
    return model, (idx,)


# --------------------------------------------------------------------------- BERT encoder


class _BertLayer(nn.Module):
    """Post-LN BERT encoder layer: self-attention, add & norm, GELU FFN, add & norm."""

    def __init__(self, d: int, n_head: int, d_ff: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=1e-12)
        self.intermediate = nn.Linear(d, d_ff)
        self.output = nn.Linear(d_ff, d)
        self.out_norm = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = C // self.n_head
        q = self.query(x).view(B, T, self.n_head, h).transpose(1, 2)
        k = self.key(x).view(B, T, self.n_head, h).transpose(1, 2)
        v = self.value(x).view(B, T, self.n_head, h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        x = self.attn_norm(x + self.attn_out(y))
        return self.out_norm(x + self.output(F.gelu(self.intermediate(x))))


class BertEncoder(nn.Module):
    """BERT for masked-LM: embeddings (word, position, token type), N post-LN layers, tied MLM head."""

    def __init__(self, *, n_layer: int, d: int, n_head: int, vocab: int, max_pos: int, d_ff: int) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, d)
        self.position = nn.Embedding(max_pos, d)
        self.token_type = nn.Embedding(2, d)
        self.emb_norm = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(_BertLayer(d, n_head, d_ff) for _ in range(n_layer))
        self.head_dense = nn.Linear(d, d)
        self.head_norm = nn.LayerNorm(d, eps=1e-12)
        self.decoder = nn.Linear(d, vocab)
        self.decoder.weight = self.word.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.word(input_ids) + self.position(pos) + self.token_type.weight[0]
        x = self.emb_norm(x)
        for layer in self.layers:
            x = layer(x)
        x = self.head_norm(F.gelu(self.head_dense(x)))
        return self.decoder(x)


def bert(*, n_layer: int = 24, d: int = 1024, n_head: int = 16, vocab: int = 30522, seq: int = 512,
         d_ff: int | None = None, batch: int | None = None, small: bool = False,
         device: str | torch.device = "meta") -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A BERT-shaped masked-LM encoder and a batch of token ids.

    Defaults are BERT-large (335M parameters, seq 512, batch 64). ``small=True``: 2 layers, d=64,
    4 heads, vocab 128, seq 32, batch 8.

    Returns:
        ``(BertEncoder, (input_ids,))`` with ``input_ids`` of shape ``(batch, seq)``.
    """
    if small:
        n_layer, d, n_head, vocab, seq = 2, 64, 4, 128, 32
    batch = batch or (8 if small else 64)
    dev = _device(device)
    with dev:
        model = BertEncoder(n_layer=n_layer, d=d, n_head=n_head, vocab=vocab, max_pos=seq,
                            d_ff=d_ff or 4 * d)
    return model, (torch.zeros(batch, seq, dtype=torch.long, device=dev),)


# --------------------------------------------------------------------------- Megatron-LM (the paper's models)


class _MegatronLayer(nn.Module):
    """Megatron-LM's transformer layer as PipeDream-2BW ran it: pre-LN, [s, b, h] layout, unfused
    attention (bmm scores, masked softmax, dropout on the probabilities, bmm with V), dropout
    after the attention and MLP projections.

    What autograd saves per layer is then Korthikanti et al.'s count (MLSys 2023, Table 2),
    ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit: LN inputs 4sbh, Q K V 6sbh, softmax output 2as^2b,
    its dropout mask as^2b and output 2as^2b, projection input 2sbh, MLP 2sbh + 8sbh + 8sbh,
    two hidden dropout masks 2sbh (checked in tests/test_presets.py).
    """

    def __init__(self, d: int, n_head: int, p: float) -> None:
        super().__init__()
        self.n_head, self.hd, self.p = n_head, d // n_head, p
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)
        self.attn_drop = nn.Dropout(p)
        self.drop_1 = nn.Dropout(p)
        self.drop_2 = nn.Dropout(p)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s, b, d = x.shape
        n, hd = self.n_head, self.hd
        q, k, v = self.qkv(self.ln_1(x)).view(s, b * n, 3 * hd).split(hd, dim=-1)   # views, no copy
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)            # [b*n, s, hd]
        scores = torch.bmm(q, k.transpose(1, 2)) * (1.0 / math.sqrt(hd))
        probs = self.attn_drop(F.softmax(scores.masked_fill(mask, -10000.0), dim=-1))
        ctx = torch.bmm(probs, v).view(b, n, s, hd).permute(2, 0, 1, 3).contiguous().view(s, b, d)
        x = x + self.drop_1(self.proj(ctx))
        return x + self.drop_2(self.fc_out(F.gelu(self.fc(self.ln_2(x)))))


class MegatronLM(nn.Module):
    """Megatron-LM's GPT (causal) or BERT (bidirectional, MLM head) with a tied output layer."""

    def __init__(self, *, n_layer: int, d: int, n_head: int, vocab: int, seq: int, causal: bool,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.causal = causal
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(_MegatronLayer(d, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head_dense = None if causal else nn.Linear(d, d)
        self.head_norm = None if causal else nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=not causal)
        self.lm_head.weight = self.wte.weight
        full = torch.ones(seq, seq, dtype=torch.bool)
        self.register_buffer("mask", ~torch.tril(full) if causal else ~full, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.drop((self.wte(idx) + self.wpe(pos)).transpose(0, 1).contiguous())   # [s, b, h]
        mask = self.mask.narrow(0, 0, T).narrow(1, 0, T)
        for layer in self.h:
            x = layer(x, mask)
        x = self.ln_f(x).transpose(0, 1)
        if self.head_dense is not None and self.head_norm is not None:
            x = self.head_norm(F.gelu(self.head_dense(x)))
        return self.lm_head(x)


def megatron(*, n_layer: int = 24, d: int = 1024, n_head: int = 16, vocab: int = 50257, seq: int = 512,
             causal: bool = True, dropout: float = 0.1, batch: int | None = None, small: bool = False,
             device: str | torch.device = "meta") -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A Megatron-LM GPT (``causal=True``) or BERT and a batch of token ids.

    Megatron-LM trains it in fp16 itself, not under autocast: plan it as such with
    ``cost_model=AnalyticCostModel(device, precision="fp16", autocast=False)`` (every activation
    in 2 bytes, Korthikanti et al.'s count; bench/paper.py does).

    ``small=True``: 2 layers, d=64, 4 heads, vocab 96, seq 32, batch 8.

    Returns:
        ``(MegatronLM, (idx,))`` with ``idx`` of shape ``(batch, seq)``.
    """
    if small:
        n_layer, d, n_head, vocab, seq = 2, 64, 4, 96, 32
    batch = batch or 8
    dev = _device(device)
    with dev:
        model = MegatronLM(n_layer=n_layer, d=d, n_head=n_head, vocab=vocab, seq=seq, causal=causal,
                           dropout=dropout)
    return model, (torch.zeros(batch, seq, dtype=torch.long, device=dev),)


# --------------------------------------------------------------------------- Llama decoder


def _rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the last dim; ``half`` is a Python int so fx can trace it."""
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _LlamaLayer(nn.Module):
    """Pre-RMSNorm block: causal attention with rotary embeddings, then a SwiGLU MLP."""

    def __init__(self, d: int, n_head: int, d_ff: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.half = d // n_head // 2
        self.attn_norm = nn.RMSNorm(d, eps=1e-6)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=1e-6)
        self.gate_proj = nn.Linear(d, d_ff, bias=False)
        self.up_proj = nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q * cos + _rotate_half(q, self.half) * sin
        k = k * cos + _rotate_half(k, self.half) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    """Llama-shaped decoder: token embedding, N pre-RMSNorm SwiGLU layers with RoPE, untied head.

    RoPE tables are precomputed buffers ``cos``/``sin`` of shape ``(seq, head_dim)``
    sliced to the input length, so fx traces the model without data-dependent code.
    """

    def __init__(self, *, n_layer: int, d: int, n_head: int, vocab: int, seq: int, d_ff: int,
                 rope_theta: float = 10000.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_LlamaLayer(d, n_head, d_ff) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        hd = d // n_head
        inv = 1.0 / (rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        cos, sin = self.cos.narrow(0, 0, T), self.sin.narrow(0, 0, T)
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def llama(*, n_layer: int = 32, d: int = 4096, n_head: int = 32, vocab: int = 32000, seq: int = 2048,
          d_ff: int = 11008, batch: int | None = None, small: bool = False,
          device: str | torch.device = "meta") -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A Llama-shaped decoder and a batch of token ids.

    Defaults are Llama-7B (6.74e9 parameters, seq 2048, batch 32). ``small=True``: 2 layers, d=64,
    4 heads, SwiGLU 172, vocab 128, seq 32, batch 8.

    Returns:
        ``(Llama, (idx,))`` with ``idx`` of shape ``(batch, seq)``.
    """
    if small:
        n_layer, d, n_head, vocab, seq, d_ff = 2, 64, 4, 128, 32, 172
    batch = batch or (8 if small else 32)
    dev = _device(device)
    with dev:
        model = Llama(n_layer=n_layer, d=d, n_head=n_head, vocab=vocab, seq=seq, d_ff=d_ff)
    return model, (torch.zeros(batch, seq, dtype=torch.long, device=dev),)


# --------------------------------------------------------------------------- ResNet


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with bottleneck blocks (torchvision's ResNet-50 layout for ``layers=(3, 4, 6, 3)``)."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), base: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks: list[nn.Module] = []
        c_in = base
        for i, n in enumerate(layers):
            width = base * 2 ** i
            for j in range(n):
                blocks.append(_Bottleneck(c_in, width, 2 if (j == 0 and i > 0) else 1))
                c_in = width * _Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.blocks(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet(*, layers: tuple[int, ...] = (3, 4, 6, 3), base: int = 64, num_classes: int = 1000,
           image: int = 224, batch: int | None = None, small: bool = False,
           device: str | torch.device = "meta") -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A bottleneck ResNet and a batch of images.

    Defaults are ResNet-50 (25.6M parameters, 224x224, batch 64). ``small=True``: one block per
    layer, base width 8, 10 classes, 64x64 images, batch 8.

    Returns:
        ``(ResNet, (images,))`` with ``images`` of shape ``(batch, 3, image, image)``.
    """
    if small:
        layers, base, num_classes, image = (1, 1, 1, 1), 8, 10, 64
    batch = batch or (8 if small else 64)
    dev = _device(device)
    with dev:
        model = ResNet(tuple(layers), base=base, num_classes=num_classes)
    return model, (torch.zeros(batch, 3, image, image, device=dev),)


# --------------------------------------------------------------------------- registry

PRESETS: dict[str, Factory] = {
    # full-size models (meta device, realistic whole batches)
    "gpt2-small": functools.partial(gpt2, n_layer=12, d=768, n_head=12),
    "gpt2-medium": functools.partial(gpt2, n_layer=24, d=1024, n_head=16),
    "gpt2-large": functools.partial(gpt2, n_layer=36, d=1280, n_head=20),
    "gpt2-xl": functools.partial(gpt2, n_layer=48, d=1600, n_head=25),
    "bert-base": functools.partial(bert, n_layer=12, d=768, n_head=12),
    "bert-large": functools.partial(bert, n_layer=24, d=1024, n_head=16),
    # PipeDream-2BW's models (ICML 2021 §5): Megatron-LM's GPT and BERT, seq 512, fp16 on V100s
    "gpt-1.3b": functools.partial(megatron, n_layer=24, d=2048, n_head=16),
    "gpt-2.2b": functools.partial(megatron, n_layer=32, d=2304, n_head=24),
    "gpt-3.8b": functools.partial(megatron, n_layer=32, d=3072, n_head=32),
    "bert-2.2b": functools.partial(megatron, n_layer=32, d=2304, n_head=24, vocab=30522, causal=False),
    "bert-3.8b": functools.partial(megatron, n_layer=32, d=3072, n_head=32, vocab=30522, causal=False),
    "llama-7b": functools.partial(llama, n_layer=32, d=4096, n_head=32, d_ff=11008),
    "llama-13b": functools.partial(llama, n_layer=40, d=5120, n_head=40, d_ff=13824),
    "resnet-50": functools.partial(resnet, layers=(3, 4, 6, 3)),
    "resnet-101": functools.partial(resnet, layers=(3, 4, 23, 3)),
    # tiny shapes for fast tests (same code paths)
    "gpt-small-test": functools.partial(gpt2, small=True),
    "bert-tiny": functools.partial(bert, small=True),
    "llama-tiny": functools.partial(llama, small=True),
    "resnet-tiny": functools.partial(resnet, small=True),
    "megatron-tiny": functools.partial(megatron, small=True),
}


def preset_names() -> list[str]:
    """The preset names, in registry order."""
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build a preset model and its example batch.

    Args:
        name: a key of :data:`PRESETS` (e.g. ``"gpt2-xl"``, ``"bert-large"``,
            ``"llama-7b"``, ``"resnet-50"``, ``"gpt-small-test"``).
        **overrides: keyword arguments of the family's factory (``batch``, ``device``,
            ``small``, ``n_layer``, ``seq`` ...), applied over the preset's own.

    Returns:
        ``(model, example_inputs)``; by default everything is on the meta device.

    Raises:
        ModelSpecError: unknown name, or an override the factory does not take.
    """
    if name not in PRESETS:
        raise ModelSpecError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)} "
                             "(or give path/to/file.py:factory or pkg.module:factory)")
    factory = PRESETS[name]
    try:
        return factory(**overrides)
    except TypeError as e:
        raise ModelSpecError(f"preset {name!r} does not take {sorted(overrides)}: {e}") from e


def num_parameters(model: nn.Module) -> int:
    """Parameters counted once each (tied weights once), on any device including meta."""
    return sum(p.numel() for p in model.parameters())

