"""Prompt tokens -> per-token context vectors for cross-attention.

A small pre-norm transformer encoder built from nn.Linear/nn.LayerNorm/nn.Embedding only, so that
per-sample gradient norms (DP-SGD) have an exact rule for every parameterised layer. The null
prompt ([NULL, PAD, ...]) goes through the same encoder: its NULL token embedding is the learned
unconditional embedding used by classifier-free guidance.
"""
from __future__ import annotations

import torch
from torch import nn

from data_pipeline.vocab import PAD_ID
from engine.model.attention import attention


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str) -> None:
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = attention(q, k, v, mask, self.backend).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(h)
        return x + self.mlp(self.norm2(x))


class PromptEncoder(nn.Module):
    def __init__(self, vocab_size: int, max_tokens: int, dim: int, layers: int, heads: int,
                 backend: str = "sdpa") -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_tokens, dim)
        self.layers = nn.ModuleList([EncoderLayer(dim, heads, backend) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, L] int64 -> (context [B, L, D], mask [B, L] bool, True where a real token is)."""
        mask = tokens != PAD_ID
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        # expand (not broadcast) so per-sample gradient hooks (DP-SGD) see one row per sample
        x = self.token_embedding(tokens) + self.position_embedding(positions.expand(tokens.shape[0], -1))
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x), mask
