"""A decoder-only transformer language model in the GPT-2 mould (model=gpt): token and position embeddings,
pre-LayerNorm
blocks of causal self-attention (F.scaled_dot_product_attention: flash or memory-efficient kernels on a GPU) and a GELU
MLP, a final LayerNorm, and an output layer tied to the token embedding. GPT-2's initialisation: N(0, 0.02), with the
residual projections scaled by 1/sqrt(2 * n_layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mprun.errors import ConfigError


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.dropout = n_head, dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        heads = [
            t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)
            for t in self.qkv(x).split(width, dim=2)
        ]
        y = F.scaled_dot_product_attention(*heads, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, length, width)))


class Gain(nn.Module):
    """x * gain, as a module of its own: the NaN tracer and the activation statistics name it."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool, gain: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gain = Gain(gain) if gain != 1.0 else None  # the fp16-overflow experiment's knob (GPTConfig.ff_gain)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(x)
        if self.gain is None:
            return self.dropout(self.proj(self.act(hidden)))
        return self.dropout(self.proj(self.act(self.gain(hidden))) / self.gain.gain)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, ff_gain: float = 1.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias, ff_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids (N, T) -> next-token logits (N, T, vocab_size)."""

    def __init__(
        self,
        vocab_size: int,
        context: int,
        *,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        block_size: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        ff_gain: float = 1.0,
        ff_gain_block: int = 0,
    ) -> None:
        super().__init__()
        if context > block_size:
            raise ConfigError(
                f"dataset.block_size={context} is longer than model.block_size={block_size}, the positions the model "
                f"has: set model.block_size={context} or a shorter dataset.block_size"
            )
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(
            Block(n_embd, n_head, dropout, bias, ff_gain if i == ff_gain_block else 1.0) for i in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix reads tokens in and writes them out
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections: the stream's variance grows with depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))
