"""The peer of memdiff's training step: diffusers' text-to-image training step (the loop body of
diffusers' examples/text_to_image/train_text_to_image.py, pixel space, no VAE) on a
`UNet2DConditionModel` shaped like a memdiff U-Net config, with a prompt encoder shaped like
memdiff's (token + position embedding, pre-norm transformer layers, final LayerNorm).

What a user would write with diffusers: noise from torch.randn_like, t from torch.randint,
`DDPMScheduler.add_noise`, the condition dropped to the null prompt with probability p_uncond,
`F.mse_loss` against the noise, AdamW. Bench-only: needs `pip install -e .[bench]`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.vocab import PAD_ID
from engine.model.unet import UNetConfig


class TokenEncoder(nn.Module):
    """Token ids [B, L] -> hidden states [B, L, D]: the prompt encoder a diffusers user would build
    from torch's own transformer layer to match memdiff's PromptEncoder in size and depth."""

    def __init__(self, vocab_size: int, max_tokens: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_tokens, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)[None]
        return self.norm(self.layers(x, src_key_padding_mask=tokens == PAD_ID))


def diffusers_unet_like(cfg: UNetConfig, norm_groups: int | None = None):
    """A UNet2DConditionModel with memdiff's channel widths, blocks per level, attention resolutions,
    heads, context width and dropout. Cross-attention blocks sit at the resolutions where memdiff has its
    attention blocks; the mid block has attention as in memdiff."""
    from diffusers import UNet2DConditionModel  # noqa: PLC0415 - bench extra

    widths = tuple(cfg.base_channels * m for m in cfg.channel_mult)
    resolutions = [cfg.image_size // 2 ** i for i in range(len(widths))]
    down = tuple("CrossAttnDownBlock2D" if r in cfg.attention_resolutions else "DownBlock2D" for r in resolutions)
    up = tuple("CrossAttnUpBlock2D" if r in cfg.attention_resolutions else "UpBlock2D" for r in reversed(resolutions))
    if norm_groups is None:   # one group count for every width (diffusers has one norm_num_groups)
        norm_groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 and w // g >= 2 for w in widths))
    # diffusers reads attention_head_dim as the number of heads when num_attention_heads is not given
    return UNet2DConditionModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=widths, layers_per_block=cfg.num_res_blocks, down_block_types=down, up_block_types=up,
        cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.num_heads, norm_num_groups=norm_groups,
        dropout=cfg.dropout)


def diffusers_scheduler(num_timesteps: int = 1000):
    """DDPMScheduler with memdiff's linear schedule (DDPM's 1e-4 .. 0.02)."""
    from diffusers import DDPMScheduler  # noqa: PLC0415
    return DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


class DiffusersPair(nn.Module):
    """UNet2DConditionModel + TokenEncoder, called like memdiff's model: (x_t, t, tokens) -> eps."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.unet = diffusers_unet_like(cfg)
        self.encoder = TokenEncoder(cfg.vocab_size, cfg.max_tokens, cfg.context_dim, cfg.encoder_layers,
                                    cfg.encoder_heads)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        keep = (tokens != PAD_ID).to(x_t.dtype)   # masked cross-attention keys, as memdiff's
        return self.unet(x_t, t, encoder_hidden_states=self.encoder(tokens), encoder_attention_mask=keep).sample


class DiffusersTrainStep:
    """One call = one optimizer step of the diffusers example loop on a fixed batch."""

    def __init__(self, model: DiffusersPair, optimizer: torch.optim.Optimizer, x0: torch.Tensor,
                 tokens: torch.Tensor, null_tokens: torch.Tensor, *, p_uncond: float = 0.5,
                 num_timesteps: int = 1000, compute_dtype: torch.dtype = torch.float32) -> None:
        self.model, self.optimizer = model, optimizer
        self.scheduler = diffusers_scheduler(num_timesteps)
        self.x0, self.tokens, self.null, self.p_uncond = x0, tokens, null_tokens, p_uncond
        self.compute_dtype = compute_dtype   # bfloat16: the network under torch.autocast (accelerate's bf16)
        self.last_loss: torch.Tensor | None = None

    def __call__(self) -> None:
        x0 = self.x0
        b, dev = x0.shape[0], x0.device
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), device=dev)
        drop = torch.rand(b, device=dev) < self.p_uncond
        tokens = torch.where(drop[:, None], self.null[:b], self.tokens)
        noisy = self.scheduler.add_noise(x0, noise, t)
        with torch.autocast(dev.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            pred = self.model(noisy, t, tokens)
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.detach()
