"""The generations that generation-based detectors score, made once and shared.

Images come from the scan's sampler and seed convention (engine.audit.wen_detector.detect: prompt p's G
generations start from one draw of seeds[p]), so the images a detector scores are the images a scan with
the same settings makes. When the null condition may be used, the guided run also records Wen's per-step
magnitudes (free: the guided step computes them), which is the full-trajectory Wen score. Without it
(a model trained with p_uncond = 0), generation is conditional only (w = 1, one forward per step).
"""
from __future__ import annotations

import torch

from engine.audit.detectors.base import Detector, PromptBatch, image_shape, initial_noise, model_device
from engine.audit.wen_detector import DetectorSettings, detect
from engine.diffusion.sampling import sample


def generation_forwards(settings: DetectorSettings) -> int:
    """Forwards of one prompt's G sampled generations: S steps each, two branches when guided (w != 1)."""
    return settings.generations * settings.steps * (2 if settings.guidance != 1.0 else 1)


def require_generations(detector: Detector, batch: PromptBatch) -> torch.Tensor:
    """The batch's generations [P, G, C, H, W] as float32 on the CPU, or a one-line error."""
    if batch.generations is None:
        raise ValueError(f"detector {detector.name}: needs the prompts' generations (PromptBatch.generations)")
    if batch.generations.shape[1] < detector.min_generations:
        raise ValueError(f"detector {detector.name}: needs at least {detector.min_generations} generations per "
                         f"prompt, got {batch.generations.shape[1]}")
    return batch.generations.float().cpu()


@torch.no_grad()
def make_generations(loaded, tokens: torch.Tensor, seeds: list[int], settings: DetectorSettings, *,
                     record_norms: bool) -> PromptBatch:
    """A PromptBatch with the generations [P, G, C, H, W] of `tokens` and, with `record_norms` (two branches
    at every step, null condition needed), Wen's per-step rms magnitudes [P, G, S]."""
    shape = image_shape(loaded)
    param = loaded.diffusion_config.parameterization
    if record_norms:
        det = detect(loaded.model, loaded.schedule, tokens, seeds, settings, image_shape=shape,
                     parameterization=param, keep_images=True)
        return PromptBatch(tokens, list(seeds), det.images, det.norms_rms)
    if settings.guidance != 1.0:
        raise ValueError(f"generations: guidance w = {settings.guidance:g} uses the null condition; "
                         f"generate with w = 1 or record the norms")
    if settings.sampler != "ddim":
        raise ValueError("generations: conditional generation for detectors uses DDIM (deterministic per seed)")
    device = model_device(loaded.model)
    g = settings.generations
    out = sample(loaded.model, tokens.to(device).repeat_interleave(g, dim=0), initial_noise(loaded, seeds, g),
                 loaded.schedule, steps=settings.steps, guidance=1.0, sampler="ddim", parameterization=param,
                 record_norms=False, clip_x0=settings.clip_x0,
                 autocast_dtype=torch.bfloat16 if settings.bf16 and device.type == "cuda" else None)
    return PromptBatch(tokens, list(seeds), out.images.float().cpu().reshape(len(seeds), g, *shape), None)
