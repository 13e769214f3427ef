"""Patient splits (no leakage) and planted duplicates v2: doses, exact and near copies, repetition-matched controls."""
import collections
import dataclasses
import math
import os

import numpy as np
import pytest
from PIL import Image

from data_pipeline.config_schema import build
from data_pipeline.images import read_png
from data_pipeline.nih import read_nih
from data_pipeline.planted import PlantedConfig, near_duplicate, plant_duplicates, write_near_copies
from data_pipeline.prompts import prompt_for
from data_pipeline.records import XrayRecord
from data_pipeline.splits import split_by_patient

NIH_SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "nih-cxr14-sample")


def fake_records(n_patients, per_patient=3):
    return [XrayRecord(f"/d/p{p}/s{s}.jpg", f"p{p}", f"p{p}/s{s}", "synthetic", (), (), "frontal", "AP", "male", 50,
                       (math.nan,)) for p in range(n_patients) for s in range(per_patient)]


def assert_no_leakage(splits, records):
    patients = {name: {r.patient_id for r in recs} for name, recs in splits.items()}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"] \
        and not patients["val"] & patients["test"]
    assert sorted(r.image_path for recs in splits.values() for r in recs) == sorted(r.image_path for r in records)


@pytest.mark.skipif(not os.path.isdir(NIH_SAMPLE), reason=f"NIH sample not found at {NIH_SAMPLE}")
def test_nih_sample_split_has_no_patient_in_two_splits():
    records = read_nih(NIH_SAMPLE).records
    follow_ups = collections.Counter(r.patient_id for r in records)
    assert sum(c > 1 for c in follow_ups.values()) > 100                 # the sample really has follow-ups
    splits = split_by_patient(records, (0.8, 0.1, 0.1), seed=0)
    assert_no_leakage(splits, records)
    n_patients = {k: len({r.patient_id for r in v}) for k, v in splits.items()}
    assert n_patients == {"train": round(0.8 * 1283), "val": round(0.1 * 1283), "test": 1283 - 1026 - 128}
    # Every follow-up of a multi-study patient lands in one split.
    where = {r.patient_id: k for k, v in splits.items() for r in v}
    assert all(sum(r.patient_id == p for r in splits[where[p]]) == c for p, c in follow_ups.items())


def test_split_is_seeded_and_order_independent():
    records = fake_records(50)
    a = split_by_patient(records, seed=1)
    assert_no_leakage(a, records)
    b = split_by_patient(list(reversed(records)), seed=1)
    assert {k: {r.patient_id for r in v} for k, v in a.items()} == {k: {r.patient_id for r in v} for k, v in b.items()}
    c = split_by_patient(records, seed=2)
    assert {r.patient_id for r in a["test"]} != {r.patient_id for r in c["test"]}
    with pytest.raises(ValueError, match="split_fractions"):
        split_by_patient(records, (0.5, 0.2, 0.2))


def labelled_records(n_patients, per_patient=2, seed=0):
    """Records with varied prompts (findings, sex, age), so control members can be better or worse matched."""
    rng = np.random.default_rng(seed)
    findings = ("edema", "pleural effusion", "cardiomegaly", "support devices")
    return [XrayRecord(f"/d/p{p}/s{s}.jpg", f"p{p}", f"p{p}/s{s}", "synthetic",
                       tuple(f for f in findings if rng.random() < 0.3), (), "frontal", "AP",
                       ("male", "female")[p % 2], 20 + p % 60, (math.nan,))
            for p in range(n_patients) for s in range(per_patient)]


def planted_config(**kw):
    return build(PlantedConfig, {"k": 3, "copies": [2, 5], "kinds": ["exact", "near"], "seed": 0, **kw},
                 "data.planted")


def test_planted_v2_dose_kinds_and_repetition_matched_controls():
    records = labelled_records(150)
    cfg = planted_config()
    out, manifest = plant_duplicates(records, cfg, "/run/planted_images")
    assert manifest["version"] == 2 and manifest["dose_levels"] == [2, 5] and manifest["kinds"] == ["exact", "near"]
    assert len(out) == len(records) + 3 * 2 * (2 + 5)
    rows = collections.defaultdict(list)
    for r in out:
        for t in r.extra_tokens:
            rows[t].append(r)
    cells = collections.Counter()
    for p in manifest["planted"]:
        mine = rows[p["token"]]
        cells[(p["copies"], p["kind"], p["split"])] += 1
        # token frequency AND prompt repetition: C rows, one prompt text
        assert len(mine) == p["copies"] and {prompt_for(r) for r in mine} == {p["prompt"]}
        assert [r.image_path for r in mine] == p["copy_paths"]
        if p["kind"] == "exact":
            assert p["copy_paths"] == [p["image_path"]] * p["copies"] and "transforms" not in p
        else:   # near: one new file per copy, its own transform
            assert len(set(p["copy_paths"])) == p["copies"] and len(p["transforms"]) == p["copies"]
            assert all(c.startswith("/run/planted_images/" + p["token"]) for c in p["copy_paths"])
        assert sum(r.image_path == p["image_path"] for r in out) == (1 + p["copies"]) * (p["kind"] == "exact") + \
            (p["kind"] == "near")                                   # the original row stays, untouched
    # every (dose, kind) cell holds K = 3 entries, split 1:2 or 2:1 between the halves
    for dose in (2, 5):
        for kind in ("exact", "near"):
            assert sorted(cells[(dose, kind, h)] for h in ("calibration", "evaluation")) == [1, 2]
    halves = collections.Counter(p["split"] for p in manifest["planted"])
    assert halves["calibration"] == halves["evaluation"] == 6
    planted_by_token = {p["token"]: p for p in manifest["planted"]}
    planted_patients = {p["patient_id"] for p in manifest["planted"]}
    used = set()
    for c in manifest["controls"]:
        match = planted_by_token[c["matched_to"]]
        assert (c["copies"], c["split"]) == (match["copies"], match["split"])
        mine = rows[c["token"]]
        assert len(mine) == c["copies"] and {prompt_for(r) for r in mine} == {c["prompt"]}
        assert sorted(r.image_path for r in mine) == sorted(c["image_paths"]) and len(set(c["image_paths"])) == c["copies"]
        assert not {r.patient_id for r in mine} & planted_patients
        assert not used & set(c["image_paths"])
        used |= set(c["image_paths"])
    assert all(sum(r.image_path == i for r in out) == 1 for i in used)   # each control image appears once
    assert len(manifest["controls"]) == len(manifest["planted"])


