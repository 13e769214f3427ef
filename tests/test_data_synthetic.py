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
from data_pipeline.dataset_stats import dataset_neighbour_stats
from data_pipeline.phantom import Anatomy, Frame, Study, render_frontal
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


def paired_change(finding, n=6, width=128):
    """Per pair (same patient, same study, with and without `finding`): the brightening's centroid in
    body coordinates (x: image left -> right, y: shoulders -> abdomen, relative to the diaphragm),
    the darkening's centroid, and the share of the change that brightens."""
    out = []
    for i in range(n):
        anatomy = Anatomy.sample(np.random.default_rng(100 + i))
        study = Study.sample(np.random.default_rng(i))            # what render_frontal draws first
        frame = Frame(width, anatomy.aspect, study)
        plain = render_frontal(anatomy, {}, np.random.default_rng(i), width).astype(float)
        diff = render_frontal(anatomy, {finding: 1.0}, np.random.default_rng(i), width).astype(float) - plain
        up, down = np.clip(diff, 0, None), np.clip(-diff, 0, None)
        dia = anatomy.diaphragm + study.inspiration
        centre = lambda w: ((w * frame.X).sum() / max(w.sum(), 1e-9), (w * frame.Y).sum() / max(w.sum(), 1e-9) - dia)
        out.append((centre(up), centre(down), up.sum() / max(up.sum() + down.sum(), 1e-9)))
    return out


@pytest.mark.parametrize("finding, brighter_at", [
    # (x range, y range relative to the diaphragm) where the added density is centred
    ("Cardiomegaly", ((0.1, 0.7), (-0.3, 0.02))),                # the heart grows toward the patient's left, low
    ("Pleural Effusion", ((-0.8, 0.8), (-0.25, 0.05))),           # basal fluid
    ("Consolidation", ((-0.8, 0.8), (-0.6, 0.0))),                # inside the lungs
    ("Edema", ((-0.2, 0.2), (-0.5, -0.1))),                       # bilateral, perihilar
    ("Enlarged Cardiomediastinum", ((-0.15, 0.15), (-0.6, -0.25))),  # upper mediastinum
])
def test_anatomy_follows_labels(finding, brighter_at):
    """Same patient and study with and without the finding: it brightens, where the anatomy says."""
    (x0, x1), (y0, y1) = brighter_at
    for (cx, cy), _, share in paired_change(finding):
        assert share > 0.5 and x0 < cx < x1 and y0 < cy < y1, (finding, cx, cy, share)


def test_pneumothorax_darkens_the_upper_lateral_lung():
    for _, (cx, cy), share in paired_change("Pneumothorax"):
        assert share < 0.5 and 0.2 < abs(cx) < 0.9 and cy < -0.2, (cx, cy, share)


def test_support_devices_and_pneumothorax_visible():
    anatomy = Anatomy.sample(np.random.default_rng(5))
    plain = render_frontal(anatomy, {}, np.random.default_rng(0), 160).astype(float)
    devices = render_frontal(anatomy, {"Support Devices": 1.0}, np.random.default_rng(0), 160).astype(float)
    assert (devices - plain).max() > 60                                   # a radiopaque line or electrode
    ptx = render_frontal(anatomy, {"Pneumothorax": 1.0}, np.random.default_rng(0), 160).astype(float)
    assert (ptx - plain).min() < -20                                      # an air rim darker than lung


# --- Phantoms as varied as patients (issue 14) --------------------------------------------------

NIH_SAMPLE = os.path.join(os.path.dirname(REPO), "shared", "data", "nih-cxr14-sample")
# Nearest-other-image pixel correlation of the NIH ChestX-ray14 sample (1,607 images at 256 px):
# (median, 5th percentile) over 400 distinct images drawn with seed 0, resized to S px by
# cache.decode_image. Measured 2026-12-01 with `tools/dataset_stats ../shared/data/nih-cxr14-sample`.
# (Issue 14's 0.873 / 0.732 at 32 px are the first 400 rows in CSV order; 20 seeded samples span
# medians 0.873-0.885 and 5th percentiles 0.741-0.768.)
RECORDED_NIH = {32: (0.882, 0.756), 64: (0.864, 0.739)}
MEDIAN_TOLERANCE, P05_TOLERANCE = 0.04, 0.06   # issue 14's target


