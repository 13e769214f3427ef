"""Classifier-free guidance's one primitive: both branches from one forward, and their difference.

    eps_c, eps_u = predict_cond_uncond(...).chunk(2)      # one network call on [cond; uncond]
    raw, rms     = noise_magnitude(eps_c, eps_u)          # Wen et al.: ||eps_c - eps_u||_2 per sample

Everything that needs the two branches goes through here: the samplers (their guided step,
kernels.guided_step, fuses the same magnitude into the step and is tested against
`noise_magnitude`), the scanner, token significance, prompt-embedding optimisation and
training-time screening. The empty prompt ([NULL, PAD, ...]) is the unconditional branch.
"""
from __future__ import annotations

import math

import torch

from data_pipeline.vocab import NULL_ID, PAD_ID
from engine.diffusion.schedule import NoiseSchedule, eps_from_prediction

Context = tuple[torch.Tensor, torch.Tensor]   # (encoder output [B, L, D], mask [B, L]) from model.encode


def null_tokens_like(tokens: torch.Tensor) -> torch.Tensor:
    """The empty prompt ([NULL, PAD, ...]) with the shape and device of `tokens`."""
    null = torch.full_like(tokens, PAD_ID)
    null[:, 0] = NULL_ID
    return null


def predict_cond_uncond(model, x: torch.Tensor, t: int | torch.Tensor, cond: Context, null: Context,
                        schedule: NoiseSchedule, parameterization: str = "eps") -> torch.Tensor:
    """Epsilon predictions [2B, ...] of one batched forward on [cond; uncond] (cond first).

    `t` is one sampling step (int) or each sample's own step (int64 [B], training-time screening).
    bf16/fp16 outputs are promoted to fp32 (magnitudes are computed in fp32); fp64 stays fp64 so
    gradient checks can run in double precision. Differentiable when called under grad.
    """
    x_in = torch.cat([x, x])
    t_in = (torch.full((x_in.shape[0],), t, device=x.device, dtype=torch.long) if isinstance(t, int)
            else torch.cat([t, t]))
    pred = model.denoise(x_in, t_in, torch.cat([cond[0], null[0]]), torch.cat([cond[1], null[1]]))
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))
    if parameterization == "v":   # eps = sqrt(1-abar) x_t + sqrt(abar) v: linear, so guidance commutes
        if isinstance(t, int):
            ab = float(schedule.alphas_cumprod[t])
            return math.sqrt(1 - ab) * x_in.to(pred.dtype) + math.sqrt(ab) * pred
        return eps_from_prediction(pred, x_in.to(pred.dtype), t_in, schedule, parameterization)
    return pred


def noise_magnitude(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wen's ||eps_c - eps_u||_2 per sample over C*H*W ("raw", [B]) and per element ("rms", raw / sqrt(C*H*W))."""
    raw = torch.linalg.vector_norm((eps_cond - eps_uncond).flatten(1), dim=1)
    return raw, raw / math.sqrt(eps_cond[0].numel())


def conditional_noise_magnitude(model, x: torch.Tensor, t: int | torch.Tensor, cond: Context, null: Context,
                                schedule: NoiseSchedule, parameterization: str = "eps"
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw [B], rms [B], the [cond; uncond] eps [2B, ...]) at x, t; differentiable with respect to the contexts."""
    eps = predict_cond_uncond(model, x, t, cond, null, schedule, parameterization)
    raw, rms = noise_magnitude(*eps.chunk(2))
    return raw, rms, eps