def mismatch(r, anchor):
    """(differing findings, differing other phrases), from the prompt texts."""
    def split(rec):
        head, _, findings = prompt_for(dataclasses.replace(rec, extra_tokens=())).partition(": ")
        return set(filter(None, findings.split(", "))), set(head.split(", "))
    (fa, ha), (fb, hb) = split(r), split(anchor)
    return len(fa ^ fb), len(ha ^ hb)


def test_control_members_are_the_best_matched_images_left():
    """Every image no control took was open to every control: none may match an anchor's prompt better
    than the members that control took (fewest differing findings, then other phrases), nor match the
    planted source's prompt better than the control's anchor."""
    records = labelled_records(150)
    _, manifest = plant_duplicates(records, planted_config(), "/run/p")
    by_path = {r.image_path: r for r in records}
    taken = {p for c in manifest["controls"] for p in c["image_paths"]}
    planted_patients = {p["patient_id"] for p in manifest["planted"]}
    left = [r for r in records if r.image_path not in taken and r.patient_id not in planted_patients
            and r.image_path not in {p["image_path"] for p in manifest["planted"]}]
    planted_by_token = {p["token"]: p for p in manifest["planted"]}
    for c in manifest["controls"]:
        anchor = by_path[c["image_paths"][0]]
        source = by_path[planted_by_token[c["matched_to"]]["image_path"]]   # the anchor matches its source
        assert mismatch(anchor, source) <= min(mismatch(r, source) for r in left)
        found = [mismatch(by_path[p], anchor) for p in c["image_paths"]]
        assert [f[0] for f in found] == c["label_mismatch"] and [f[1] for f in found] == c["phrase_mismatch"]
        assert max(found[1:]) <= min(mismatch(r, anchor) for r in left)


def test_planted_is_seeded_and_errors_are_one_line():
    records = labelled_records(150)
    a = plant_duplicates(records, planted_config(), "/p")[1]
    assert plant_duplicates(records, planted_config(), "/p")[1] == a
    assert plant_duplicates(records, planted_config(seed=1), "/p")[1]["planted"] != a["planted"]
    with pytest.raises(ValueError, match="12 planted images and 12 controls of 42 images need 54 distinct training images, the train split has 40"):
        plant_duplicates(records[:40], planted_config(), "/p")
    with pytest.raises(ValueError, match="near duplicates need a folder"):
        plant_duplicates(records, planted_config(), None)
    # a single dose and kind (the original design): K images x C exact copies
    out, m = plant_duplicates(records, build(PlantedConfig, {"k": 4, "copies": 5}, "data.planted"))
    assert [(p["copies"], p["kind"]) for p in m["planted"]] == [(5, "exact")] * 4 and len(out) == len(records) + 20


def test_near_duplicate_transform_against_numpy():
    """No change is the identity; a whole-pixel shift is a slice; noise has the drawn sd."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16)).astype(np.uint8)
    none = {"rotation_deg": 0.0, "shift": [0.0, 0.0], "crop": [0.0] * 4, "contrast": 1.0, "brightness": 0.0,
            "noise_std": 0.0, "noise_seed": 1}
    assert np.array_equal(near_duplicate(image, none), image)
    shifted = near_duplicate(image, {**none, "shift": [2 / 16, 0.0]})   # 2 px to the right
    assert np.array_equal(shifted[:, 2:], image[:, :-2])
    flat = np.full((64, 64), 128, np.uint8)
    noisy = near_duplicate(flat, {**none, "noise_std": 0.02}).astype(float)
    assert abs(noisy.std() - 0.02 * 255) < 0.3 and abs(noisy.mean() - 128) < 0.5
    brighter = near_duplicate(flat, {**none, "brightness": 0.1, "contrast": 1.3})
    assert np.all(brighter == 128 + round(0.1 * 255))   # a flat image has no contrast to scale


def test_near_copies_written_once_and_never_overwritten(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src.png"
    Image.fromarray(rng.integers(0, 256, (40, 40)).astype(np.uint8)).save(src)
    records = [dataclasses.replace(r, image_path=str(src)) if i == 0 else r
               for i, r in enumerate(labelled_records(60))]
    cfg = build(PlantedConfig, {"k": 1, "copies": 3, "kinds": ["near"]}, "data.planted")
    # make the planted source our real file, whichever record the seed picks
    _, manifest = plant_duplicates(records, cfg, str(tmp_path / "near"))
    manifest["planted"][0]["image_path"] = str(src)
    assert write_near_copies(manifest) == 3
    for path, t in zip(manifest["planted"][0]["copy_paths"], manifest["planted"][0]["transforms"]):
        assert np.array_equal(read_png(path), near_duplicate(read_png(src), t))
    assert write_near_copies(manifest) == 0                   # a resumed run keeps them
    path = manifest["planted"][0]["copy_paths"][1]
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(path)  # someone else's file under that name
    with pytest.raises(ValueError, match="plant000_c001.png: holds another image"):
        write_near_copies(manifest)
    assert not read_png(path).any()
