"""From the `data` section of a training config to cached, tokenized, split datasets.

`DataConfig` is the section (its fields say what each key means); `prepare_dataset` reads, caches,
splits, plants and tokenizes, and writes `vocab.json`, `splits.json` and (if planted)
`planted_manifest.json` into the run directory.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Literal

import numpy as np
import torch

from .atomic_files import write_json
from .cache import MAX_SIZE, MIN_SIZE, load_or_build_cache
from .chexpert import UNCERTAINTY_POLICIES, read_chexpert
from .config_schema import REQUIRED, ConfigSection, build, constrained, to_jsonable
from .dataset_stats import check_dataset_root
from .nih import read_nih
from .planted import PlantedConfig, manifest_tokens, plant_duplicates, write_near_copies
from .prompts import prompt_for
from .records import XrayRecord
from .splits import SPLIT_NAMES, split_by_patient
from .vocab import Vocabulary

log = logging.getLogger(__name__)
PLANTED_IMAGES = "planted_images"   # <run_dir>/planted_images/: the near copies of planted duplicates


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(ConfigSection):
    """The `data` section; every key but `root` optional."""
    SECTION = "data"
    # synthetic: a synthetic CheXpert-layout directory at `root`, generated first when
    # `root/train.csv` does not exist (synthetic_images, synthetic_seed, synthetic_width)
    format: Literal["chexpert", "nih", "synthetic"] = "synthetic"
    root: str = constrained(REQUIRED, "a directory path", lambda v: v != "")   # CheXpert-v1.0-small or NIH dir
    csv_split: Literal["train", "valid"] = "train"   # which CheXpert CSV to read
    image_size: int = constrained(64, f"int in [{MIN_SIZE}, {MAX_SIZE}]", lambda v: MIN_SIZE <= v <= MAX_SIZE)
    uncertainty: str = constrained("ignore", f"one of {', '.join(UNCERTAINTY_POLICIES)}",   # CheXpert -1 labels
                                   lambda v: v in UNCERTAINTY_POLICIES)
    views: tuple[Literal["frontal", "lateral"], ...] = constrained(("frontal",), "a non-empty list of "
                                                                   "frontal/lateral", lambda v: len(v) > 0)
    projections: tuple[Literal["AP", "PA", "LL", "RL"], ...] | None = constrained(  # null: all
        None, "null or a non-empty list of AP/PA/LL/RL", lambda v: len(v) > 0)
    # fractions of patients in train, val, test
    split_fractions: tuple[float, float, float] = constrained(
        (0.8, 0.1, 0.1), "three numbers >= 0 summing to 1", lambda v: min(v) >= 0 and abs(sum(v) - 1) < 1e-6)
    split_seed: int = 0                    # seed of the patient split
    max_images: int | None = constrained(None, "null or int > 0", lambda v: v > 0)  # first N readable records
    cache_dir: str | None = None           # where the uint8 cache lives (null: <run_dir>/cache)
    max_len: int = constrained(32, "int in [2, 256]", lambda v: 2 <= v <= 256)   # prompt length in tokens
    patient_tokens: bool = False           # add a per-patient extra token `pt<patient id>` to every prompt
    planted: PlantedConfig | None = None   # planted duplicates in the train split (data_pipeline.planted)
    # format "synthetic": how many images to generate, their seed and width in pixels
    synthetic_images: int = constrained(1000, "int > 0", lambda v: v > 0)
    synthetic_seed: int = 0
    synthetic_width: int = constrained(320, "int in [32, 1024]", lambda v: 32 <= v <= 1024)


def data_config(raw: dict) -> DataConfig:
    """The `data` section from parsed JSON; InvalidConfig (a ValueError) names a bad key as `data.x`."""
    return build(DataConfig, raw, "data")


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
    config: DataConfig


def check_data_root(cfg: DataConfig) -> None:
    """A one-line ValueError unless `cfg.root` can be read as `cfg.format`: a real root must hold its
    dataset's table; a synthetic root must hold synthetic data or be new or empty (it is generated there).
    Cheap, so a trainer or study calls it before any long work (a process group, a run folder)."""
    if cfg.format != "synthetic":
        check_dataset_root(cfg.root, cfg.format)
    elif not os.path.isfile(os.path.join(cfg.root, "train.csv")) and os.path.isdir(cfg.root) and os.listdir(cfg.root):
        # generating would write over whatever is there
        raise ValueError(f"data.root: {cfg.root} holds files but no train.csv; synthetic data is generated "
                         f"only into a new or empty folder")


def read_records(cfg: DataConfig) -> tuple[list[XrayRecord], list[str]]:
    root = cfg.root
    check_data_root(cfg)
    if cfg.format == "nih":
        result = read_nih(root)
    else:
        if cfg.format == "synthetic" and not os.path.isfile(os.path.join(root, "train.csv")):
            from .synthetic import make_synthetic_chexpert
            log.info("generating %d synthetic images in %s", cfg.synthetic_images, root)
            make_synthetic_chexpert(root, cfg.synthetic_images, cfg.synthetic_seed, image_size=cfg.synthetic_width)
        result = read_chexpert(root, cfg.csv_split, cfg.uncertainty, cfg.views, cfg.projections)
        if cfg.format == "synthetic":
            result.records = [dataclasses.replace(r, dataset="synthetic") for r in result.records]
    return result.records, result.skipped


def _patient_token(patient_id: str) -> str:
    return "pt" + re.sub(r"[^A-Za-z0-9_\-.]", "_", patient_id)


def _near_copy_pixels(manifest: dict, cfg: DataConfig, run_dir: str, progress: bool) -> dict[str, np.ndarray]:
    """Write the manifest's near copies (kept when already there) and read them through the cache."""
    paths = [p for e in manifest["planted"] if e["kind"] == "near" for p in e["copy_paths"]]
    if not paths:
        return {}
    written = write_near_copies(manifest)
    log.info("near duplicates: %d images in %s (%d written now)", len(paths), os.path.join(run_dir, PLANTED_IMAGES),
             written)
    cache = load_or_build_cache(paths, cfg.image_size, cfg.cache_dir or os.path.join(run_dir, "cache"),
                                progress=progress)
    if not cache.ok.all():
        raise ValueError(f"data.planted: near copy unreadable: {cache.skipped[0]}")
    return dict(zip(paths, np.asarray(cache.images)))


