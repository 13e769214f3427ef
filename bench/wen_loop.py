"""The peer of memdiff's scan: Wen et al.'s detection loop, one prompt at a time.

The layout of the reference code (detect_mem.py with its local Stable Diffusion pipeline; facts in
/work/shared/references/methods.md §1): for prompt i, seed base + i, one pipeline call that encodes
the prompt and the empty prompt, draws G initial noises, and runs a 50-step diffusers DDIM sampler
with guidance w on batches of 2G ([uncond; cond] in one network call), recording
||eps_cond - eps_uncond||_2 per generation at every step. Score = mean over generations and steps.
Here the network is a memdiff U-Net (pixel space, no VAE) and the sampler diffusers' DDIMScheduler
with memdiff's linear betas and its default settings (x0 clipped to [-1, 1], "leading" timesteps,
as a user would construct it). Needs diffusers (`pip install -e .[bench]`).
"""
from __future__ import annotations

import torch

from engine.diffusion.guidance import null_tokens_like


def ddim_scheduler(num_timesteps: int = 1000):
    from diffusers import DDIMScheduler  # noqa: PLC0415 - bench extra
    return DDIMScheduler(num_train_timesteps=num_timesteps, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


@torch.no_grad()
def wen_loop_norms(model, tokens: torch.Tensor, seeds: list[int], *, image_shape: tuple[int, int, int],
                   generations: int = 4, steps: int = 50, guidance: float = 7.5, scheduler=None) -> torch.Tensor:
    """||eps_c - eps_u||_2 per prompt, generation and step: [P, G, steps] (float32, CPU)."""
    scheduler = scheduler if scheduler is not None else ddim_scheduler()
    device = next(model.parameters()).device
    out = []
    for i in range(tokens.shape[0]):
        prompt = tokens[i:i + 1].to(device).repeat(generations, 1)
        context, mask = model.encode(torch.cat([null_tokens_like(prompt), prompt]))   # [uncond; cond]
        gen = torch.Generator().manual_seed(int(seeds[i]))
        latents = torch.randn((generations, *image_shape), generator=gen).to(device)
        scheduler.set_timesteps(steps)
        norms = []
        for t in scheduler.timesteps:
            t_in = torch.full((2 * generations,), int(t), device=device, dtype=torch.long)
            eps = model.denoise(torch.cat([latents, latents]), t_in, context, mask).float()
            eps_u, eps_c = eps.chunk(2)
            norms.append(torch.linalg.vector_norm((eps_c - eps_u).flatten(1), dim=1))
            latents = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
        out.append(torch.stack(norms, dim=1).cpu())
    return torch.stack(out)
