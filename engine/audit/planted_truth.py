"""Ground truth from a planted-duplicate manifest: which prompts asked for a planted image, in which
half of the study each prompt is, and did their generations come out nearest to the planted image?

data_pipeline.planted copies chosen training images C times under a token of their own
(`... | plant003`), exactly or as near copies (new files), and lists them in planted_manifest.json
with repetition-matched controls (`ctrl003`: C distinct images under one prompt). A prompt is
"planted" when one of its extra tokens is planted, "control" when one is a control token,
"ordinary" otherwise. This module is the one place that answers, for any prompt:
- `prompt_group`: planted / control / ordinary;
- `prompt_split`: calibration / evaluation. Planted and control prompts: their entry's half
  (balanced per (dose, kind) cell by data_pipeline.planted). Ordinary prompts: a seeded hash of their
  text (`ordinary_split_seed`), so the same prompt is in the same half in every tool and run.
  Thresholds, optimisation targets and fitted weights use only the calibration half; every reported
  rate only the evaluation half.
- `planted_entry`: the planted image a prompt asked for (dose, kind, source, every copy's path).
"Nearest is planted" means the nearest training image's path is the source or one of its copies.

Version 1 manifests (no "version" key: K images x C exact copies, controls of C distinct images with
their own prompts) are still read: every entry is exact with the manifest's C, and EVERY prompt,
planted and control included, is split by a seeded hash (seed: the manifest's seed) of its dedicated
token, or of its text for ordinary prompts, so a v1 run also gets two disjoint halves; its controls are
matched in token frequency only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from data_pipeline.prompts import parse_prompt
from engine.audit.intervals import cluster_bootstrap_mean, distribution_summary
from engine.audit.similarity import pearson_normalize

GROUPS = ("planted", "control", "ordinary")
SPLITS = ("calibration", "evaluation")


@dataclass(frozen=True)
class PlantedEntry:
    """One planted image: its token, dose, kind, half, source path and every path that counts as it."""
    token: str
    copies: int
    kind: str                  # "exact" | "near"
    split: str                 # "calibration" | "evaluation"
    source: str                # the original image's path (its ground-truth identity)
    paths: frozenset[str]      # the source and every copy's path


def manifest_version(manifest: dict | None) -> int:
    return int((manifest or {}).get("version", 1))


def hash_split(text: str, seed: int) -> str:
    """"calibration" or "evaluation" from a seeded hash of `text` (stable across runs and platforms)."""
    digest = hashlib.sha256(f"{int(seed)}\n{text}".encode()).digest()
    return SPLITS[digest[0] & 1]


def planted_entries(manifest: dict | None) -> dict[str, PlantedEntry]:
    """Token -> PlantedEntry for every planted image of a v1 or v2 manifest."""
    out = {}
    for e in (manifest or {}).get("planted", []):
        copies = int(e.get("copies", manifest.get("copies", 1)))
        paths = frozenset([e["image_path"], *e.get("copy_paths", [])])
        split = e.get("split") or hash_split(e["token"], manifest.get("seed", 0))
        out[e["token"]] = PlantedEntry(e["token"], copies, e.get("kind", "exact"), split, e["image_path"], paths)
    return out


def _extra(prompt: str) -> tuple[str, ...]:
    """The prompt's extra tokens; none for text outside the prompt grammar. Planted and control tokens
    exist only in grammatical prompts (the scan encodes every prompt through the vocabulary), so such
    text, e.g. a hand-edited scores file, is an ordinary prompt here and is shown escaped, not parsed."""
    try:
        return parse_prompt(prompt).extra
    except ValueError:
        return ()


def planted_entry(prompt: str, manifest: dict | None) -> PlantedEntry | None:
    """The planted image this prompt asked for (its first planted token), or None."""
    entries = planted_entries(manifest)
    return next((entries[t] for t in _extra(prompt) if t in entries), None)


def prompt_group(prompt: str, manifest: dict | None) -> str:
    planted = {p["token"] for p in (manifest or {}).get("planted", [])}
    controls = {c["token"] for c in (manifest or {}).get("controls", [])}
    extra = set(_extra(prompt))
    return "planted" if extra & planted else "control" if extra & controls else "ordinary"


def prompt_groups(prompts: list[str], manifest: dict | None) -> list[str] | None:
    """'planted' / 'control' / 'ordinary' per prompt, from the manifest's extra tokens, or None."""
    if not manifest:
        return None
    return [prompt_group(p, manifest) for p in prompts]