@pytest.fixture(scope="module")
def demo_phantoms(tmp_path_factory):
    """The demo's synthetic set (tools/demo): 500 images, seed 0, generated 64 px wide."""
    root = tmp_path_factory.mktemp("demo") / "CheXpert-v1.0-small"
    return make_synthetic_chexpert(str(root), 500, seed=0, image_size=64, progress=False)


def assert_as_varied_as(phantoms, reference, size):
    median, p05 = reference
    s = dataset_neighbour_stats(phantoms, "chexpert", size=size).any_image
    assert s.n == 400
    assert abs(s.median - median) <= MEDIAN_TOLERANCE and abs(s.p05 - p05) <= P05_TOLERANCE, (
        f"{size} px: phantoms median {s.median:.3f} p05 {s.p05:.3f}, NIH median {median:.3f} p05 {p05:.3f}")


@pytest.mark.parametrize("size", [32, 64])
def test_phantoms_as_varied_as_recorded_nih(demo_phantoms, size):
    assert_as_varied_as(demo_phantoms, RECORDED_NIH[size], size)


@pytest.mark.parametrize("size", [32, 64])
def test_phantoms_as_varied_as_live_nih(demo_phantoms, size):
    if not os.path.isdir(NIH_SAMPLE):
        pytest.skip(f"NIH sample not found at {NIH_SAMPLE}: compared with the recorded figures only")
    live = dataset_neighbour_stats(NIH_SAMPLE, "nih", size=size).any_image
    # The recorded figures must still be what the data gives (else the offline test checks a stale target).
    assert (live.median, live.p05) == pytest.approx(RECORDED_NIH[size], abs=0.005)
    assert_as_varied_as(demo_phantoms, (live.median, live.p05), size)


CLASSES = (None, "Cardiomegaly", "Pleural Effusion", "Edema", "Support Devices")


def one_finding_phantoms(per_class, seed):
    """Random patients and studies, each with no finding or exactly one, 64 px wide, resized to 32."""
    x, y = [], []
    for i in range(per_class * len(CLASSES)):
        c = i % len(CLASSES)
        anatomy = Anatomy.sample(np.random.default_rng([seed, i, 0]))
        img = render_frontal(anatomy, {CLASSES[c]: 1.0} if c else {}, np.random.default_rng([seed, i, 1]), 64)
        x.append(np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR), np.float32) / 255)
        y.append(c)
    return np.stack(x)[:, None], np.array(y)


def test_findings_learnable_despite_patient_variation():
    """A small CNN trained on 150 phantoms per class separates each main finding from no finding on
    new patients. If patient variation swamped a finding, or the phantom stopped drawing it, its
    AUC would fall towards 0.5. Bar: 0.8 for all four (measured 2026-12-01: cardiomegaly 0.96,
    effusion 0.91, edema 0.98, support devices 0.94)."""
    import torch
    from sklearn.metrics import roc_auc_score
    from torch import nn

    x_train, y_train = one_finding_phantoms(150, seed=1)
    x_test, y_test = one_finding_phantoms(60, seed=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                        nn.Linear(32, len(CLASSES)))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    mean, std = x_train.mean(), x_train.std()
    xt, yt = torch.from_numpy((x_train - mean) / std), torch.from_numpy(y_train)
    order = torch.Generator().manual_seed(0)
    for _ in range(25):
        perm = torch.randperm(len(xt), generator=order)
        for k in range(0, len(xt), 64):
            batch = perm[k:k + 64]
            loss = nn.functional.cross_entropy(net(xt[batch]), yt[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        logp = torch.log_softmax(net(torch.from_numpy((x_test - mean) / std)), 1).numpy()
    aucs = {}
    for c in range(1, len(CLASSES)):
        pair = (y_test == 0) | (y_test == c)
        aucs[CLASSES[c]] = roc_auc_score(y_test[pair] == c, logp[pair, c] - logp[pair, 0])
    print({k: round(v, 3) for k, v in aucs.items()})
    assert min(aucs.values()) >= 0.8, aucs
