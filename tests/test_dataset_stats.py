"""Nearest-other-image correlation: the formula, distinct sampling, both dataset layouts, the tool."""
import csv
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipeline.cache import decode_image
from data_pipeline.dataset_stats import (
    dataset_neighbour_stats,
    detect_format,
    nearest_neighbour_correlation,
    sample_distinct,
)
from data_pipeline.nih import NIH_COLUMNS, read_nih
from data_pipeline.synthetic import make_synthetic_chexpert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slow_nearest(images, groups=None):
    """Reference: np.corrcoef pair by pair."""
    flat = [np.asarray(im, float).ravel() for im in images]
    out = []
    for i, a in enumerate(flat):
        best = -np.inf
        for j, b in enumerate(flat):
            if i != j and (groups is None or groups[i] != groups[j]):
                best = max(best, np.corrcoef(a, b)[0, 1])
        out.append(best)
    return np.array(out)


def test_matches_pairwise_corrcoef_with_and_without_groups():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (8, 8))
    images = np.clip(base + rng.normal(0, 1, (12, 8, 8)) * np.linspace(5, 120, 12)[:, None, None], 0, 255).astype(np.uint8)
    groups = [i // 3 for i in range(12)]
    np.testing.assert_allclose(nearest_neighbour_correlation(images), slow_nearest(images), atol=1e-12)
    np.testing.assert_allclose(nearest_neighbour_correlation(images, groups), slow_nearest(images, groups), atol=1e-12)
    # Correlation ignores brightness and contrast: an image and a rescaled copy are at r = 1.
    pair = np.stack([base, base * 0.5 + 40])
    np.testing.assert_allclose(nearest_neighbour_correlation(pair), [1.0, 1.0])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        nearest_neighbour_correlation(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="image 1 is constant"):
        nearest_neighbour_correlation(np.stack([np.arange(16.0), np.full(16, 7.0)]))


def write_nih(root, n, duplicate_of=None):
    """A minimal NIH layout: n random 48 px PNGs, two per patient; file i copies file duplicate_of[i]."""
    os.makedirs(os.path.join(root, "images"))
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        name = f"{i // 2:08d}_{i % 2:03d}.png"
        path = os.path.join(root, "images", name)
        if duplicate_of and i in duplicate_of:
            shutil.copy(os.path.join(root, "images", rows[duplicate_of[i]][0]), path)
        else:
            Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(path)
        rows.append([name, "No Finding", str(i % 2), str(i // 2 + 1), "50", "F", "PA"])
    with open(os.path.join(root, "Data_Entry_2017.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(NIH_COLUMNS)
        writer.writerows(rows)


def test_nih_layout_distinct_sample_and_reference(tmp_path):
    root = str(tmp_path / "nih")
    write_nih(root, 20, duplicate_of={5: 2, 9: 2, 13: 4})
    assert detect_format(root) == "nih"
    stats = dataset_neighbour_stats(root, size=16, n=400, seed=3)
    assert stats.any_image.n == 17 and stats.n_available == 20        # three byte-identical copies dropped
    digests = {hashlib.sha256(open(p, "rb").read()).digest() for p in stats.paths}
    assert len(digests) == 17
    images = np.stack([decode_image(p, 16) for p in stats.paths])
    expect = slow_nearest(images)
    assert stats.any_image.median == pytest.approx(np.median(expect))
    assert stats.any_image.p05 == pytest.approx(np.percentile(expect, 5))
    patients = [os.path.basename(p)[:8] for p in stats.paths]
    assert stats.other_patient.median == pytest.approx(np.median(slow_nearest(images, patients)))
    # The sample is seeded: same seed, same images; n caps it.
    assert dataset_neighbour_stats(root, size=16, n=400, seed=3).paths == stats.paths
    assert len(sample_distinct(read_nih(root).records, 5, seed=0)) == 5


def test_chexpert_layout_reads_frontal_train_images(tmp_path):
    root = make_synthetic_chexpert(str(tmp_path / "CheXpert-v1.0-small"), 40, seed=2, image_size=40, progress=False)
    assert detect_format(root) == "chexpert"
    stats = dataset_neighbour_stats(root, size=16, n=400)
    with open(os.path.join(root, "train.csv")) as f:
        frontal = [r for r in csv.DictReader(f) if r["Frontal/Lateral"] == "Frontal"]
    assert stats.n_available == len(frontal) == stats.any_image.n
    assert all(p.endswith("_frontal.jpg") and "/train/" in p for p in stats.paths)
    with pytest.raises(ValueError, match="neither an NIH table"):
        detect_format(str(tmp_path))


def test_tool_prints_the_distribution(tmp_path):
    root = str(tmp_path / "nih")
    write_nih(root, 10)
    tool = os.path.join(REPO, "tools", "dataset_stats")
    out = subprocess.run([sys.executable, tool, root, "--size", "16", "--images", "8"],
                         capture_output=True, text=True, check=True).stdout
    s = dataset_neighbour_stats(root, size=16, n=8)
    assert f"median {s.any_image.median:.3f}  p05 {s.any_image.p05:.3f}" in out and "(nih): 8 distinct images" in out
    bad = subprocess.run([sys.executable, tool, str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode != 0 and "neither an NIH table" in bad.stderr
