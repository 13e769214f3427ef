"""Images for a set of prompts x seeds, from a model, in fixed-size batches (the grid convention of
engine.diffusion.seeds).

The initial noise of seed s is `seeded_noise([s], ...)` whatever the prompt, the run or the
device, so grids of the same (prompt, seed) from two models start from the same noise and can be
compared side by side. Files for people (PNGs, grids) are written by engine.reports.sample_images.
"""
from __future__ import annotations

from typing import Sequence

import torch

from engine.diffusion.sampling import sample
from engine.diffusion.schedule import NoiseSchedule
from engine.diffusion.seeds import grid_step_seed, seeded_noise, step_noise_generator


@torch.no_grad()
def generate(model, schedule: NoiseSchedule, tokens: torch.Tensor, seeds: Sequence[int], *, guidance: float,
             steps: int, sampler: str = "ddim", eta: float = 0.0, parameterization: str = "eps",
             batch_size: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    """tokens [P, L] and seeds [N] -> images [P, N, C, S, S] in [-1, 1] (on the CPU).

    Image (p, n) starts from the noise of seeds[n]. DDPM / eta > 0 draw their step noise from one
    generator per batch (engine.diffusion.seeds.grid_step_seed): the same call repeats.
    """
    cfg = model.cfg
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    pairs = [(p, n) for p in range(tokens.shape[0]) for n in range(len(seeds))]
    out = torch.empty(tokens.shape[0], len(seeds), *shape)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        noise = seeded_noise([seeds[n] for _, n in chunk], shape, device)
        gen = None
        if sampler == "ddpm" or eta > 0:
            gen = step_noise_generator(grid_step_seed(seeds[chunk[0][1]], start), device)
        result = sample(model, tokens[[p for p, _ in chunk]].to(device), noise, schedule, steps=steps,
                        guidance=guidance, sampler=sampler, eta=eta, generator=gen,
                        parameterization=parameterization, record_norms=False)
        for (p, n), image in zip(chunk, result.images.cpu()):
            out[p, n] = image
    return out
