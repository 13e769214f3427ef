"""Pixel-space conditional U-Net (ADM / DDPM++ family) for 1-channel chest X-rays.

    tokens --PromptEncoder--> context [B, L, D] --+--> cross-attention in every attention block
                                                  +--> masked mean -> added to the time embedding
    x_t, t --> conv_in --> down (ResBlocks [+attn], downsample) --> mid --> up (skip concat) --> conv_out

The network is split into `encode(tokens)` and `denoise(x_t, t, context, mask)` so that the
memorization and mitigation code can hold the context tensor, differentiate with respect to it
and swap it for an optimised one. `forward(x_t, t, tokens)` is the two composed.
One config serves a 0.5M-parameter CPU demo and a several-hundred-million-parameter GPU model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from data_pipeline.config_schema import ConfigSection, FieldError, constrained
from engine.model.attention import BACKENDS, attention
from engine.model.prompt_encoder import PromptEncoder


def _in_range(default: int, low: int, high: int):
    return constrained(default, f"int in [{low}, {high}]", lambda v: low <= v <= high)


# Upper bounds far above any model this project trains (the GPU config: 128 channels x (1, 2, 3, 4)),
# so that a tampered or mistyped size is refused while reading the config, before the network is
# built: num_res_blocks 10**7 would otherwise build modules until memory runs out.
MAX_CHANNELS, MAX_MULT, MAX_LEVELS, MAX_BLOCKS = 16384, 16, 8, 32


@dataclass(frozen=True)
class UNetConfig(ConfigSection):
    """The `model` section of a training config (and of an exported model)."""
    SECTION = "model"
    image_size: int = _in_range(64, 8, 4096)
    in_channels: int = _in_range(1, 1, 16)
    base_channels: int = constrained(64, f"even int in [4, {MAX_CHANNELS}]",
                                     lambda v: 4 <= v <= MAX_CHANNELS and v % 2 == 0)
    channel_mult: tuple[int, ...] = constrained((1, 2, 2, 2), f"1 to {MAX_LEVELS} ints in [1, {MAX_MULT}]",
                                                lambda v: 1 <= len(v) <= MAX_LEVELS and 1 <= min(v)
                                                and max(v) <= MAX_MULT)
    num_res_blocks: int = _in_range(2, 1, MAX_BLOCKS)
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = _in_range(4, 1, 256)
    dropout: float = constrained(0.0, "float in [0, 1)", lambda v: 0.0 <= v < 1.0)
    vocab_size: int = _in_range(128, 2, 1 << 20)
    max_tokens: int = _in_range(32, 1, 4096)
    context_dim: int = _in_range(128, 1, 16384)
    encoder_layers: int = _in_range(2, 0, 64)
    encoder_heads: int = _in_range(4, 1, 256)
    attention_backend: str = constrained("sdpa", f"one of {', '.join(BACKENDS)}", lambda v: v in BACKENDS)
    grad_checkpointing: bool = False
    extra: dict = field(default_factory=dict)  # reserved for forward-compatible additions

    def check(self) -> None:
        halvings = 2 ** (len(self.channel_mult) - 1)   # one downsampling per level after the first
        if self.image_size % halvings:
            raise FieldError("image_size", f"expected a multiple of {halvings} ({len(self.channel_mult)} "
                                           f"channel_mult levels), got {self.image_size}")
        if self.context_dim < 1 or self.context_dim % self.encoder_heads:
            raise FieldError("context_dim", f"expected a positive multiple of encoder_heads "
                                            f"({self.encoder_heads}), got {self.context_dim}")
        # attention splits channels into heads: at every level with attention and in the middle block
        attended = [m for i, m in enumerate(self.channel_mult) if self.image_size >> i in self.attention_resolutions]
        for mult in attended + [self.channel_mult[-1]]:
            if (self.base_channels * mult) % self.num_heads:
                raise FieldError("num_heads", f"expected a divisor of every attended channel count, "
                                              f"{self.base_channels * mult} (base_channels x {mult}) is not")

    def to_dict(self) -> dict:
        return asdict(self)


def _groups(channels: int) -> int:
    # GroupNorm with up to 32 groups but at least 2 channels per group (tiny CPU models have 16 ch).
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels, then cross-attention from pixels to the prompt context."""

    def __init__(self, ch: int, context_dim: int, heads: int, backend: str) -> None:
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.self_out = nn.Linear(ch, ch)
        self.cross_norm = nn.LayerNorm(ch)
        self.cross_q = nn.Linear(ch, ch)
        self.cross_kv = nn.Linear(context_dim, 2 * ch)
        self.cross_out = nn.Linear(ch, ch)
        for layer in (self.self_out, self.cross_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        a = attention(self._heads(q), self._heads(k), self._heads(v), None, self.backend)
        seq = x.flatten(2).transpose(1, 2) + self.self_out(a.transpose(1, 2).reshape(b, h * w, c))
        k, v = self.cross_kv(context).chunk(2, dim=-1)
        q = self.cross_q(self.cross_norm(seq))
        a = attention(self._heads(q), self._heads(k), self._heads(v), mask, self.backend)
        seq = seq + self.cross_out(a.transpose(1, 2).reshape(b, h * w, c))
        return seq.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution's ResBlock and optional AttentionBlock, called with (x, emb, context, mask)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x, emb, context, mask):
        x = self.res(x, emb)
        return self.attn(x, context, mask) if self.attn is not None else x


class ConditionalUNet(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch0, emb_dim = cfg.base_channels, 4 * cfg.base_channels
        self.encoder = PromptEncoder(cfg.vocab_size, cfg.max_tokens, cfg.context_dim, cfg.encoder_layers,
                                     cfg.encoder_heads, cfg.attention_backend)
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.pooled_proj = nn.Linear(cfg.context_dim, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)

        def level(in_ch: int, out_ch: int, res: int) -> Level:
            attn = (AttentionBlock(out_ch, cfg.context_dim, cfg.num_heads, cfg.attention_backend)
                    if res in cfg.attention_resolutions else None)
            return Level(ResBlock(in_ch, out_ch, emb_dim, cfg.dropout), attn)

        self.down = nn.ModuleList()
        skips, ch, res = [ch0], ch0, cfg.image_size
        for i, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(level(ch, ch0 * mult, res))
                ch = ch0 * mult
                skips.append(ch)
            if i < len(cfg.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([
            Level(ResBlock(ch, ch, emb_dim, cfg.dropout),
                  AttentionBlock(ch, cfg.context_dim, cfg.num_heads, cfg.attention_backend)),
            Level(ResBlock(ch, ch, emb_dim, cfg.dropout), None),
        ])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(level(ch + skips.pop(), ch0 * mult, res))
                ch = ch0 * mult
            if i > 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt tokens [B, L] -> (context [B, L, D], mask [B, L] bool)."""
        return self.encoder(tokens)

    def _run(self, block: nn.Module, *args):
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predict eps (or v) from x_t [B, C, H, W], integer t [B] and an encoded prompt."""
        m = mask.unsqueeze(-1).to(context.dtype)
        pooled = (context * m).sum(1) / m.sum(1).clamp(min=1.0)
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels).to(x_t.dtype)) + self.pooled_proj(pooled)
        h = self.conv_in(x_t)
        hs = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else self._run(block, h, emb, context, mask)
            hs.append(h)
        for block in self.mid:
            h = self._run(block, h, emb, context, mask)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb, context, mask)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        context, mask = self.encode(tokens)
        return self.denoise(x_t, t, context, mask)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
