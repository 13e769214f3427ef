"""The anisotropy metric (Asthana & Belagiannis, ICLR 2026; methods.md section 6): two terms, no denoising.

Both terms are evaluated on the scan's pure-noise inputs x (no sampling step is taken):
- norm term, at high noise (t = T - 1): ||eps(x, y) - eps(x, null)|| / sqrt(C*H*W), Wen's first-step
  magnitude of the guidance vector;
- alignment term, at low noise (the same x presented at a small t): the cosine between the unconditional
  prediction eps(x, null) and the guidance vector eps(x, y) - eps(x, null). Memorized prompts pull the
  guidance vector into line with the unconditional score where the log-density is anisotropic.
Each term is averaged over the prompt's G generations. The score is z_norm + weight * z_alignment, both
standardised by calibration statistics, with `weight` fitted on a calibration set (the paper fits it per
model on about 20 memorized prompts); the caller must not evaluate on that set.

Choices, where the reference differs:
- The low-noise t is the third-lowest timestep of a 50-step schedule (the reference's choice: t = 41 of
  1000); `low_noise_timestep` gives it for any schedule.
- The reference takes the cosine over the 4 latent channels at each pixel and averages over pixels. Our
  models are 1-channel, where that cosine degenerates to the sign of a product, so the cosine here is over
  all C*H*W elements of a generation.
- Both timesteps go through ONE network call: [x at T-1; x at t_low], doubled for [cond; uncond].
"""
from __future__ import annotations

import numpy as np
import torch

from engine.audit.detectors.base import (
    FittedDetector,
    PromptBatch,
    autocast_for,
    encode_per_generation,
    initial_noise,
    model_device,
)
from engine.audit.roc import roc_metrics
from engine.audit.wen_detector import DetectorSettings
from engine.diffusion.guidance import noise_magnitude, predict_cond_uncond
from engine.diffusion.sampling import timestep_sequence
from engine.diffusion.schedule import NoiseSchedule

REFERENCE_STEPS = 50       # the reference's DDIM schedule length, from which its low-noise t is taken
WEIGHT_GRID = np.round(np.linspace(-4.0, 4.0, 161), 3)


def low_noise_timestep(schedule: NoiseSchedule) -> int:
    """The third-lowest timestep of a 50-step schedule (t = 41 for T = 1000)."""
    steps = min(REFERENCE_STEPS, schedule.num_timesteps)
    return int(timestep_sequence(schedule, steps)[-3 if steps >= 3 else -1])


def anisotropy_terms(model, x: torch.Tensor, cond, null, schedule: NoiseSchedule, parameterization: str,
                     low_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm [B] at t = T-1, alignment [B] at low_t) for inputs x [B, C, H, W] and encoded prompts."""
    b = x.shape[0]
    t = torch.cat([torch.full((b,), schedule.num_timesteps - 1), torch.full((b,), low_t)]).to(x.device)
    both = lambda ctx: (torch.cat([ctx[0], ctx[0]]), torch.cat([ctx[1], ctx[1]]))  # noqa: E731
    eps_c, eps_u = predict_cond_uncond(model, torch.cat([x, x]), t, both(cond), both(null), schedule,
                                       parameterization).chunk(2)
    _, norm = noise_magnitude(eps_c[:b], eps_u[:b])
    guidance = (eps_c[b:] - eps_u[b:]).flatten(1).double()
    uncond = eps_u[b:].flatten(1).double()
    alignment = torch.nn.functional.cosine_similarity(uncond, guidance, dim=1, eps=1e-12)
    return norm.double(), alignment


class Anisotropy(FittedDetector):
    name = "anisotropy"
    summary = ("Asthana & Belagiannis: guidance-vector norm at t = T-1 + fitted weight x cosine(eps_u, eps_c - eps_u) "
               "at low t, both on pure noise")
    needs_null_condition = True

    def forwards_per_prompt(self, settings: DetectorSettings) -> int:
        return 4 * settings.generations

    @torch.no_grad()
    def features(self, loaded, batch: PromptBatch, settings: DetectorSettings) -> np.ndarray:
        self.check_settings(settings)
        model, g, p = loaded.model, settings.generations, len(batch.seeds)
        device = model_device(model)
        x = initial_noise(loaded, batch.seeds, g)
        with autocast_for(settings, device):
            cond, null = encode_per_generation(model, batch.tokens.to(device), g)
            norm, alignment = anisotropy_terms(model, x, cond, null, loaded.schedule,
                                               loaded.diffusion_config.parameterization,
                                               low_noise_timestep(loaded.schedule))
        return torch.stack([norm.reshape(p, g).mean(1), alignment.reshape(p, g).mean(1)], 1).cpu().numpy()

    def fit(self, features: np.ndarray, labels: np.ndarray) -> dict:
        """Standardise both terms on the calibration set, then pick the weight of the alignment term that
        maximises the calibration AUC (grid over [-4, 4]; ties go to the smallest |weight|, so a term that
        adds nothing gets weight 0)."""
        f, y = np.asarray(features, np.float64), np.asarray(labels, bool)
        if y.all() or not y.any():
            raise ValueError(f"anisotropy fit: need memorized and non-memorized calibration prompts, got "
                             f"{int(y.sum())} and {int((~y).sum())}")
        mean, std = f.mean(0), f.std(0)
        std[std == 0] = 1.0
        z = (f - mean) / std
        aucs = np.array([roc_metrics(z[y] @ [1.0, w], z[~y] @ [1.0, w]).auc for w in WEIGHT_GRID])
        best = np.flatnonzero(aucs == aucs.max())
        weight = float(WEIGHT_GRID[best[np.argmin(np.abs(WEIGHT_GRID[best]))]])
        return {"weight": weight, "mean": mean.tolist(), "std": std.tolist(), "calibration_auc": float(aucs.max()),
                "n_positive": int(y.sum()), "n_negative": int((~y).sum()),
                "terms": ["norm_rms_at_T-1", "cosine(eps_u, eps_c - eps_u)_at_low_t"]}

    def combine(self, features: np.ndarray, params: dict) -> np.ndarray:
        z = (np.asarray(features, np.float64) - np.asarray(params["mean"])) / np.asarray(params["std"])
        return z[:, 0] + params["weight"] * z[:, 1]