def prompt_split(prompt: str, manifest: dict | None) -> str:
    """The half of the study a prompt belongs to (module docstring); without a manifest, by hash with seed 0."""
    manifest = manifest or {}
    dedicated = manifest.get("planted", []) + manifest.get("controls", [])
    if manifest_version(manifest) >= 2:
        halves = {e["token"]: e["split"] for e in dedicated}
        own = next((halves[t] for t in _extra(prompt) if t in halves), None)
        return own or hash_split(prompt, manifest.get("ordinary_split_seed", 0))
    seed = manifest.get("seed", 0)
    token = next((t for t in _extra(prompt) if t in {e["token"] for e in dedicated}), None)
    return hash_split(token, seed) if token else hash_split(prompt, seed)


def prompt_splits(prompts: Sequence[str], manifest: dict | None) -> list[str]:
    return [prompt_split(p, manifest) for p in prompts]


def describe_manifest(manifest: dict) -> str:
    """One line: how many planted images, at which doses and kinds, and their controls."""
    entries = planted_entries(manifest).values()
    doses = sorted({e.copies for e in entries})
    kinds = sorted({e.kind for e in entries})
    return (f"{len(entries)} planted images ({', '.join(kinds)}) x {'/'.join(map(str, doses))} copies, "
            f"{len(manifest.get('controls', []))} controls (manifest v{manifest_version(manifest)})")


def planted_sources(prompts: Sequence[str], groups: Sequence[str], manifest: dict) -> dict[int, set[str]]:
    """Prompt index -> every path that counts as the planted image it asked for (source and copies)."""
    entries = planted_entries(manifest)
    return {i: set().union(*[entries[t].paths for t in _extra(prompt) if t in entries])
            for i, (prompt, group) in enumerate(zip(prompts, groups)) if group == "planted"}


def nearest_is_planted(nearest_index, train_paths: Sequence[str], planted_paths: set[str]) -> np.ndarray:
    """bool, shaped like `nearest_index`: is each generation's nearest training image (an index into
    `train_paths`) the planted image, i.e. its source or any of its copies?"""
    nearest_paths = np.asarray(train_paths)[np.asarray(nearest_index, dtype=np.int64)]
    return np.isin(nearest_paths, list(planted_paths))


# ---- ground truth per dose and kind, against the null rate ---------------------------------------------

def _cell_truth(hits: np.ndarray, null_hits: np.ndarray, n_boot: int, seed: int) -> dict:
    """hits [P, G] of the cell's planted prompts; null_hits [Q, G] of the other prompts' generations
    landing on the cell's images (averaged over its images)."""
    rate = cluster_bootstrap_mean(hits, n_boot, seed)
    out = {"rate": rate["mean"], "ci95": rate["ci95"], "n_prompts": rate["n_prompts"], "n_generations": rate["n_values"]}
    if len(null_hits):
        null = cluster_bootstrap_mean(null_hits, n_boot, seed)
        out.update(null_rate=null["mean"], null_ci95=null["ci95"], n_null_prompts=null["n_prompts"],
                   n_null_generations=null["n_values"])
    return out


CELL_KEYS = {"by_cell": ("copies", "kind"), "by_copies": ("copies",), "by_kind": ("kind",)}


