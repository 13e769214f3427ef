"""Inference-time mitigations run end to end and audited like the baseline.

- `guidance_sweep`: the same prompts and seeds scanned at several guidance weights w; each w gets the
  full audit of engine.audit.generation_audit (score, detection, copy rate, Fréchet distance).
- `optimized_generations`: Wen's prompt-embedding optimisation (engine.mitigation.prompt_optimization) per batch of
  prompts, then all steps sampled with the optimised embedding; the per-step norms along that
  trajectory are recorded exactly as the scanner records them, so the audit reads them the same way.
- `run_real_images` / `run_prompts`: a training run's real images and prompts, from its splits.json.
"""
from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from data_pipeline.images import to_uint8
from engine.audit.generation_audit import Generations, RealImages, audit_series, scan_generations
from engine.audit.run_data import load_split_cache, read_splits, split_prompts
from engine.audit.scan import PromptList, encode_prompts, prompt_groups, training_prompt_list
from engine.audit.wen_detector import DetectorSettings, prompt_seeds
from engine.diffusion.sampling import sample, seeded_noise
from engine.mitigation.prompt_optimization import optimize_prompt_embedding
from engine.reports.figures import figure_img, pyplot


def run_real_images(run_dir: str, heldout_split: str = "val", progress: bool = True) -> RealImages:
    """Training images (planted copies included) and held-out images of a run, through the run's cache."""
    data = read_splits(run_dir)
    splits = data["splits"]
    if heldout_split not in splits or heldout_split == "train":
        raise ValueError(f"{data['path']}: no held-out split {heldout_split!r} (have {sorted(splits)})")
    train_paths = [r["image_path"] for r in splits["train"]]
    train = load_split_cache(data, train_paths, progress)
    held = load_split_cache(data, [r["image_path"] for r in splits[heldout_split]], progress)
    held_prompts = [r["prompt"] for r, ok in zip(splits[heldout_split], held.ok) if ok]
    return RealImages(train.images[train.ok], [p for p, ok in zip(train_paths, train.ok) if ok], held.images[held.ok],
                      held_prompts)


def run_prompts(run_dir: str, split: str = "train") -> PromptList:
    """The distinct prompts of a run's split, with how many training images carry each."""
    return training_prompt_list(split_prompts(run_dir, split), f"{read_splits(run_dir)['path']}:{split}")


# ---- guidance sweep ------------------------------------------------------------------------------

def guidance_sweep(loaded, prompt_list: PromptList, settings: DetectorSettings, weights: list[float], out_dir: str,
                   real: RealImages, *, manifest: dict | None = None, threshold: float | None = None,
                   target_fpr: float = 0.01, batch_prompts: int = 16, progress: bool = True,
                   **audit_models) -> tuple[list[dict], list[Generations]]:
    """One audit per guidance weight (same prompts, same seeds). Each w scans into out_dir/w<w>/ (resumable).
    `audit_models`: copy_detector / clip / label_classifier, passed to every audit."""
    if not weights:
        raise ValueError("guidance sweep: no weights")
    gens = []
    for w in weights:
        s = DetectorSettings(**{**settings.to_dict(), "guidance": float(w)})
        gens.append(scan_generations(loaded, prompt_list, s, os.path.join(out_dir, f"w{w:g}"), manifest=manifest,
                                     batch_prompts=batch_prompts, progress=progress, description=f"scan w={w:g}"))
    # One threshold for every w (calibrated on the first weight if none is given).
    audits = audit_series(gens, real, manifest=manifest, threshold=threshold, target_fpr=target_fpr, train_cache={},
                          **audit_models)
    for audit, w in zip(audits, weights):
        audit["guidance"] = float(w)
    return audits, gens


