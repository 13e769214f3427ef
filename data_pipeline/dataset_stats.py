"""How alike a dataset's distinct images are: each image's pixel correlation to its nearest other image.

A memorization audit calls a generation a copy when some training image correlates with it more
than distinct training images correlate with each other. That only means something when distinct
images are as varied as real patients: if every phantom already has another phantom at r = 0.95,
any generation has a training image at r ~ 0.95 whether it is a copy or not. This statistic lets a
synthetic set be compared with real radiographs on the auditor's own scale.

Measure: sample `n` distinct images (byte-identical files count once) with a fixed seed, decode and
resize each to size x size with `cache.decode_image` (the training cache's own resize, so both
datasets are scaled the same way), and for each image take the largest Pearson correlation of its
pixels with any OTHER sampled image. Summary: median and 5th percentile over the n images.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Sequence

import numpy as np

from .cache import decode_image
from .chexpert import read_chexpert
from .nih import NIH_TABLES, read_nih
from .records import XrayRecord

DATASET_FORMATS = ("nih", "chexpert")


def nearest_neighbour_correlation(images: np.ndarray, groups: Sequence | None = None) -> np.ndarray:
    """Per image, the largest Pearson correlation of its pixels with any other image.

    images: [N, ...] (any dtype); each image is flattened. groups: optional [N] labels (patient
    ids): images sharing a label are not each other's neighbours ("nearest other patient").
    A constant image has no defined correlation: it is an error, not a silent nan.
    Returns float64 [N]; -inf where an image has no admissible neighbour.
    """
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    if len(x) < 2:
        raise ValueError(f"nearest_neighbour_correlation: needs at least 2 images, got {len(x)}")
    x = x - x.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"nearest_neighbour_correlation: image {int(np.argmin(norms))} is constant")
    z = x / norms[:, None]
    corr = z @ z.T
    np.fill_diagonal(corr, -np.inf)
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (len(x),):
            raise ValueError(f"groups: expected {len(x)} labels, got shape {g.shape}")
        corr[g[:, None] == g[None, :]] = -np.inf
    return corr.max(axis=1)


@dataclasses.dataclass
class NeighbourSummary:
    n: int
    median: float
    p05: float
    p95: float

    @classmethod
    def of(cls, values: np.ndarray) -> "NeighbourSummary":
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        return cls(len(v), float(np.median(v)), float(np.percentile(v, 5)), float(np.percentile(v, 95)))


@dataclasses.dataclass
class DatasetNeighbourStats:
    root: str
    dataset_format: str
    size: int
    n_available: int               # frontal records the sample was drawn from
    any_image: NeighbourSummary    # nearest other sampled image (the definition)
    other_patient: NeighbourSummary  # nearest sampled image of another patient
    paths: list[str]

    def lines(self) -> list[str]:
        out = [f"{self.root} ({self.dataset_format}): {self.any_image.n} distinct images of "
               f"{self.n_available} frontal records, {self.size} px"]
        for name, s in (("nearest other image  ", self.any_image), ("nearest other patient", self.other_patient)):
            out.append(f"  {name}: median {s.median:.3f}  p05 {s.p05:.3f}  p95 {s.p95:.3f}  (n={s.n})")
        return out


def detect_format(root: str) -> str:
    """"nih" when an NIH Data_Entry table is present, "chexpert" when train.csv is; else an error."""
    if any(os.path.isfile(os.path.join(root, t)) for t in NIH_TABLES):
        return "nih"
    if os.path.isfile(os.path.join(root, "train.csv")):
        return "chexpert"
    raise ValueError(f"{root}: neither an NIH table ({' / '.join(NIH_TABLES)}) nor a CheXpert train.csv found")


def check_dataset_root(root: str, dataset_format: str) -> None:
    """A one-line ValueError unless `root` is a readable folder holding a `dataset_format` dataset
    (its table present and readable), so a study refuses a wrong folder before any long work."""
    if not os.path.isdir(root):
        raise ValueError(f"{root}: not a folder")
    found = detect_format(root)
    if found != dataset_format:
        raise ValueError(f"{root}: holds a {found} dataset, not {dataset_format}")
    tables = NIH_TABLES if found == "nih" else ("train.csv",)
    table = next(os.path.join(root, t) for t in tables if os.path.isfile(os.path.join(root, t)))
    if not os.access(table, os.R_OK):
        raise ValueError(f"{table}: not readable")


def read_dataset_records(root: str, dataset_format: str | None = None) -> list[XrayRecord]:
    """Frontal records of a dataset root (CheXpert/synthetic: train.csv; NIH: all rows, all frontal)."""
    dataset_format = dataset_format or detect_format(root)
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"format: {dataset_format!r} is not one of {', '.join(DATASET_FORMATS)}")
    result = read_nih(root) if dataset_format == "nih" else read_chexpert(root, "train", views=("frontal",))
    return result.records


def sample_distinct(records: Sequence[XrayRecord], n: int, seed: int) -> list[XrayRecord]:
    """Up to n records in a seeded random order, skipping files whose bytes repeat an earlier pick."""
    order = np.random.default_rng(seed).permutation(len(records))
    seen, chosen = set(), []
    for i in order:
        with open(records[i].image_path, "rb") as f:
            digest = hashlib.sha256(f.read()).digest()
        if digest not in seen:
            seen.add(digest)
            chosen.append(records[i])
            if len(chosen) == n:
                break
    return chosen


def dataset_neighbour_stats(root: str, dataset_format: str | None = None, size: int = 32, n: int = 400,
                            seed: int = 0) -> DatasetNeighbourStats:
    """Nearest-other-image correlation of `n` distinct frontal images of the dataset at `root`."""
    dataset_format = dataset_format or detect_format(root)
    records = read_dataset_records(root, dataset_format)
    if len(records) < 2:
        raise ValueError(f"{root}: {len(records)} usable frontal images; need at least 2")
    chosen = sample_distinct(records, n, seed)
    images = np.stack([decode_image(r.image_path, size) for r in chosen])
    any_image = nearest_neighbour_correlation(images)
    other_patient = nearest_neighbour_correlation(images, [r.patient_id for r in chosen])
    return DatasetNeighbourStats(os.path.abspath(root), dataset_format, size, len(records),
                                 NeighbourSummary.of(any_image), NeighbourSummary.of(other_patient),
                                 [r.image_path for r in chosen])
