"""Images for a set of prompts x seeds x guidance weights, from a model, in fixed-size batches.

The initial noise of seed s is `seeded_noise([s], ...)` whatever the prompt, the run or the
device, so grids of the same (prompt, seed) from two models start from the same noise and can be
compared side by side.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from data_pipeline.atomic_files import write_json
from data_pipeline.images import to_uint8, write_png
from engine.diffusion.sampling import sample, seeded_noise
from engine.diffusion.schedule import NoiseSchedule


@torch.no_grad()
def generate(model, schedule: NoiseSchedule, tokens: torch.Tensor, seeds: Sequence[int], *, guidance: float,
             steps: int, sampler: str = "ddim", eta: float = 0.0, parameterization: str = "eps",
             batch_size: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    """tokens [P, L] and seeds [N] -> images [P, N, C, S, S] in [-1, 1] (on the CPU).

    Image (p, n) starts from the noise of seeds[n]. DDPM / eta > 0 draw their step noise from one
    generator per batch, seeded from the batch's position and first seed: the same call repeats.
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
            gen = torch.Generator(device=device).manual_seed(int(seeds[chunk[0][1]]) * 7919 + start)
        result = sample(model, tokens[[p for p, _ in chunk]].to(device), noise, schedule, steps=steps,
                        guidance=guidance, sampler=sampler, eta=eta, generator=gen,
                        parameterization=parameterization, record_norms=False)
        for (p, n), image in zip(chunk, result.images.cpu()):
            out[p, n] = image
    return out


def write_samples(checkpoint: str, prompts: Sequence[str], out_dir: str, *, guidance: Sequence[float] = (7.5,),
                  steps: int = 50, sampler: str = "ddim", eta: float = 0.0, seed: int = 0, per_prompt: int = 4,
                  device: str = "cpu", progress: bool = True) -> dict:
    """Sample `per_prompt` images for every prompt and guidance weight from an exported model.

    Image k of prompt i has seed `seed + i * per_prompt + k` (the same at every guidance weight,
    so the weights can be compared image by image). Writes per image a PNG and a metadata JSON,
    plus grid.png (prompts x images, one panel per guidance weight). Returns the index.
    """
    from pathlib import Path

    from tqdm import tqdm

    from engine.model.export import load_model
    from engine.reports.image_grid import panels_figure, save_figure

    loaded = load_model(checkpoint, device)
    for i, prompt in enumerate(prompts):
        try:
            loaded.vocab.encode(prompt)
        except ValueError as exc:
            raise ValueError(f"prompt {i + 1} ({prompt!r}): {exc}") from None
    tokens = loaded.vocab.encode_batch(list(prompts))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index, panels = [], []
    param = loaded.diffusion_config.parameterization
    for w in guidance:
        grid = []
        for i in tqdm(range(len(prompts)), desc=f"sampling w={w:g}", unit="prompt", disable=not progress):
            seeds = [seed + i * per_prompt + k for k in range(per_prompt)]
            images = generate(loaded.model, loaded.schedule, tokens[i:i + 1], seeds, guidance=w, steps=steps,
                              sampler=sampler, eta=eta, parameterization=param, device=device)[0]
            pixels = to_uint8(images)
            grid.append(pixels)
            for k, s in enumerate(seeds):
                name = f"p{i:03d}_s{s}_w{w:g}"
                write_png(out / f"{name}.png", pixels[k])
                meta = {"prompt": prompts[i], "seed": s, "guidance": w, "steps": steps, "sampler": sampler,
                        "eta": eta if sampler == "ddim" else 1.0, "checkpoint": str(loaded.path),
                        "model_step": loaded.metadata.get("step"), "image": f"{name}.png"}
                write_json(out / f"{name}.json", meta)
                index.append(meta)
        panels.append((f"w = {w:g}", np.stack(grid)))
    save_figure(panels_figure(panels, list(prompts), title=str(loaded.path)), out / "grid.png")
    write_json(out / "index.json", index)
    return {"images": index, "grid": str(out / "grid.png")}
