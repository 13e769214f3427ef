"""Which noise a generation starts from: every seed convention of memdiff, named in one place.

The primitive: `seeded_noise(seeds, shape)` draws `shape` from a CPU generator seeded with each seed
(so a seed gives the same noise on CPU and GPU, whatever the batch). Three conventions sit on it, each
for a reason that the others cannot serve:

1. Scan (`prompt_seeds`, `prompt_noise`): prompt i of a scanned list uses seed base + i, and its G
   generations are ONE draw of shape [G, C, H, W] from that seed. This is Wen et al.'s reference
   (methods.md §1); it makes a prompt's result independent of the other prompts in its batch, and it
   lets validation, token significance, prompt-embedding optimisation and every before/after audit
   re-make a scan's generations from the one recorded seed per prompt. Every recorded scan (and the
   demo's AUCs) depends on it, so it never changes.
2. Grid (`engine.diffusion.generate.generate`): one seed per image column, the same seeds for every
   prompt, model and guidance weight, so panels compared side by side (training sample grids, the
   CFG vs no-CFG page) start each column from the same noise.
3. Sample files (`sample_file_seeds`): tools/sample gives image k of prompt i the seed
   seed + i * per_prompt + k, so every image it writes has a seed of its own, named in its file name
   (p<i>_s<seed>_w<w>.png), and can be re-made alone through the grid convention with that one seed.

Ancestral samplers (DDPM, DDIM eta > 0) also draw noise at every step, from one generator per batch
(`step_noise_generator`): such images depend on the batch they were made in, which is why the scan and
the audits use deterministic DDIM.
"""
from __future__ import annotations

import torch


def seeded_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Initial noise [len(seeds), *shape], one CPU generator per seed so CPU and GPU start alike."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def prompt_seeds(prompt_indices, base_seed: int) -> list[int]:
    """Scan convention: the seed of each prompt is the base seed + the prompt's index in the scanned list."""
    return [int(base_seed) + int(i) for i in prompt_indices]


def prompt_noise(seeds: list[int], generations: int, image_shape: tuple[int, ...],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Scan convention: initial noise [P * G, C, H, W], prompt-major (row p * G + g), the G generations
    of prompt p being one [G, C, H, W] draw from seeds[p]."""
    return seeded_noise(seeds, (generations, *image_shape), device).flatten(0, 1)


def sample_file_seeds(seed: int, prompt_index: int, per_prompt: int) -> list[int]:
    """Sample-file convention (tools/sample): image k of prompt i has seed `seed + i * per_prompt + k`."""
    return [seed + prompt_index * per_prompt + k for k in range(per_prompt)]


def grid_step_seed(first_seed: int, batch_start: int) -> int:
    """Seed of a grid batch's ancestral step noise: from the batch's first image seed and its position,
    so the same `generate` call repeats exactly and two batches never share step noise."""
    return int(first_seed) * 7919 + batch_start


def step_noise_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of a batch's per-step (ancestral) noise, on the device the noise is drawn on."""
    return torch.Generator(device=device).manual_seed(int(seed))
