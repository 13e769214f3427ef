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

from data_pipeline.atomic_files import check_writable, write_json
from data_pipeline.images import to_uint8, write_png
from engine.audit.prompt_lists import PromptList, encode_prompts
from engine.diffusion.generate import generate
from engine.diffusion.seeds import sample_file_seeds
from engine.model.export import load_model
from engine.model.null_condition import null_condition, require_null_condition
from engine.reports.image_grid import panels_figure, save_figure


def write_samples(checkpoint: str, prompt_list: PromptList, out_dir: str, *, guidance: Sequence[float] = (7.5,),
                  steps: int = 50, sampler: str = "ddim", eta: float = 0.0, seed: int = 0, per_prompt: int = 4,
                  device: str = "cpu", force: bool = False, progress: bool = True) -> dict:
    """Sample `per_prompt` images for every prompt and guidance weight from an exported model.

    Writes per image `p<i>_s<seed>_w<w>.png` and a metadata JSON, plus grid.png (prompts x images,
    one panel per guidance weight) and index.json. Every prompt is checked before any sampling, the
    output folder before the model is loaded, and every image (none may be NaN: the sampler refuses
    them) before any file is written. A weight w != 1 uses the null condition: a model trained with
    p_uncond 0 is refused unless `force`, and every image's metadata records the model's null condition
    (engine.model.null_condition). Returns the index.
    """
    check_writable(out_dir)
    loaded = load_model(checkpoint, device)
    guided = [w for w in guidance if w != 1.0]
    if guided:
        record = require_null_condition(loaded, f"sampling at w = {guided[0]:g}", force)
    else:           # w = 1 is conditional sampling: no null branch, nothing to refuse
        state = null_condition(loaded)
        record = {"p_uncond": state.p_uncond, "null_condition": state.state, "forced_without_null_condition": False}
    tokens = encode_prompts(loaded.vocab, prompt_list)
    prompts = prompt_list.prompts
    files, panels = [], []
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
                meta = {"prompt": prompts[i], "seed": s, "guidance": w, "steps": steps, "sampler": sampler,
                        "eta": eta if sampler == "ddim" else 1.0, "checkpoint": str(loaded.path),
                        "model_step": loaded.metadata.get("step"), "image": f"{name}.png",
                        "null_condition": record}
                files.append((name, pixels[k], meta))
        panels.append((f"w = {w:g}", np.stack(grid)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, pixels, meta in files:
        write_png(out / f"{name}.png", pixels)
        write_json(out / f"{name}.json", meta)
    index = [meta for _, _, meta in files]
    save_figure(panels_figure(panels, list(prompts), title=str(loaded.path)), out / "grid.png")
    write_json(out / "index.json", index)
    return {"images": index, "grid": str(out / "grid.png")}