def prepare_dataset(cfg: DataConfig, run_dir: str, progress: bool = True) -> PreparedData:
    """Read, cache, split, plant and tokenize the dataset described by `cfg`."""
    os.makedirs(run_dir, exist_ok=True)
    records, skipped = read_records(cfg)
    if not records:
        raise ValueError(f"data.views: no image of {cfg.root} is among views {list(cfg.views)} and projections "
                         f"{list(cfg.projections) if cfg.projections else 'all'}")
    if cfg.max_images is not None:
        records = records[: cfg.max_images]
    cache = load_or_build_cache(records, cfg.image_size, cfg.cache_dir or os.path.join(run_dir, "cache"),
                                progress=progress)
    skipped = skipped + [f"image unreadable: {s}" for s in cache.skipped]
    if skipped:
        log.warning("skipped %d rows/images (first: %s)", len(skipped), "; ".join(skipped[:3]))
    row_of = {r.image_path: i for i, r in enumerate(records)}
    records = [r for r, ok in zip(records, cache.ok) if ok]
    if not records:
        raise ValueError(f"{cfg.root}: none of its {len(cache.ok)} images could be read (first: {cache.skipped[0]})")
    if cfg.patient_tokens:
        records = [r.with_extra_tokens((_patient_token(r.patient_id),)) for r in records]

    split_records = split_by_patient(records, cfg.split_fractions, cfg.split_seed)
    manifest = None
    pixels = {r.image_path: cache.images[row_of[r.image_path]] for r in records}
    if cfg.planted is not None:
        split_records["train"], manifest = plant_duplicates(split_records["train"], cfg.planted,
                                                            os.path.join(run_dir, PLANTED_IMAGES))
        pixels.update(_near_copy_pixels(manifest, cfg, run_dir, progress))

    extra = []
    if cfg.patient_tokens:
        extra += sorted({_patient_token(r.patient_id) for r in records})
    if manifest is not None:
        extra += manifest_tokens(manifest)
    vocab = Vocabulary.default(extra, max_len=cfg.max_len)

    splits = {}
    for name in SPLIT_NAMES:
        recs = split_records[name]
        prompts = [prompt_for(r) for r in recs]
        tokens = torch.tensor([vocab.tokens_for(r) for r in recs], dtype=torch.long).reshape(len(recs), vocab.max_len)
        images = np.stack([pixels[r.image_path] for r in recs]) if recs else np.zeros(
            (0, cfg.image_size, cfg.image_size), np.uint8)   # exact planted copies repeat their source's pixels
        splits[name] = SplitData(images, tokens, prompts, recs)

    vocab.save(os.path.join(run_dir, "vocab.json"))
    write_json(os.path.join(run_dir, "splits.json"), {
        "data": to_jsonable(cfg), "skipped": skipped,
        "splits": {name: [{"image_path": r.image_path, "patient_id": r.patient_id, "study_id": r.study_id,
                           "prompt": s.prompts[i]} for i, r in enumerate(s.records)] for name, s in splits.items()},
    })
    if manifest is not None:
        write_json(os.path.join(run_dir, "planted_manifest.json"), manifest)
    return PreparedData(vocab, splits, manifest, skipped, cfg)
