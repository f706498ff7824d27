"""A small nanoGPT-style decoder (tied embeddings) and a character tokenizer for the demo."""

from __future__ import annotations

import math
from importlib import resources

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "GPT", "CharData", "gpt_factory"]


class GPTConfig:
    def __init__(self, vocab: int = 96, block: int = 64, d: int = 128, n_layer: int = 4, n_head: int = 4) -> None:
        self.vocab, self.block, self.d, self.n_layer, self.n_head = vocab, block, d, n_layer, n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.qkv = nn.Linear(c.d, 3 * c.d)
        self.proj = nn.Linear(c.d, c.d)
        self.n_head = c.n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLPBlock(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(c.d, 4 * c.d)
        self.proj = nn.Linear(4 * c.d, c.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.d)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.d)
        self.mlp = MLPBlock(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, n_layer pre-LN blocks, a head tied to the token embedding."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab, c.d)
        self.wpe = nn.Embedding(c.block, c.d)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d)
        self.lm_head = nn.Linear(c.d, c.vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class CharData:
    """Characters of a text shipped with fxpipe, as (input, next-character target) batches."""

    def __init__(self, name: str = "gpl3.txt") -> None:
        text = resources.files("fxpipe.examples").joinpath(name).read_text(encoding="utf-8")
        self.chars = sorted(set(text))
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.data = torch.tensor([self.stoi[ch] for ch in text], dtype=torch.long)

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def batch(self, batch: int, block: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(self.data) - block - 1, (batch,), generator=generator)
        x = torch.stack([self.data[i: i + block] for i in ix])
        y = torch.stack([self.data[i + 1: i + 1 + block] for i in ix])
        return x, y


def gpt_factory(batch: int = 16, block: int = 64, d: int = 128, n_layer: int = 4, n_head: int = 4,
                vocab: int = 96) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``fxpipe dump fxpipe.examples.gpt:gpt_factory`` — the demo model and one example batch."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=vocab, block=block, d=d, n_layer=n_layer, n_head=n_head))
    return model, (torch.zeros(batch, block, dtype=torch.long),)