def nearest_is_planted_by_cell(nearest_paths: np.ndarray, prompts: Sequence[str], manifest: dict,
                               groups: Sequence[str] | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Ground truth of planted prompts per (dose, kind) cell, per dose, per kind and over all, each against
    its null rate, with prompt-resampled 95% intervals.

    nearest_paths: [P, G] path of each generation's nearest training image (pixel correlation); groups:
    the prompts' groups (default: from the manifest). A planted prompt's generation is a hit when that
    path is its planted image (source or a copy). The null of a set of planted images: the share of the
    OTHER prompts' (controls', ordinary) generations whose nearest image is one of them, averaged over
    the set's images — the level a model that never copies would show.
    """
    nearest_paths = np.asarray(nearest_paths)
    groups = list(groups) if groups is not None else [prompt_group(p, manifest) for p in prompts]
    entries = {i: planted_entry(p, manifest) for i, (p, g) in enumerate(zip(prompts, groups)) if g == "planted"}
    entries = {i: e for i, e in entries.items() if e is not None}
    others = nearest_paths[[i for i, g in enumerate(groups) if g != "planted"]]

    def truth(selected: list[int]) -> dict:
        hits = np.stack([np.isin(nearest_paths[i], list(entries[i].paths)) for i in selected]).astype(np.float64)
        images = {entries[i].token: entries[i].paths for i in selected}
        null = sum(np.isin(others, list(paths)).astype(np.float64) for paths in images.values()) / len(images)
        return _cell_truth(hits, null, n_boot, seed)

    if not entries:
        return {}
    out = {"all": truth(list(entries))}
    for name, fields in CELL_KEYS.items():
        key = lambda e: tuple(getattr(e, f) for f in fields)  # noqa: E731
        out[name] = [{**dict(zip(fields, k)), **truth([i for i, e in entries.items() if key(e) == k])}
                     for k in sorted({key(e) for e in entries.values()})]
    out["rule"] = ("hit: a planted prompt's generation whose nearest training image (pixel Pearson correlation) "
                   "is its planted source or one of that image's copies; null: other prompts' generations "
                   "landing on the same images")
    return out


def planted_pixel_match(images: np.ndarray, prompts: Sequence[str], groups: Sequence[str], train: np.ndarray,
                        train_paths: Sequence[str], manifest: dict, cache: dict) -> dict:
    """How close planted prompts' generations (uint8 [P, G, S, S]) come to THEIR planted image, in raw pixels.

    Pixel Pearson correlation needs no learned model, so this is the audit's ground truth for the
    planted duplicates: for every planted generation, its correlation to its own planted image (any
    copy) and whether that image is its nearest training image; per dose and kind with the null rate
    (`by_cell`, nearest_is_planted_by_cell). `null_rate` is the same event for generations that never
    asked for it, averaged over the planted images (None without non-planted prompts) — the level a
    mitigation that removes the copying should come down to. `cache` keeps the normalised training pixels.
    """
    sources = planted_sources(prompts, groups, manifest)
    if not sources:
        return {}
    if "pixel_train" not in cache:
        cache["pixel_train"] = pearson_normalize(torch.from_numpy(train.reshape(len(train), -1)).float())
    train_vec = cache["pixel_train"]
    paths_array = np.array(train_paths)
    p, g = images.shape[:2]
    q = pearson_normalize(torch.from_numpy(images.reshape(p * g, -1)).float())
    own, nearest = [], np.empty(p * g, dtype=np.int64)
    for b in range(0, p * g, 1024):
        corr = (q[b:b + 1024] @ train_vec.T).numpy()
        nearest[b:b + 1024] = corr.argmax(1)
        for j, row in enumerate(range(b, min(b + 1024, p * g))):
            if row // g in sources:
                mine = np.isin(paths_array, list(sources[row // g]))
                if mine.any():
                    own.append(float(corr[j, mine].max()))
    if not own:
        return {}
    nearest_paths = paths_array[nearest].reshape(p, g)
    per_prompt = {i: float(np.isin(nearest_paths[i], list(paths)).mean()) for i, paths in sources.items()}
    truth = nearest_is_planted_by_cell(nearest_paths, prompts, manifest, groups)
    overall = truth["all"]
    return {"own_correlation": distribution_summary(np.array(own)),
            "nearest_is_planted_fraction": overall["rate"], "nearest_is_planted_ci95": overall["ci95"],
            "n_planted_prompts": overall["n_prompts"],
            "null_rate": overall.get("null_rate"), "null_ci95": overall.get("null_ci95"),
            "n_null_generations": overall.get("n_null_generations", 0),
            "by_cell": truth["by_cell"], "by_copies": truth["by_copies"], "by_kind": truth["by_kind"],
            "per_prompt": per_prompt}
