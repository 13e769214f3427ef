"""From the `data` section of a training config to cached, tokenized, split datasets.

Keys of the `data` section (every key but `root` optional):

    format           "chexpert" | "nih" | "synthetic"  (default "synthetic")
                     synthetic: a synthetic CheXpert-layout directory at `root`, generated first
                     when `root/train.csv` does not exist (see synthetic_images, synthetic_seed)
    root             dataset root: the CheXpert-v1.0-small directory or the NIH directory
    csv_split        "train" | "valid": which CheXpert CSV to read (default "train")
    image_size       cache resolution, 32..512 (default 64)
    uncertainty      "ignore" | "zeros" | "ones": CheXpert -1 labels (default "ignore")
    views            list of "frontal"/"lateral" (default ["frontal"])
    projections      null (all) or a list of AP/PA/LL/RL (default null)
    split_fractions  [train, val, test] fractions of patients (default [0.8, 0.1, 0.1])
    split_seed       seed of the patient split (default 0)
    max_images       null or N: keep the first N readable records in file order (default null)
    cache_dir        where the uint8 cache lives (default "<run_dir>/cache")
    max_len          prompt length L in tokens (default 32)
    patient_tokens   true: add a per-patient extra token `pt<patient id>` to every prompt (default false)
    planted          null or {"k": K, "copies": C, "seed": S}: planted duplicates in the train split
    synthetic_images number of images to generate for format "synthetic" (default 1000)
    synthetic_seed   seed of the generated set (default 0)
    synthetic_width  width of generated images in pixels (default 320)

Writes `vocab.json`, `splits.json` and (if planted) `planted_manifest.json` into `run_dir`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import numpy as np
import torch

from .atomic_files import write_json
from .cache import MAX_SIZE, MIN_SIZE, load_or_build_cache
from .chexpert import UNCERTAINTY_POLICIES, read_chexpert
from .nih import read_nih
from .planted import manifest_tokens, plant_duplicates
from .prompts import prompt_for
from .records import XrayRecord
from .splits import SPLIT_NAMES, split_by_patient
from .vocab import Vocabulary

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "format": "synthetic", "root": None, "csv_split": "train", "image_size": 64, "uncertainty": "ignore",
    "views": ["frontal"], "projections": None, "split_fractions": [0.8, 0.1, 0.1], "split_seed": 0,
    "max_images": None, "cache_dir": None, "max_len": 32, "patient_tokens": False, "planted": None,
    "synthetic_images": 1000, "synthetic_seed": 0, "synthetic_width": 320,
}
FORMATS = ("chexpert", "nih", "synthetic")


@dataclasses.dataclass
class SplitData:
    images: np.ndarray              # uint8 [N, S, S]
    tokens: torch.Tensor            # int64 [N, L]
    prompts: list[str]
    records: list[XrayRecord]

    def __len__(self) -> int:
        return len(self.records)


@dataclasses.dataclass
class PreparedData:
    vocab: Vocabulary
    splits: dict[str, SplitData]
    manifest: dict | None
    skipped: list[str]              # rows and images left out, with reasons
    config: dict                    # the data section with defaults filled in


def validate_data_config(data_cfg: dict) -> dict:
    """The data section with defaults filled in; one-line ValueError naming a bad key."""
    if not isinstance(data_cfg, dict):
        raise ValueError("data: must be a mapping")
    unknown = sorted(set(data_cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"data.{unknown[0]}: unknown key (known: {', '.join(DEFAULTS)})")
    cfg = {**DEFAULTS, **data_cfg}

    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ValueError(f"data.{key}: {what}, got {cfg[key]!r}")

    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)   # noqa: E731
    need(cfg["format"] in FORMATS, "format", f"must be one of {', '.join(FORMATS)}")
    need(isinstance(cfg["root"], str) and cfg["root"] != "", "root", "must be a directory path")
    need(cfg["csv_split"] in ("train", "valid"), "csv_split", "must be train or valid")
    need(is_int(cfg["image_size"]) and MIN_SIZE <= cfg["image_size"] <= MAX_SIZE, "image_size",
         f"must be an integer in [{MIN_SIZE}, {MAX_SIZE}]")
    need(cfg["uncertainty"] in UNCERTAINTY_POLICIES, "uncertainty", f"must be one of {', '.join(UNCERTAINTY_POLICIES)}")
    need(isinstance(cfg["views"], (list, tuple)) and len(cfg["views"]) > 0
         and all(v in ("frontal", "lateral") for v in cfg["views"]), "views", "must be a non-empty list of frontal/lateral")
    need(cfg["projections"] is None or (isinstance(cfg["projections"], (list, tuple)) and len(cfg["projections"]) > 0
         and all(p in ("AP", "PA", "LL", "RL") for p in cfg["projections"])), "projections", "must be null or a list of AP/PA/LL/RL")
    fr = cfg["split_fractions"]
    need(isinstance(fr, (list, tuple)) and len(fr) == 3 and all(isinstance(f, (int, float)) and f >= 0 for f in fr)
         and abs(sum(fr) - 1) < 1e-6, "split_fractions", "must be three non-negative numbers summing to 1")
    need(is_int(cfg["split_seed"]), "split_seed", "must be an integer")
    need(cfg["max_images"] is None or (is_int(cfg["max_images"]) and cfg["max_images"] > 0), "max_images",
         "must be null or a positive integer")
    need(cfg["cache_dir"] is None or isinstance(cfg["cache_dir"], str), "cache_dir", "must be null or a path")
    need(is_int(cfg["max_len"]) and 2 <= cfg["max_len"] <= 256, "max_len", "must be an integer in [2, 256]")
    need(isinstance(cfg["patient_tokens"], bool), "patient_tokens", "must be true or false")
    need(is_int(cfg["synthetic_images"]) and cfg["synthetic_images"] > 0, "synthetic_images", "must be a positive integer")
    need(is_int(cfg["synthetic_seed"]), "synthetic_seed", "must be an integer")
    need(is_int(cfg["synthetic_width"]) and 32 <= cfg["synthetic_width"] <= 1024, "synthetic_width", "must be in [32, 1024]")
    planted = cfg["planted"]
    if planted is not None:
        if not isinstance(planted, dict):
            raise ValueError(f"data.planted: must be null or {{k, copies, seed}}, got {planted!r}")
        bad = sorted(set(planted) - {"k", "copies", "seed"})
        if bad:
            raise ValueError(f"data.planted.{bad[0]}: unknown key (known: k, copies, seed)")
        for key, low in (("k", 1), ("copies", 1)):
            if not is_int(planted.get(key)) or planted[key] < low:
                raise ValueError(f"data.planted.{key}: must be an integer >= {low}, got {planted.get(key)!r}")
        if not is_int(planted.get("seed", 0)):
            raise ValueError(f"data.planted.seed: must be an integer, got {planted.get('seed')!r}")
        cfg["planted"] = {"k": planted["k"], "copies": planted["copies"], "seed": planted.get("seed", 0)}
    cfg["views"], cfg["split_fractions"] = list(cfg["views"]), [float(f) for f in fr]
    return cfg


def read_records(cfg: dict) -> tuple[list[XrayRecord], list[str]]:
    root = cfg["root"]
    if cfg["format"] == "nih":
        result = read_nih(root)
    else:
        if cfg["format"] == "synthetic" and not os.path.isfile(os.path.join(root, "train.csv")):
            from .synthetic import make_synthetic_chexpert
            log.info("generating %d synthetic images in %s", cfg["synthetic_images"], root)
            make_synthetic_chexpert(root, cfg["synthetic_images"], cfg["synthetic_seed"], image_size=cfg["synthetic_width"])
        result = read_chexpert(root, cfg["csv_split"], cfg["uncertainty"], tuple(cfg["views"]),
                               tuple(cfg["projections"]) if cfg["projections"] else None)
        if cfg["format"] == "synthetic":
            result.records = [dataclasses.replace(r, dataset="synthetic") for r in result.records]
    return result.records, result.skipped


def _patient_token(patient_id: str) -> str:
    return "pt" + re.sub(r"[^A-Za-z0-9_\-.]", "_", patient_id)


def prepare_dataset(data_cfg: dict, run_dir: str, progress: bool = True) -> PreparedData:
    """Read, cache, split, plant and tokenize the dataset described by `data_cfg`."""
    cfg = validate_data_config(data_cfg)
    os.makedirs(run_dir, exist_ok=True)
    records, skipped = read_records(cfg)
    if cfg["max_images"] is not None:
        records = records[: cfg["max_images"]]
    cache = load_or_build_cache(records, cfg["image_size"], cfg["cache_dir"] or os.path.join(run_dir, "cache"),
                                progress=progress)
    skipped = skipped + [f"image unreadable: {s}" for s in cache.skipped]
    if skipped:
        log.warning("skipped %d rows/images (first: %s)", len(skipped), "; ".join(skipped[:3]))
    row_of = {r.image_path: i for i, r in enumerate(records)}
    records = [r for r, ok in zip(records, cache.ok) if ok]
    if not records:
        raise ValueError(f"data.root: no readable images in {cfg['root']}")
    if cfg["patient_tokens"]:
        records = [r.with_extra_tokens((_patient_token(r.patient_id),)) for r in records]

    split_records = split_by_patient(records, cfg["split_fractions"], cfg["split_seed"])
    manifest = None
    if cfg["planted"] is not None:
        p = cfg["planted"]
        split_records["train"], manifest = plant_duplicates(split_records["train"], p["k"], p["copies"], p["seed"])

    extra = []
    if cfg["patient_tokens"]:
        extra += sorted({_patient_token(r.patient_id) for r in records})
    if manifest is not None:
        extra += manifest_tokens(manifest)
    vocab = Vocabulary.default(extra, max_len=cfg["max_len"])

    splits = {}
    for name in SPLIT_NAMES:
        recs = split_records[name]
        rows = np.array([row_of[r.image_path] for r in recs], dtype=np.int64)
        prompts = [prompt_for(r) for r in recs]
        tokens = torch.tensor([vocab.tokens_for(r) for r in recs], dtype=torch.long).reshape(len(recs), vocab.max_len)
        images = np.asarray(cache.images[rows])   # planted copies repeat their row
        splits[name] = SplitData(images, tokens, prompts, recs)

    vocab.save(os.path.join(run_dir, "vocab.json"))
    write_json(os.path.join(run_dir, "splits.json"), {
        "data": cfg, "skipped": skipped,
        "splits": {name: [{"image_path": r.image_path, "patient_id": r.patient_id, "study_id": r.study_id,
                           "prompt": s.prompts[i]} for i, r in enumerate(s.records)] for name, s in splits.items()},
    })
    if manifest is not None:
        write_json(os.path.join(run_dir, "planted_manifest.json"), manifest)
    return PreparedData(vocab, splits, manifest, skipped, cfg)
