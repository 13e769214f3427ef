"""Samplers as functions of a model: DDIM (any eta, any number of steps) and DDPM ancestral.

Classifier-free guidance evaluates cond and uncond in ONE batched forward ([cond; uncond]), and
every step also yields Wen et al.'s conditional-noise magnitude ||eps_cond - eps_uncond|| per
sample, because the guided step computes it for free (kernels.guided_step fuses both). The
memorization scanner is therefore this sampler plus bookkeeping.

DDPM ancestral sampling over a strided timestep sequence is DDIM with eta = 1 (Song et al. 2021,
eq. 16), so both share one step.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from engine.diffusion.finite import model_source, require_finite
from engine.diffusion.guidance import null_tokens_like, predict_cond_uncond
from engine.diffusion.schedule import NoiseSchedule
from kernels.guided_step import guided_step

SAMPLERS = ("ddim", "ddpm")


@dataclass
class SampleOutput:
    images: torch.Tensor       # [B, C, H, W] in [-1, 1]
    norms_raw: torch.Tensor    # [S, B] ||eps_c - eps_u||_2 per step and sample (empty if not recorded)
    norms_rms: torch.Tensor    # [S, B] the same per element
    timesteps: torch.Tensor    # [S] the model timesteps visited, first (noisiest) first


def timestep_sequence(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """`steps` evenly spaced model timesteps from T-1 down to 0."""
    if not 1 <= steps <= schedule.num_timesteps:
        raise ValueError(f"steps: expected 1..{schedule.num_timesteps}, got {steps}")
    return torch.linspace(schedule.num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()


def step_coefficients(schedule: NoiseSchedule, t: int, t_prev: int, eta: float) -> dict[str, float]:
    """Scalars of one DDIM step from t to t_prev (t_prev = -1 means the clean image, abar = 1)."""
    abar = schedule.alphas_cumprod
    ab_t = float(abar[t])
    ab_prev = float(abar[t_prev]) if t_prev >= 0 else 1.0
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t)) * math.sqrt(max(0.0, 1 - ab_t / ab_prev))
    return dict(sqrt_ab_t=math.sqrt(ab_t), sqrt_1mab_t=math.sqrt(1 - ab_t), sqrt_ab_prev=math.sqrt(ab_prev),
                sqrt_1mab_prev_dir=math.sqrt(max(0.0, 1 - ab_prev - sigma ** 2)), sigma=sigma)


@torch.no_grad()
def sample(model, tokens: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule, *, steps: int = 50,
           guidance: float = 7.5, sampler: str = "ddim", eta: float = 0.0, generator: torch.Generator | None = None,
           parameterization: str = "eps", record_norms: bool = True, clip_x0: bool = True,
           context: tuple[torch.Tensor, torch.Tensor] | None = None, autocast_dtype: torch.dtype | None = None,
           on_step: Callable[[int, int], None] | None = None) -> SampleOutput:
    """Generate images from `noise` [B, C, H, W] for prompt `tokens` [B, L].

    `context`, if given, replaces `model.encode(tokens)` (an optimised prompt embedding, say);
    the unconditional branch always uses the null prompt. With guidance == 1 and record_norms off,
    the unconditional forward is skipped (plain conditional sampling, e.g. for non-CFG models).
    `generator` drives the ancestral noise (DDPM / eta > 0) and must be on noise's device.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if sampler == "ddpm":
        eta = 1.0
    amp = torch.autocast(noise.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    timesteps = timestep_sequence(schedule, steps)
    batch = noise.shape[0]
    x = noise.float()
    with amp:
        context, mask = context if context is not None else model.encode(tokens)
        null_context, null_mask = model.encode(null_tokens_like(tokens))
    two_branches = record_norms or guidance != 1.0
    norms_raw, norms_rms = [], []
    for i, t in enumerate(timesteps.tolist()):
        t_prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
        coefs = step_coefficients(schedule, t, t_prev, eta)
        z = (torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
             if coefs["sigma"] > 0 else None)
        with amp:
            if two_branches:
                pred = predict_cond_uncond(model, x, t, (context, mask), (null_context, null_mask), schedule,
                                           parameterization)
            else:
                t_in = torch.full((batch,), t, device=x.device, dtype=torch.long)
                eps = model.denoise(x, t_in, context, mask).float()
                if parameterization == "v":
                    eps = coefs["sqrt_1mab_t"] * x + coefs["sqrt_ab_t"] * eps
                pred = torch.cat([eps, eps])  # w = 1 with identical branches is the conditional step
        x, n_raw, n_rms = guided_step(pred, x, z, guidance=guidance, clip_x0=clip_x0, **coefs)
        if two_branches:
            norms_raw.append(n_raw.float())
            norms_rms.append(n_rms.float())
        if on_step is not None:
            on_step(i, t)
    # One check per call (a device sync), not per step: NaN propagates to the end of the trajectory.
    require_finite(x, f"{model_source(model)}: the images sampled at w = {guidance:g} ({steps} steps)")
    if norms_raw:
        require_finite(torch.stack(norms_rms), f"{model_source(model)}: the conditional-noise magnitudes "
                                                f"sampled at w = {guidance:g}")
    empty = torch.empty(0, batch)
    return SampleOutput(
        images=x.clamp(-1, 1),
        norms_raw=torch.stack(norms_raw).cpu() if norms_raw else empty,
        norms_rms=torch.stack(norms_rms).cpu() if norms_rms else empty,
        timesteps=timesteps,
    )
