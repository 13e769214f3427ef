"""Sample images written for people to look at: one PNG and one metadata JSON per image, and a grid.

What tools/sample writes: for every prompt and guidance weight, `per_prompt` images with the sample-file
seed convention of engine.diffusion.seeds (image k of prompt i: seed + i * per_prompt + k, the same at
every guidance weight, so weights can be compared image by image).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from data_pipeline.atomic_files import write_json
from data_pipeline.images import to_uint8, write_png
from engine.audit.prompt_lists import PromptList, encode_prompts
from engine.diffusion.generate import generate
from engine.diffusion.seeds import sample_file_seeds
from engine.model.export import load_model
from engine.reports.image_grid import panels_figure, save_figure


def write_samples(checkpoint: str, prompt_list: PromptList, out_dir: str, *, guidance: Sequence[float] = (7.5,),
                  steps: int = 50, sampler: str = "ddim", eta: float = 0.0, seed: int = 0, per_prompt: int = 4,
                  device: str = "cpu", progress: bool = True) -> dict:
    """Sample `per_prompt` images for every prompt and guidance weight from an exported model.

    Writes per image `p<i>_s<seed>_w<w>.png` and a metadata JSON, plus grid.png (prompts x images,
    one panel per guidance weight) and index.json. Every prompt is checked before any sampling.
    Returns the index.
    """
    loaded = load_model(checkpoint, device)
    tokens = encode_prompts(loaded.vocab, prompt_list)
    prompts = prompt_list.prompts
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index, panels = [], []
    param = loaded.diffusion_config.parameterization
    for w in guidance:
        grid = []
        for i in tqdm(range(len(prompts)), desc=f"sampling w={w:g}", unit="prompt", disable=not progress):
            seeds = sample_file_seeds(seed, i, per_prompt)
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
