"""Diffusion math, separate from the network: noise schedules, forward noising, targets, losses.

Conventions follow Ho et al. (DDPM): x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps with t in
[0, T). The schedule is held in float64 and indexed per sample, so per-sample t works everywhere.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

import torch

from data_pipeline.config_schema import ConfigSection, constrained

Parameterization = Literal["eps", "v"]
Schedule = Literal["linear", "cosine"]
PARAMETERIZATIONS = typing.get_args(Parameterization)
SCHEDULES = typing.get_args(Schedule)


@dataclass(frozen=True)
class DiffusionConfig(ConfigSection):
    """The `diffusion` section of a training config (and of an exported model)."""
    SECTION = "diffusion"
    schedule: Schedule = "linear"
    num_timesteps: int = constrained(1000, "int in [2, 100000]", lambda v: 2 <= v <= 100_000)
    parameterization: Parameterization = "eps"
    min_snr_gamma: float | None = constrained(None, "float > 0 or null", lambda v: v > 0)


def _cosine_betas(num_timesteps: int, s: float = 0.008) -> torch.Tensor:
    # Nichol & Dhariwal: abar(t) = cos^2(((t/T)+s)/(1+s) * pi/2), betas clipped at 0.999.
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - abar[1:] / abar[:-1]
    return betas.clamp(max=0.999)


class NoiseSchedule:
    """Betas and cumulative alphas of a discrete-time diffusion process."""

    def __init__(self, kind: str = "linear", num_timesteps: int = 1000) -> None:
        if kind == "linear":
            # DDPM's range, rescaled so that other T keep the same total noise.
            # Clamped like the cosine schedule: below T = 50 the rescaled end would reach beta >= 1.
            scale = 1000 / num_timesteps
            betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64).clamp(max=0.999)
        elif kind == "cosine":
            betas = _cosine_betas(num_timesteps)
        else:
            raise ValueError(f"diffusion.schedule: expected one of {SCHEDULES}, got {kind!r}")
        self.kind = kind
        self.num_timesteps = num_timesteps
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # abar per device, copied once: the training step indexes it every step, and a fresh
        # host-to-device copy each time would be a blocking transfer on the hot path.
        self._abar_on: dict[torch.device, torch.Tensor] = {}

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        if t.device not in self._abar_on:
            self._abar_on[t.device] = self.alphas_cumprod.to(t.device)
        return self._abar_on[t.device][t]

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "NoiseSchedule":
        return cls(cfg.schedule, cfg.num_timesteps)

    def sqrt_ab(self, t: torch.Tensor) -> torch.Tensor:
        """sqrt(abar_t) per sample, float32 on t's device."""
        return self._abar(t).sqrt().float()

    def sqrt_1mab(self, t: torch.Tensor) -> torch.Tensor:
        """sqrt(1 - abar_t) per sample, float32 on t's device."""
        return (1.0 - self._abar(t)).sqrt().float()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self._abar(t)
        return (abar / (1.0 - abar)).float()


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Forward noising x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t per sample."""
    return _per_sample(schedule.sqrt_ab(t), x0) * x0 + _per_sample(schedule.sqrt_1mab(t), x0) * noise


def target_for(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
               parameterization: str) -> torch.Tensor:
    """What the network is trained to predict: eps, or v = sqrt(abar) eps - sqrt(1-abar) x0."""
    if parameterization == "eps":
        return noise
    if parameterization == "v":
        return _per_sample(schedule.sqrt_ab(t), x0) * noise - _per_sample(schedule.sqrt_1mab(t), x0) * x0
    raise ValueError(f"diffusion.parameterization: expected one of {PARAMETERIZATIONS}, got {parameterization!r}")


def eps_from_prediction(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
                        parameterization: str) -> torch.Tensor:
    if parameterization == "eps":
        return pred
    # v-prediction: eps = sqrt(1-abar) x_t + sqrt(abar) v
    return _per_sample(schedule.sqrt_1mab(t), x_t) * x_t + _per_sample(schedule.sqrt_ab(t), x_t) * pred


def loss_weights(t: torch.Tensor, schedule: NoiseSchedule, parameterization: str,
                 min_snr_gamma: float | None) -> torch.Tensor | None:
    """Min-SNR-gamma weights (Hang et al. 2023) expressed for the chosen prediction target.

    For eps-prediction the weight is min(SNR, gamma) / SNR; for v-prediction min(SNR, gamma) / (SNR + 1).
    None means uniform weights.
    """
    if min_snr_gamma is None:
        return None
    snr = schedule.snr(t)
    clipped = torch.clamp(snr, max=min_snr_gamma)
    return clipped / snr if parameterization == "eps" else clipped / (snr + 1.0)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (over C, H, W), optionally weighted per sample."""
    loss = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return loss if weights is None else loss * weights
