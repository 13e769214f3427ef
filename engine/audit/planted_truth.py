"""Ground truth from a planted-duplicate manifest: which prompts asked for a planted image, and did
their generations come out nearest to it?

data_pipeline.planted copies chosen training images many times under an extra token of their own
(`... | tok0003`) and lists them in planted_manifest.json, with matched controls (extra tokens of the
same frequency on ordinary images). A prompt is "planted" when one of its extra tokens is planted,
"control" when one is a control token, "ordinary" otherwise. Planted copies share their original's
image path, so "the nearest training image is the planted image" means "its path is the planted path".
This module is the one place that answers both questions; the scan, the validation report and the
before/after audit all ask it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from data_pipeline.prompts import parse_prompt
from engine.audit.similarity import pearson_normalize
from engine.audit.statistics import distribution_summary, prompt_bootstrap_ci


def prompt_groups(prompts: list[str], manifest: dict | None) -> list[str] | None:
    """'planted' / 'control' / 'ordinary' per prompt, from the manifest's extra tokens, or None."""
    if not manifest:
        return None
    planted = {p["token"] for p in manifest.get("planted", [])}
    controls = {c["token"] for c in manifest.get("controls", [])}
    out = []
    for prompt in prompts:
        extra = set(parse_prompt(prompt).extra)
        out.append("planted" if extra & planted else "control" if extra & controls else "ordinary")
    return out


def planted_sources(prompts: Sequence[str], groups: Sequence[str], manifest: dict) -> dict[int, set[str]]:
    """Prompt index -> image path(s) planted under that prompt's planted token(s), for planted prompts."""
    token_path = {e["token"]: e["image_path"] for e in manifest.get("planted", [])}
    return {i: {token_path[t] for t in parse_prompt(prompt).extra if t in token_path}
            for i, (prompt, group) in enumerate(zip(prompts, groups)) if group == "planted"}


def nearest_is_planted(nearest_index, train_paths: Sequence[str], planted_paths: set[str]) -> np.ndarray:
    """bool, shaped like `nearest_index`: is each generation's nearest training image (an index into
    `train_paths`) the planted image, i.e. any of its copies?"""
    nearest_paths = np.asarray(train_paths)[np.asarray(nearest_index, dtype=np.int64)]
    return np.isin(nearest_paths, list(planted_paths))


def planted_pixel_match(images: np.ndarray, prompts: Sequence[str], groups: Sequence[str], train: np.ndarray,
                        train_paths: Sequence[str], manifest: dict, cache: dict) -> dict:
    """How close planted prompts' generations (uint8 [P, G, S, S]) come to THEIR planted image, in raw pixels.

    Pixel Pearson correlation needs no learned model, so this is the audit's ground truth for the
    planted duplicates: for every planted generation, its correlation to its own planted image and
    whether that image is its nearest training image. `null_rate` is the same event for generations
    that never asked for it: the share of the audit's non-planted prompts' generations whose nearest
    training image is a given planted image, averaged over the planted images (None without
    non-planted prompts) — the level a mitigation that removes the copying should come down to.
    `cache` (a dict) keeps the normalised training pixels between calls.
    """
    sources = planted_sources(prompts, groups, manifest)
    if not sources:
        return {}
    if "pixel_train" not in cache:
        cache["pixel_train"] = pearson_normalize(torch.from_numpy(train.reshape(len(train), -1)).float())
    train_vec = cache["pixel_train"]
    paths_array = np.array(train_paths)
    g = images.shape[1]

    def correlations(generated: np.ndarray) -> np.ndarray:
        q = pearson_normalize(torch.from_numpy(generated.reshape(len(generated), -1)).float())
        return (q @ train_vec.T).numpy()                              # [n, N]

    own, hits_per_prompt, source_paths = [], [], []
    for i, paths in sources.items():
        mine = np.isin(paths_array, list(paths))
        if not mine.any():
            continue
        source_paths.append(paths)
        corr = correlations(images[i])
        own += corr[:, mine].max(1).tolist()
        hits_per_prompt.append(nearest_is_planted(corr.argmax(1), train_paths, paths).astype(np.float64))
    if not own:
        return {}
    others = [i for i, group in enumerate(groups) if group != "planted"]
    null_rate = None
    if others:
        nearest = correlations(images[others].reshape(-1, *images.shape[2:])).argmax(1)
        null_rate = float(np.mean([nearest_is_planted(nearest, train_paths, paths).mean() for paths in source_paths]))
    hits = np.stack(hits_per_prompt)                                 # [P_planted, G]
    return {"own_correlation": distribution_summary(np.array(own)),
            "nearest_is_planted_fraction": float(hits.mean()),
            "nearest_is_planted_ci95": prompt_bootstrap_ci(hits),
            "null_rate": null_rate, "n_null_generations": len(others) * g}
