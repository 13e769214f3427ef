"""A small model with planted duplicates, trained in-process, for the scan's AUC comparison.

The demo's recipe (synthetic CheXpert-format set, K planted images x C copies each with a
dedicated token, K frequency-matched control tokens, classifier-free guidance with p_uncond 0.5,
the demo U-Net at 32 px, AdamW) with the plain training step (no EMA, no warm-up; bench/train_step.py);
`--quick` uses a smaller set and lr 2e-3 so that a few hundred steps are many epochs.
How strongly it memorizes after that many steps is measured (the AUCs), not assumed.
A trained run (`--checkpoint demo_output/runs/cfg`) replaces it when given.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from bench.train_step import MemdiffTrainStep
from data_pipeline.config_schema import build
from data_pipeline.dataset import PreparedData, data_config, prepare_dataset
from data_pipeline.loaders import make_loader
from engine.audit.planted_truth import describe_manifest, prompt_groups
from engine.diffusion.schedule import NoiseSchedule
from engine.model.unet import ConditionalUNet, UNetConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_unet_config(vocab_size: int = 128, image_size: int = 32) -> UNetConfig:
    """The U-Net of configs/demo_cpu.json (0.47M parameters), its embedding widened to the vocabulary."""
    with open(os.path.join(REPO, "configs", "demo_cpu.json")) as f:
        model = json.load(f)["model"]
    model["vocab_size"] = max(model["vocab_size"], vocab_size)
    model["image_size"] = image_size
    return build(UNetConfig, model, "model")


def planted_data(work_dir: str, *, images: int, planted_k: int, copies: int, image_size: int = 32,
                 seed: int = 0) -> PreparedData:
    """A synthetic set with planted duplicates under `work_dir` (generated, cached and split there)."""
    cfg = data_config({"format": "synthetic", "root": os.path.join(work_dir, "synthetic"), "image_size": image_size,
                       "synthetic_images": images, "synthetic_width": 64, "synthetic_seed": seed,
                       "cache_dir": os.path.join(work_dir, "cache"),
                       "planted": {"k": planted_k, "copies": copies, "seed": seed}})
    return prepare_dataset(cfg, os.path.join(work_dir, "run"), progress=False)


@dataclass
class PlantedModel:
    model: ConditionalUNet
    schedule: NoiseSchedule
    prompts: list[str]           # distinct training prompts
    groups: list[str]            # 'planted' / 'control' / 'ordinary' per prompt
    tokens: torch.Tensor         # [P, L]
    description: str


def train_planted_model(prepared: PreparedData, *, steps: int, batch: int = 32, lr: float = 1e-3,
                        seed: int = 0, say=lambda s: None) -> PlantedModel:
    """The demo U-Net trained `steps` steps on `prepared`'s train split with memdiff's training step."""
    train = prepared.splits["train"]
    torch.manual_seed(seed)
    model = ConditionalUNet(demo_unet_config(len(prepared.vocab))).train()
    schedule = NoiseSchedule("linear", 1000)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    step = MemdiffTrainStep(model, opt, schedule, None, None, prepared.vocab.null_tokens(batch), p_uncond=0.5,
                            seed=seed)   # batches come from the loader
    loader = make_loader(train, batch, seed=seed, backend="torch")
    start = time.perf_counter()
    for s in range(steps):
        x0, tokens, _ = next(loader)
        step(x0, tokens)
        if (s + 1) % max(1, steps // 4) == 0:
            say(f"planted model: step {s + 1}/{steps}, loss {float(step.last_loss):.4f}, "
                f"{time.perf_counter() - start:.0f} s")
    model.eval()
    prompts = list(dict.fromkeys(train.prompts))
    groups = prompt_groups(prompts, prepared.manifest)
    manifest = prepared.manifest
    desc = (f"demo U-Net trained in-process for {steps} steps of batch {batch}, lr {lr:g}, on {len(train)} training images "
            f"({describe_manifest(manifest)})")
    return PlantedModel(model, schedule, prompts, groups, prepared.vocab.encode_batch(prompts), desc)


def planted_model_from_run(run_dir: str) -> PlantedModel:
    """A trained memdiff run (its export) with its training prompts and planted ground truth."""
    from engine.audit.run_data import prompt_counts, read_manifest  # noqa: PLC0415
    from engine.model.export import load_model  # noqa: PLC0415

    loaded = load_model(run_dir)
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise ValueError(f"{run_dir}: no planted_manifest.json (the AUC comparison needs planted duplicates)")
    prompts = list(prompt_counts(run_dir))
    groups = prompt_groups(prompts, manifest)
    desc = (f"trained run {run_dir} ({loaded.unet_config.image_size} px, {len(prompts)} distinct training prompts, "
            f"{describe_manifest(manifest)})")
    return PlantedModel(loaded.model.eval(), loaded.schedule, prompts, groups, loaded.vocab.encode_batch(prompts), desc)
