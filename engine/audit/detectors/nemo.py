"""NeMo's cross-seed consistency of first-step predictions (Hintersdorf et al., NeurIPS 2024; methods.md 6).

No null branch: only conditional predictions, so it applies to models trained without classifier-free
guidance. For each of the prompt's G pure-noise inputs x (the scan's seeds), the conditional prediction
at an early timestep gives delta = eps(x, y) - x. With abar_t small, delta is about -sqrt(abar_t) times
the model's estimate of the clean image: a memorized prompt estimates the same image from every seed,
so its deltas agree; other prompts' estimates follow the seed. Each delta is min-max scaled to [0, 1]
per image and channel, and the score is the mean SSIM over the G (G - 1) / 2 pairs of generations.

Choices, where the reference differs:
- The timestep is the second of a 50-step schedule (the reference computes delta at its second step,
  on the initial noise, without a denoising step in between): `nemo_timestep`.
- The reference uses multi-scale SSIM with an 11-px window on 64 x 64 latents; our images are 32 px,
  too small for 5 scales, so this is single-scale SSIM with the project's 7x7 window
  (engine.audit.similarity), averaged over channels.
- The reference sums a guided prediction with the cond/uncond halves swapped; here there is no guidance
  at all (the conditional prediction alone), which is what a model without a null condition allows.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from engine.audit.detectors.base import (
    Detector,
    PromptBatch,
    autocast_for,
    encode_per_generation,
    initial_noise,
    model_device,
)
from engine.audit.similarity import ssim_paired
from engine.audit.wen_detector import DetectorSettings
from engine.diffusion.sampling import timestep_sequence
from engine.diffusion.schedule import NoiseSchedule, eps_from_prediction

REFERENCE_STEPS = 50


def nemo_timestep(schedule: NoiseSchedule) -> int:
    """The second timestep of a 50-step schedule (t = 979 for T = 1000)."""
    steps = min(REFERENCE_STEPS, schedule.num_timesteps)
    return int(timestep_sequence(schedule, steps)[1])


def min_max_scaled(x: torch.Tensor) -> torch.Tensor:
    """Each [H, W] plane of [..., H, W] scaled to [0, 1] (a constant plane becomes 0)."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - lo
    return (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny)


def mean_pairwise_ssim(images01: torch.Tensor) -> torch.Tensor:
    """Mean SSIM over the pairs of generations, per prompt: [P, G, C, H, W] in [0, 1] -> [P] float64."""
    p, g = images01.shape[:2]
    pairs = list(itertools.combinations(range(g), 2))
    i, j = (torch.tensor(side) for side in zip(*pairs))
    a = images01[:, i].flatten(0, 2) * 2 - 1          # [P * pairs * C, H, W] in [-1, 1]
    b = images01[:, j].flatten(0, 2) * 2 - 1
    return ssim_paired(a, b).double().reshape(p, -1).mean(1)


class NemoConsistency(Detector):
    name = "nemo_consistency"
    summary = "NeMo (Hintersdorf et al.): mean pairwise SSIM across seeds of eps(x, y) - x at an early step, cond only"
    needs_null_condition = False
    min_generations = 2

    def forwards_per_prompt(self, settings: DetectorSettings) -> int:
        return settings.generations

    @torch.no_grad()
    def score(self, loaded, batch: PromptBatch, settings: DetectorSettings, *, train=None,
              params: dict | None = None) -> np.ndarray:
        self.check_settings(settings)
        model, g, p = loaded.model, settings.generations, len(batch.seeds)
        device = model_device(model)
        x = initial_noise(loaded, batch.seeds, g)
        t = torch.full((x.shape[0],), nemo_timestep(loaded.schedule), device=device, dtype=torch.long)
        with autocast_for(settings, device):
            cond, _ = encode_per_generation(model, batch.tokens.to(device), g, with_null=False)
            pred = model.denoise(x, t, *cond).float()
        eps = eps_from_prediction(pred, x, t, loaded.schedule, loaded.diffusion_config.parameterization)
        delta = min_max_scaled((eps - x).double()).reshape(p, g, *x.shape[1:])
        return mean_pairwise_ssim(delta.cpu()).numpy()
