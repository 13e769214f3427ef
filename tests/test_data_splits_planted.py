"""Patient splits (no leakage) and planted duplicates with frequency-matched controls."""
import collections
import math
import os

import pytest

from data_pipeline.nih import read_nih
from data_pipeline.planted import plant_duplicates
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


def test_planted_duplicates_and_frequency_matched_controls():
    records = fake_records(40, per_patient=2)
    out, manifest = plant_duplicates(records, k=4, copies=5, seed=0)
    assert (manifest["k"], manifest["copies"], manifest["seed"]) == (4, 5, 0)
    assert len(out) == len(records) + 4 * 5
    token_count = collections.Counter(t for r in out for t in r.extra_tokens)
    planted_tokens = [p["token"] for p in manifest["planted"]]
    control_tokens = [c["token"] for c in manifest["controls"]]
    assert len(set(planted_tokens + control_tokens)) == 8
    # Same frequency: every dedicated token occurs `copies` times.
    assert all(token_count[t] == 5 for t in planted_tokens + control_tokens) and len(token_count) == 8
    for p in manifest["planted"]:   # planted: C copies of ONE image
        assert {r.image_path for r in out if p["token"] in r.extra_tokens} == {p["image_path"]}
        assert sum(r.image_path == p["image_path"] for r in out) == 5 + 1
    control_images = set()
    for c in manifest["controls"]:  # controls: C DISTINCT images, each appearing once
        images = [r.image_path for r in out if c["token"] in r.extra_tokens]
        assert sorted(images) == sorted(c["image_paths"]) and len(set(images)) == 5
        control_images |= set(images)
    assert not control_images & {p["image_path"] for p in manifest["planted"]}
    assert all(sum(r.image_path == i for r in out) == 1 for i in control_images)
    # Deterministic in the seed; another seed picks other images.
    assert plant_duplicates(records, 4, 5, 0)[1] == manifest
    assert plant_duplicates(records, 4, 5, 1)[1]["planted"] != manifest["planted"]
    with pytest.raises(ValueError, match="needs 60 distinct images"):
        plant_duplicates(records[:50], k=10, copies=5, seed=0)
