"""The images and prompts a training run saw, read back from its `splits.json` and image cache.

A run directory holds `splits.json` (the data section and, per split, every record's image path and
prompt) and, if duplicates were planted, `planted_manifest.json`. Images are decoded through the data
pipeline's cache at the run's resolution. Planted copies share their original's path; for neighbour
search each distinct image is kept once (`TrainingImages`: "the three nearest training images" are three
images), while the before/after audit keeps every record (`RealImages`: a planted copy is trained on as
often as it was copied).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

from data_pipeline.cache import load_or_build_cache
from data_pipeline.json_files import read_json_object
from engine.audit.prompt_lists import PromptList, training_prompt_list


@dataclass
class TrainingImages:
    """Distinct training images of a run with the first prompt and the path of each."""
    images: np.ndarray                     # uint8 [N, S, S]
    prompts: list[str]
    image_paths: list[str]


@dataclass
class RealImages:
    """What a before/after audit compares generations with (every training record, held-out images)."""
    train: np.ndarray              # uint8 [N, S, S]
    train_paths: list[str]         # image path of each training image (planted copies share one)
    heldout: np.ndarray            # uint8 [M, S, S] validation/test images, never trained on
    heldout_prompts: list[str] | None = None   # their prompts (label conformance of real images)


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
    data = read_json_object(path)
    for key in ("data", "splits"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    return {**data, "path": path}


def read_manifest(run_dir: str) -> dict | None:
    path = find_run_file(run_dir, "planted_manifest.json")
    if path is None:
        return None
    return read_json_object(path)


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


def run_prompts(run_dir: str, split: str = "train") -> PromptList:
    """The distinct prompts of a run's split, with how many training images carry each."""
    return training_prompt_list(split_prompts(run_dir, split), f"{read_splits(run_dir)['path']}:{split}")


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
