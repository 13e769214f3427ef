"""Wen's score at the first sampling step only, computed with ONE network call (methods.md sections 1, 6).

For each prompt's G pure-noise inputs x_T (the scan's seeds), one batched [cond; uncond] forward at the
noisiest timestep t = T - 1 gives ||eps(x_T, y) - eps(x_T, null)|| / sqrt(C*H*W); the score is its mean
over the G generations. Every sampling trajectory of the scan starts with exactly this evaluation, so the
score equals the first column of a full scan's record (a test checks it), at 1/S of the cost and without
sampling anything.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.audit.detectors.base import (
    Detector,
    PromptBatch,
    autocast_for,
    encode_per_generation,
    initial_noise,
    model_device,
    per_prompt_mean,
)
from engine.audit.wen_detector import DetectorSettings
from engine.diffusion.guidance import conditional_noise_magnitude


class FirstStepWen(Detector):
    name = "first_step_wen"
    summary = "Wen et al.: ||eps_c - eps_u|| (rms) at the first step t = T-1 on the scan's pure noise, one forward"
    needs_null_condition = True

    def forwards_per_prompt(self, settings: DetectorSettings) -> int:
        return 2 * settings.generations

    @torch.no_grad()
    def score(self, loaded, batch: PromptBatch, settings: DetectorSettings, *, train=None,
              params: dict | None = None) -> np.ndarray:
        self.check_settings(settings)
        model, g = loaded.model, settings.generations
        device = model_device(model)
        x = initial_noise(loaded, batch.seeds, g)
        with autocast_for(settings, device):
            cond, null = encode_per_generation(model, batch.tokens.to(device), g)
            _, rms, _ = conditional_noise_magnitude(model, x, loaded.schedule.num_timesteps - 1, cond, null,
                                                    loaded.schedule, loaded.diffusion_config.parameterization)
        return per_prompt_mean(rms, len(batch.seeds))
