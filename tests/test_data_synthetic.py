"""Synthetic CheXpert: exact layout, determinism, and anatomy that follows the labels."""
import csv
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipeline.chexpert import read_chexpert
from data_pipeline.phantom import Anatomy, render_frontal
from data_pipeline.records import CHEXPERT_OBSERVATIONS
from data_pipeline.synthetic import make_synthetic_chexpert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            h.update(open(path, "rb").read())
    return h.hexdigest()


def test_layout_header_and_reader(tmp_path):
    root = make_synthetic_chexpert(str(tmp_path / "CheXpert-v1.0-small"), 60, seed=3, image_size=64, progress=False)
    with open(os.path.join(root, "train.csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]
    with open(os.path.join(root, "valid.csv")) as f:
        valid = list(csv.reader(f))[1:]
    assert len(rows) - 1 + len(valid) == 60 and len(valid) == 3
    assert all(set(r[5:]) <= {"0.0", "1.0"} for r in valid)          # valid.csv is binary
    for r in rows[1:]:
        assert r[0].startswith("CheXpert-v1.0-small/train/patient") and r[0].endswith(("_frontal.jpg", "_lateral.jpg"))
        assert os.path.isfile(os.path.join(os.path.dirname(root), r[0]))
        assert r[5] in ("", "1.0")                                     # No Finding: 1.0 or blank
    res = read_chexpert(root, views=("frontal", "lateral"))
    assert res.skipped == [] and len(res.records) == len(rows) - 1
    studies = {}
    for r in res.records:
        studies.setdefault(r.patient_id, set()).add(r.study_id)
    assert max(len(s) for s in studies.values()) >= 2                   # several studies per patient
    img = Image.open(res.records[0].image_path)
    assert img.format == "JPEG" and img.mode == "L" and img.size[0] == 64


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_synthetic_chexpert(str(tmp_path / "a"), 12, seed=7, image_size=48, progress=False)
    b = make_synthetic_chexpert(str(tmp_path / "b"), 12, seed=7, image_size=48, progress=False)
    c = make_synthetic_chexpert(str(tmp_path / "c"), 12, seed=8, image_size=48, progress=False)
    assert tree_digest(a) == tree_digest(b) != tree_digest(c)


def test_tool_help_and_run(tmp_path):
    tool = os.path.join(REPO, "tools", "make_synthetic_chexpert")
    out = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True, check=True).stdout
    assert "--labels-from" in out and "--images" in out
    subprocess.run([sys.executable, tool, "--out", str(tmp_path / "d"), "--images", "5", "--seed", "1",
                    "--image-size", "40"], capture_output=True, text=True, check=True)
    assert tree_digest(str(tmp_path / "d")) == tree_digest(make_synthetic_chexpert(str(tmp_path / "e"), 5, 1, 40, progress=False))


def test_labels_from_real_table(tmp_path):
    import gzip
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_OBSERVATIONS)
    row = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,77,Frontal,PA," + ",".join(
        "1.0" if o == "Cardiomegaly" else "" for o in CHEXPERT_OBSERVATIONS)
    path = tmp_path / "chexpert_train.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(header + "\n" + row + "\n")
    root = make_synthetic_chexpert(str(tmp_path / "s"), 6, 0, 48, labels_from=str(path), progress=False)
    records = read_chexpert(root, views=("frontal", "lateral")).records
    assert all(r.findings == ("cardiomegaly",) and r.sex == "female" for r in records)
    assert all(r.projection == "PA" for r in records if r.view == "frontal")


def mean_pair(findings, region, n=6, width=128):
    """Mean intensity in `region` (fractions of H and W) with and without `findings`, same anatomies."""
    with_, without = [], []
    for i in range(n):
        anatomy = Anatomy.sample(np.random.default_rng(100 + i))
        for target, f in ((with_, findings), (without, {})):
            img = render_frontal(anatomy, f, np.random.default_rng(i), width).astype(np.float64)
            h, w = img.shape
            (y0, y1), (x0, x1) = region
            target.append(img[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)].mean())
    return np.array(with_), np.array(without)


@pytest.mark.parametrize("findings, region", [
    ({"Cardiomegaly": 1.0}, ((0.58, 0.7), (0.7, 0.82))),       # the wider heart covers the left lung base
    ({"Pleural Effusion": 1.0}, ((0.62, 0.78), (0.08, 0.92))),  # basal fluid
    ({"Consolidation": 1.0}, ((0.3, 0.75), (0.08, 0.92))),
    ({"Edema": 1.0}, ((0.35, 0.65), (0.2, 0.8))),
])
def test_anatomy_follows_labels(findings, region):
    with_, without = mean_pair(findings, region)
    assert (with_ > without).all(), (with_, without)


def test_support_devices_and_pneumothorax_visible():
    anatomy = Anatomy.sample(np.random.default_rng(5))
    plain = render_frontal(anatomy, {}, np.random.default_rng(0), 160).astype(float)
    devices = render_frontal(anatomy, {"Support Devices": 1.0}, np.random.default_rng(0), 160).astype(float)
    assert (devices - plain).max() > 60                                   # a radiopaque line or electrode
    ptx = render_frontal(anatomy, {"Pneumothorax": 1.0}, np.random.default_rng(0), 160).astype(float)
    assert (ptx - plain).min() < -20                                      # an air rim darker than lung
