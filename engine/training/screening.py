"""Training-time screening (Wen et al. 2024, the training-time mitigation): drop samples whose
conditional-noise magnitude L = ||eps_cond - eps_uncond||_2 at their own t exceeds tau.

A sample the model has started to memorise has a prompt that pulls the prediction far from the
unconditional one; removing it from the loss stops the memorisation from deepening. L is computed
under no_grad from the same x_t and t the loss uses. If the trainer already has the conditional
prediction (detached) it passes it, and only the unconditional half is evaluated; otherwise one
batched [cond; uncond] forward gives both. `units` picks raw L (sum over C*H*W) or RMS
(L / sqrt(C*H*W)), which transfers across resolutions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from data_pipeline.config_schema import ConfigSection, FieldError, constrained
from engine.diffusion.guidance import conditional_noise_magnitude, noise_magnitude, null_tokens_like
from engine.diffusion.schedule import NoiseSchedule, eps_from_prediction, q_sample


@dataclass(frozen=True)
class ScreeningConfig(ConfigSection):
    """The `screening` section of a training config."""
    SECTION = "screening"
    enabled: bool = False
    tau: float = constrained(0.0, "finite float >= 0", lambda v: math.isfinite(v) and v >= 0)
    units: Literal["raw", "rms"] = "rms"

    def check(self) -> None:
        if self.enabled and self.tau == 0:
            raise FieldError("tau", "expected a finite float > 0 with screening enabled, got 0")


@dataclass
class ScreenResult:
    keep: torch.Tensor        # [B] bool: samples that stay in the loss
    magnitude: torch.Tensor   # [B] L in the configured units


@torch.no_grad()
def screening_magnitude(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
                        schedule: NoiseSchedule, parameterization: str = "eps",
                        pred_cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (raw [B], rms [B]) ||eps_cond - eps_uncond||_2 at each sample's own t
    (engine.diffusion.guidance's magnitude).

    `pred_cond`: the model's conditional output for (x_t, t, tokens) if already computed (it is
    detached here); then only the unconditional forward runs.
    """
    null = model.encode(null_tokens_like(tokens))
    if pred_cond is None:
        raw, rms, _ = conditional_noise_magnitude(model, x_t, t, model.encode(tokens), null, schedule,
                                                  parameterization)
        return raw, rms
    eps_c = eps_from_prediction(pred_cond.detach().float(), x_t.float(), t, schedule, parameterization)
    eps_u = eps_from_prediction(model.denoise(x_t, t, *null).float(), x_t.float(), t, schedule, parameterization)
    return noise_magnitude(eps_c, eps_u)


def screen(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, cfg: ScreeningConfig,
           schedule: NoiseSchedule, parameterization: str = "eps",
           pred_cond: torch.Tensor | None = None) -> ScreenResult:
    """keep = L <= tau. The trainer multiplies the per-sample loss by `keep` (or indexes the batch)
    and skips the optimizer step when keep is all False."""
    raw, rms = screening_magnitude(model, x_t, t, tokens, schedule, parameterization, pred_cond)
    mag = raw if cfg.units == "raw" else rms
    return ScreenResult(keep=mag <= cfg.tau, magnitude=mag)


def screened_mean(per_sample_loss: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean loss over the kept samples (0 with a graph when none is kept, so every rank can still backward)."""
    keep = keep.to(per_sample_loss.dtype)
    return (per_sample_loss * keep).sum() / keep.sum().clamp(min=1.0)


class ScreeningMonitor:
    """The trainer's screening state: decides per micro-batch, counts what was dropped over all ranks."""

    def __init__(self, cfg: ScreeningConfig, schedule: NoiseSchedule, parameterization: str) -> None:
        self.cfg, self.schedule, self.parameterization = cfg, schedule, parameterization
        self.dropped = self.seen = self.skipped_steps = 0

    def keep(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
             pred_cond: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """(keep mask of this rank's samples, whether any sample is kept on any rank)."""
        import torch.distributed as dist  # noqa: PLC0415

        res = screen(model, x_t, t, tokens, self.cfg, self.schedule, self.parameterization, pred_cond)
        counts = torch.stack([res.keep.sum(), torch.tensor(res.keep.numel(), device=res.keep.device)]).float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)  # every rank must agree on skipping the step
        kept, total = (int(v) for v in counts.tolist())   # the one host sync: the skip decision needs it
        self.dropped += total - kept
        self.seen += total
        return res.keep, kept > 0

    def log_fields(self) -> dict[str, float]:
        """Fraction dropped since the last call (all ranks), and the steps skipped so far."""
        out = {"screening/dropped_fraction": self.dropped / max(self.seen, 1),
               "screening/skipped_steps": float(self.skipped_steps)}
        self.dropped = self.seen = 0
        return out


@torch.no_grad()
def magnitude_profile(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, tokens: torch.Tensor, *,
                      draws: int = 4, seed: int = 0, batch_size: int = 256,
                      parameterization: str = "eps") -> tuple[torch.Tensor, torch.Tensor]:
    """What screening would see: L (rms) of every training example at `draws` seeded random t.

    x0: [N, C, S, S] in [-1, 1]; tokens: [N, L]. Returns (t [N, draws], L_rms [N, draws]) so a tau can
    be read off as a quantile, and the share it would drop checked per t and per example group.
    """
    gen = torch.Generator().manual_seed(seed)
    n = x0.shape[0]
    ts = torch.randint(0, schedule.num_timesteps, (n, draws), generator=gen)
    noise = torch.randn((draws, *x0.shape), generator=gen)
    device = next(model.parameters()).device
    out = torch.empty(n, draws)
    for d in range(draws):
        for i in range(0, n, batch_size):
            t = ts[i:i + batch_size, d].to(device)
            x = x0[i:i + batch_size].to(device)
            x_t = q_sample(x, t, noise[d, i:i + batch_size].to(device), schedule)
            _, rms = screening_magnitude(model, x_t, t, tokens[i:i + batch_size].to(device), schedule,
                                                 parameterization)
            out[i:i + batch_size, d] = rms.float().cpu()
    return ts, out
