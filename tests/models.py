"""Models shared by the tests: an MLP chain, a skip-connection net with a buffer, a tied-embedding GPT."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """A chain of Linear+Tanh layers with uneven widths."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 24, 48, 16, 8)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


class SkipNet(nn.Module):
    """Long skip connections that cross several stages, and a registered buffer.

    ``h0`` feeds the very last layer, ``h1`` is added three blocks later.
    """

    def __init__(self, dim: int = 12, depth: int = 6, out: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.head = nn.Linear(2 * dim, out)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = torch.relu(self.inp(x))
        h = h0
        skips = []
        for i, blk in enumerate(self.blocks):
            h = torch.tanh(blk(h)) * self.scale
            skips.append(h)
            if i >= 3:
                h = h + skips[i - 3]
        return self.head(torch.cat([h, h0], dim=-1))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, block: int) -> None:
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(block, block, dtype=torch.bool)))
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.n_head = n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(~self.mask, float("-inf"))  # T == block in the tests
        y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """nanoGPT-style decoder with the input embedding tied to the output head."""

    def __init__(self, vocab: int = 37, d: int = 16, n_layer: int = 4, n_head: int = 2, block: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, n_head, block) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def mlp_case(dtype: torch.dtype = torch.float64, batch: int = 8):
    torch.manual_seed(0)
    model = MLP().to(dtype)
    x = torch.randn(batch, 16, dtype=dtype)
    y = torch.randn(batch, 8, dtype=dtype)
    return model, x, y, F.mse_loss


def skip_case(dtype: torch.dtype = torch.float64, batch: int = 8):
    torch.manual_seed(1)
    model = SkipNet().to(dtype)
    x = torch.randn(batch, 12, dtype=dtype)
    y = torch.randint(0, 5, (batch,))
    return model, x, y, F.cross_entropy


def gpt_case(dtype: torch.dtype = torch.float64, batch: int = 8):
    torch.manual_seed(2)
    model = TinyGPT().to(dtype)
    x = torch.randint(0, 37, (batch, 8))
    y = torch.randint(0, 37, (batch, 8))
    return model, x, y, gpt_loss


CASES = {"mlp": mlp_case, "skip": skip_case, "gpt": gpt_case}


class BNNet(nn.Module):
    """Linear + BatchNorm1d blocks and dropout: persistent buffers a step changes, and random draws."""

    def __init__(self, dim: int = 8, hidden: int = 16, out: int = 4, p: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.bn1(self.fc1(x)))
        h = torch.tanh(self.bn2(self.fc2(h)))
        return self.head(self.drop(h))


def bn_case(dtype: torch.dtype = torch.float64, batch: int = 16):
    """Not in CASES: BatchNorm makes a microbatch's output depend on the microbatch it is in."""
    torch.manual_seed(3)
    model = BNNet().to(dtype)
    x = torch.randn(batch, 8, dtype=dtype)
    y = torch.randn(batch, 4, dtype=dtype)
    return model, x, y, F.mse_loss


class MaskNet(nn.Module):
    """Two masked layers reading one causal mask built from a buffer (as the Megatron presets do):
    whichever stage the second layer lands on recomputes the mask instead of receiving it."""

    def __init__(self, t: int = 8, block: int = 16) -> None:
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(block, block, dtype=torch.bool)))
        self.fc1 = nn.Linear(t, t)
        self.fc2 = nn.Linear(t, t)
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.size(1)
        hide = ~self.mask.narrow(0, 0, t).narrow(1, 0, t)     # [t, t] bool, local
        h = torch.tanh(self.fc1(x).masked_fill(hide, 0.0))
        return self.fc2(h).masked_fill(hide, 0.0)


def mask_case(dtype: torch.dtype = torch.float64, batch: int = 8):
    """Not in CASES: a model for the local-values tests (x: [batch, 8, 8])."""
    torch.manual_seed(4)
    model = MaskNet().to(dtype)
    x = torch.randn(batch, 8, 8, dtype=dtype)
    y = torch.randn(batch, 8, 8, dtype=dtype)
    return model, x, y, F.mse_loss