def guidance_plot_html(audits: list[dict]) -> str:
    """Memorization score, copy rate and Fréchet distance against w (three panels)."""
    plt = pyplot()
    w = [a["guidance"] for a in audits]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    for key, label in (("planted_score_mean", "planted"), ("control_score_mean", "control"),
                       ("ordinary_score_mean", "ordinary"), ("score_mean", "all")):
        ys = [a["detection"].get(key) for a in audits]
        if all(y is not None for y in ys):
            ax[0].plot(w, ys, "o-", label=label)
    ax[0].set(xlabel="guidance w", ylabel="memorization score (rms)")
    ax[0].legend(fontsize=7)
    for key, label in (("copy_fraction_planted", "planted prompts"), ("copy_fraction_control", "control prompts"),
                       ("copy_fraction_ordinary", "ordinary prompts")):
        ys = [a["copying"].get(key) for a in audits]
        if all(y is not None for y in ys):
            ax[1].plot(w, ys, "o-", label=label)
    ys = [(a["copying"].get("dar") or {}).get("copy_fraction") for a in audits]
    if all(y is not None for y in ys):
        ax[1].plot(w, ys, "k--", label="all generations")
    pix = [a["copying"].get("planted_pixels") or {} for a in audits]
    if all(pix):   # the ground truth for planted duplicates: is the nearest training image the planted one?
        ax[1].plot(w, [p["nearest_is_planted_fraction"] for p in pix], "rs-", label="planted: nearest is planted (pixels)")
        if all(p["null_rate"] is not None for p in pix):
            ax[1].plot(w, [p["null_rate"] for p in pix], "r:", marker=".", label="null: other prompts' generations")
    ax[1].set(xlabel="guidance w", ylabel=f"fraction of generations (copy rate: {audits[0]['copying']['space']})")
    ax[1].legend(fontsize=7)
    for name in [n for n, v in audits[0]["quality"].items() if "frechet_to_heldout" in v]:
        ax[2].plot(w, [a["quality"][name]["frechet_to_heldout"] for a in audits], "o-", label=name)
        ax[2].axhline(audits[0]["quality"][name]["real_train_vs_heldout"], ls=":", lw=0.8)
    ax[2].set(xlabel="guidance w", ylabel="Fréchet distance to held-out (dotted: real floor)", yscale="log")
    ax[2].legend(fontsize=7, loc="upper left")
    conf = [a["quality"].get("label_conformance") for a in audits]
    if all(conf):   # prompt adherence: what lowering w costs
        twin = ax[2].twinx()
        twin.plot(w, [c["generated"]["macro_auc"] for c in conf], "k^-", label="label conformance (AUC)")
        real_auc = (conf[0].get("real_heldout") or {}).get("macro_auc")
        if real_auc is not None:
            twin.axhline(real_auc, color="k", ls="--", lw=0.8, label="same, real held-out")
        twin.set_ylabel("label conformance, macro AUC")
        twin.legend(fontsize=7, loc="lower right")
    return figure_img(fig)


# ---- optimised prompt embedding ---------------------------------------------------------------------

def optimized_generations(loaded, prompt_list: PromptList, settings: DetectorSettings, *, target_rms: float,
                          manifest: dict | None = None, groups: list[str] | None = None, lr: float = 0.05,
                          max_iterations: int = 10, batch_prompts: int = 16,
                          progress: bool = True) -> tuple[Generations, list[dict]]:
    """Generations with Wen's optimised embedding, same seeds as a scan of the same list; and per-prompt stats."""
    if settings.sampler != "ddim":
        raise ValueError("optimize embedding: use the deterministic DDIM sampler (the optimisation is per seed)")
    model, schedule, cfg = loaded.model, loaded.schedule, loaded.unet_config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    device = next(model.parameters()).device
    tokens = encode_prompts(loaded.vocab, prompt_list)
    groups = groups or prompt_groups(prompt_list.prompts, manifest) or ["ordinary"] * len(prompt_list.prompts)
    g = settings.generations
    all_seeds = prompt_seeds(list(range(len(prompt_list.prompts))), settings.base_seed)
    norms, images, stats = [], [], []
    param = loaded.diffusion_config.parameterization
    for b0 in tqdm(range(0, len(tokens), batch_prompts), desc="optimise+sample", disable=not progress):
        tok, seeds = tokens[b0:b0 + batch_prompts].to(device), all_seeds[b0:b0 + batch_prompts]
        noise = seeded_noise(seeds, (g, *shape), device).flatten(0, 1)   # as engine.audit.wen_detector.detect
        opt = optimize_prompt_embedding(model, tok, noise, schedule, generations=g, target_rms=target_rms, lr=lr,
                                        max_iterations=max_iterations, parameterization=param)
        out = sample(model, tok.repeat_interleave(g, 0), noise, schedule, steps=settings.steps,
                     guidance=settings.guidance, parameterization=param, clip_x0=settings.clip_x0,
                     context=opt.rows(g))
        norms.append(out.norms_rms.T.reshape(len(tok), g, -1).numpy())
        images.append(to_uint8(out.images).reshape(len(tok), g, *shape[1:]))
        scale = float(opt.elements) ** 0.5
        for j in range(len(tok)):
            stats.append({"prompt": prompt_list.prompts[b0 + j], "loss_before_rms": float(opt.loss_before[j]) / scale,
                          "loss_after_rms": float(opt.loss_after[j]) / scale, "iterations": int(opt.iterations[j]),
                          "target_rms": target_rms, "target_raw": opt.target_raw})
    gen = Generations(list(prompt_list.prompts), list(groups), all_seeds, np.concatenate(norms), np.concatenate(images))
    return gen, stats
