"""Synthetic CheXpert-v1.0-small: the exact released layout and header, with phantom radiographs.

    <out_dir>/train.csv, valid.csv
    <out_dir>/train/patient00001/study1/view1_frontal.jpg  (CSV paths: CheXpert-v1.0-small/train/...)

Patients have 1-4 studies; every study has a frontal view and sometimes a lateral one. Labels are
drawn per study, either from built-in approximate CheXpert prevalences or from a real CheXpert
train.csv(.gz) (`labels_from`), and the phantom draws what the labels say (see phantom.py).
Everything is a function of `seed`: the same seed writes byte-identical files.
"""
from __future__ import annotations

import csv
import io
import math
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from .atomic_files import write_bytes
from .chexpert import CHEXPERT_PREFIX, METADATA_COLUMNS
from .csv_table import read_table
from .phantom import Anatomy, render_frontal, render_lateral
from .records import CHEXPERT_OBSERVATIONS

HEADER = list(METADATA_COLUMNS) + list(CHEXPERT_OBSERVATIONS)
# Positive rates used when no real label table is given: generation parameters loosely shaped like
# CheXpert's (common effusion/opacity/devices, rare fracture/pleural other), not measured values.
# "No Finding" is derived: positive when nothing else is positive or uncertain.
PREVALENCE = {
    "Enlarged Cardiomediastinum": 0.05, "Cardiomegaly": 0.12, "Lung Opacity": 0.35, "Lung Lesion": 0.04,
    "Edema": 0.18, "Consolidation": 0.07, "Pneumonia": 0.03, "Atelectasis": 0.12, "Pneumothorax": 0.08,
    "Pleural Effusion": 0.30, "Pleural Other": 0.02, "Fracture": 0.04, "Support Devices": 0.40,
}
UNCERTAIN_RATE = 0.15      # share of mentioned findings written as -1.0
EXPLICIT_NEGATIVE_RATE = 0.2
LATERAL_RATE = 0.12
VALID_SHARE = 0.05         # share of images written to valid.csv (binary labels, own patients)
JPEG_QUALITY = 90


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.1f}"


def _sample_labels(rng: np.random.Generator, binary: bool) -> list[float]:
    labels = []
    for name in CHEXPERT_OBSERVATIONS[1:]:
        if rng.random() < PREVALENCE[name]:
            labels.append(1.0 if binary or rng.random() >= UNCERTAIN_RATE else -1.0)
        elif binary:
            labels.append(0.0)
        else:
            labels.append(0.0 if rng.random() < EXPLICIT_NEGATIVE_RATE else math.nan)
    no_finding = 1.0 if not any(v in (1.0, -1.0) for v in labels) else (0.0 if binary else math.nan)
    return [no_finding] + labels


def load_label_table(path: str) -> list[dict]:
    """Label rows of a real CheXpert train.csv(.gz): sex, age, AP/PA and the 14 observations."""
    rows_iter = read_table(path, HEADER)
    rows = []
    values = {"": math.nan, "1.0": 1.0, "0.0": 0.0, "-1.0": -1.0, "1": 1.0, "0": 0.0, "-1": -1.0}
    for _, row in rows_iter:
        if row["Frontal/Lateral"] != "Frontal" or row["AP/PA"] not in ("AP", "PA") or not row["Age"].isdigit():
            continue
        labels = [values.get(row[c]) for c in CHEXPERT_OBSERVATIONS]
        if None in labels or row["Sex"] not in ("Male", "Female"):
            continue
        rows.append({"sex": row["Sex"], "age": int(row["Age"]), "projection": row["AP/PA"], "labels": labels})
    if not rows:
        raise ValueError(f"{path}: no usable frontal rows")
    return rows


