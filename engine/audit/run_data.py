"""The images and prompts a training run saw, read back from its `splits.json` and image cache.

A run directory holds `splits.json` (the data section and, per split, every record's image path and
prompt) and, if duplicates were planted, `planted_manifest.json`. Images are decoded through the data
pipeline's cache at the run's resolution. Planted copies share their original's path; for neighbour
search each distinct image is kept once (so "the three nearest training images" are three images).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

from data_pipeline.cache import load_or_build_cache


@dataclass
class TrainingImages:
    """Distinct training images of a run with the first prompt and the path of each."""
    images: np.ndarray                     # uint8 [N, S, S]
    prompts: list[str]
    image_paths: list[str]


def find_run_file(run_dir: str, name: str) -> str | None:
    """`name` in the run directory or its parent (when given the run's `export/` directory)."""
    for d in (run_dir, os.path.dirname(os.path.abspath(run_dir))):
        path = os.path.join(d, name)
        if os.path.isfile(path):
            return path
    return None


def read_splits(run_dir: str) -> dict:
    path = find_run_file(run_dir, "splits.json")
    if path is None:
        raise ValueError(f"{run_dir}: no splits.json (is this a memdiff training run directory?)")
    with open(path) as f:
        data = json.load(f)
    for key in ("data", "splits"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    return {**data, "path": path}


def read_manifest(run_dir: str) -> dict | None:
    path = find_run_file(run_dir, "planted_manifest.json")
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def load_split_cache(splits: dict, paths: list[str], progress: bool = True):
    """`paths` decoded at the run's resolution through the run's image cache (the `cache_dir` of its
    data section, else `cache/` beside splits.json): the one place that knows where that cache is."""
    cfg = splits["data"]
    cache_dir = cfg.get("cache_dir") or os.path.join(os.path.dirname(splits["path"]), "cache")
    return load_or_build_cache(paths, int(cfg["image_size"]), cache_dir, progress=progress)


def split_prompts(run_dir: str, split: str = "train") -> list[str]:
    """Every record's prompt in a split (with repeats: planted copies count once each)."""
    splits = read_splits(run_dir)
    if split not in splits["splits"]:
        raise ValueError(f"{splits['path']}: no split {split!r} (has {sorted(splits['splits'])})")
    return [r["prompt"] for r in splits["splits"][split]]


def split_images(run_dir: str, split: str = "train", progress: bool = True) -> TrainingImages:
    """Distinct images of a split (uint8 [N, S, S] at the run's resolution) with their first prompt."""
    splits = read_splits(run_dir)
    if split not in splits["splits"]:
        raise ValueError(f"{splits['path']}: no split {split!r} (has {sorted(splits['splits'])})")
    records = splits["splits"][split]
    if not records:
        raise ValueError(f"{splits['path']}: split {split!r} is empty")
    first_prompt: dict[str, str] = {}
    for r in records:
        first_prompt.setdefault(r["image_path"], r["prompt"])
    paths = list(first_prompt)
    cache = load_split_cache(splits, paths, progress)
    ok = np.asarray(cache.ok, dtype=bool)
    if not ok.all():
        bad = [p for p, good in zip(paths, ok) if not good]
        raise ValueError(f"{splits['path']}: {len(bad)} {split} images cannot be read (first: {bad[0]})")
    return TrainingImages(np.asarray(cache.images), [first_prompt[p] for p in paths], paths)


def prompt_counts(run_dir: str, split: str = "train") -> Counter:
    return Counter(split_prompts(run_dir, split))