def _plan(n_images: int, rng: np.random.Generator, label_rows: list[dict] | None) -> list[dict]:
    """Who gets which studies and views: a list of image entries, in CSV order."""
    n_valid = n_images // int(1 / VALID_SHARE) if n_images >= 40 else 0
    entries = []
    for split, budget in (("train", n_images - n_valid), ("valid", n_valid)):
        patient_no = 64541 if split == "valid" else 1   # the real release numbers valid after train
        while budget > 0:
            anatomy_seed = int(rng.integers(2**31))
            if label_rows is not None:
                first = label_rows[int(rng.integers(len(label_rows)))]
                sex, age = first["sex"], first["age"]
            else:
                sex = "Male" if rng.random() < 0.59 else "Female"
                age = int(np.clip(rng.normal(61, 17), 18, 90))
            n_studies = min(int(rng.geometric(0.5)) + int(rng.random() < 0.3), 4) if split == "train" else 1
            for study in range(1, n_studies + 1):
                if budget <= 0:
                    break
                if label_rows is not None:
                    row = label_rows[int(rng.integers(len(label_rows)))]
                    labels, projection = list(row["labels"]), row["projection"]
                    if split == "valid":   # valid.csv is binary: uncertain -> positive, blank -> 0
                        labels = [1.0 if v in (1.0, -1.0) else 0.0 for v in labels]
                else:
                    labels = _sample_labels(rng, binary=split == "valid")
                    devices = labels[CHEXPERT_OBSERVATIONS.index("Support Devices")] == 1.0
                    projection = "AP" if devices or rng.random() < 0.8 else "PA"
                views = ["frontal"] + (["lateral"] if budget >= 2 and rng.random() < LATERAL_RATE else [])
                for view_no, view in enumerate(views, start=1):
                    entries.append({
                        "path": f"{split}/patient{patient_no:05d}/study{study}/view{view_no}_{view}.jpg",
                        "split": split, "sex": sex, "age": age + study // 3, "view": view,
                        "projection": projection if view == "frontal" else "", "labels": labels,
                        "anatomy_seed": anatomy_seed, "image_seed": int(rng.integers(2**31))})
                    budget -= 1
            patient_no += 1
    return entries


def _strengths(labels: list[float], rng: np.random.Generator) -> dict[str, float]:
    """Positive -> drawn fully; uncertain -> drawn faintly half of the time (as radiologists hedge)."""
    out = {}
    for name, value in zip(CHEXPERT_OBSERVATIONS, labels):
        if value == 1.0:
            out[name] = 1.0
        elif value == -1.0 and rng.random() < 0.5:
            out[name] = 0.5
    return out


def make_synthetic_chexpert(out_dir: str, n_images: int, seed: int, image_size: int = 320,
                            labels_from: str | None = None, progress: bool = True) -> str:
    """Write a synthetic CheXpert-v1.0-small directory at `out_dir` (its root); returns the root.

    image_size is the image width (height varies with the patient, 1.0-1.25x, as in the release).
    Existing images with the same names are overwritten; the CSVs are written last, atomically.
    """
    if n_images < 1:
        raise ValueError(f"n_images: must be >= 1, got {n_images}")
    if not 32 <= image_size <= 1024:
        raise ValueError(f"image_size: must be in [32, 1024], got {image_size}")
    label_rows = load_label_table(labels_from) if labels_from else None
    rng = np.random.default_rng(seed)
    entries = _plan(n_images, rng, label_rows)
    rows = {"train": [], "valid": []}
    for entry in tqdm(entries, desc="synthetic CheXpert", unit="img", disable=not progress):
        anatomy = Anatomy.sample(np.random.default_rng(entry["anatomy_seed"]), sex=entry["sex"])
        image_rng = np.random.default_rng(entry["image_seed"])
        strengths = _strengths(entry["labels"], image_rng)
        render = render_frontal if entry["view"] == "frontal" else render_lateral
        pixels = render(anatomy, strengths, image_rng, image_size)
        path = os.path.join(out_dir, entry["path"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        write_bytes(path, buffer.getvalue())
        rows[entry["split"]].append([CHEXPERT_PREFIX + entry["path"], entry["sex"], str(entry["age"]),
                                     entry["view"].capitalize(), entry["projection"],
                                     *(_fmt(v) for v in entry["labels"])])
    for split, split_rows in rows.items():
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(split_rows)
        write_bytes(os.path.join(out_dir, f"{split}.csv"), text.getvalue().encode())
    return os.path.abspath(out_dir)
