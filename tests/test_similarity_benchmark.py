"""The similarity benchmark against known answers: an oracle model that reproduces a chosen image
exactly for each prompt (tests/oracle_model.py: which generation copies what is known), brute-force
nearest neighbours and hand-counted copy decisions."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle_model import oracle_loaded

from data_pipeline.vocab import Vocabulary
from engine.audit.run_data import TrainingImages
from engine.audit.similarity_benchmark import (
    BenchmarkOptions,
    choose_default_metric,
    decision_statistics,
    pixel_metric,
    planted_queries,
    run_benchmark,
    ssim_metric,
)

TOKENS = ("plant000", "plant001", "ctrl000", "ctrl001")
VOCAB = Vocabulary.default(extra_tokens=TOKENS)
BASE = "frontal AP chest x-ray, female, 60s"


def smooth(n: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, 1, 20, 20, generator=g), 5, stride=1)
    x = (x - x.amin((2, 3), keepdim=True)) / (x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True))
    return (x[:, 0] * 255).round().to(torch.uint8).numpy()


@pytest.fixture
def setup(tmp_path):
    train_images = smooth(14, 0)                 # img0..img13; img12, img13 are the near copies of img5
    heldout = smooth(6, 1)
    validation = smooth(6, 2)
    paths = [f"img{i}" for i in range(14)]
    manifest = {"version": 2, "planted": [
        {"token": "plant000", "image_path": "img3", "kind": "exact", "copies": 3},
        {"token": "plant001", "image_path": "img5", "kind": "near", "copies": 2, "copy_paths": ["img12", "img13"]}],
        "controls": [{"token": "ctrl000", "image_paths": ["img7", "img8"]},
                     {"token": "ctrl001", "image_paths": ["img9", "img10"]}]}
    records = ([{"image_path": p, "patient_id": p, "prompt": f"{BASE}: edema"} for p in paths[:12]]
               + [{"image_path": "img3", "patient_id": "img3", "prompt": f"{BASE} | plant000"}] * 3
               + [{"image_path": p, "patient_id": "img5", "prompt": f"{BASE} | plant001"} for p in ("img12", "img13")]
               + [{"image_path": f"img{i}", "patient_id": f"img{i}", "prompt": f"{BASE}: {f} | {t}"}
                  for i, f, t in ((7, "cardiomegaly", "ctrl000"), (8, "pneumonia", "ctrl000"),
                                  (9, "atelectasis", "ctrl001"), (10, "pneumothorax", "ctrl001"))])
    (tmp_path / "splits.json").write_text(json.dumps({"data": {}, "splits": {"train": records}}))
    ids = {t: next(i for i in VOCAB.encode(f"{BASE} | {t}") if i not in VOCAB.encode(BASE)) for t in TOKENS}
    # plant000 -> its source exactly; plant001 -> one of the source's near copies; controls -> held-out images
    loaded = oracle_loaded({ids["plant000"]: train_images[3], ids["plant001"]: train_images[12],
                            ids["ctrl000"]: heldout[0], ids["ctrl001"]: heldout[1]}, VOCAB)
    train = TrainingImages(train_images, ["p"] * 14, paths)
    return SimpleNamespace(run=str(tmp_path), loaded=loaded, train=train, validation=validation, heldout=heldout,
                           manifest=manifest)


def test_planted_queries_reads_v1_and_v2_manifests(setup):
    q = planted_queries(setup.run, setup.train, setup.manifest, controls_per_token=1)
    assert q.group == ["planted", "planted", "control", "control"]
    assert q.kind == ["exact", "near", None, None]
    assert q.targets[:2] == [{3}, {5, 12, 13}]
    v1 = {"planted": [{"token": "plant000", "image_path": "img3", "copies": 3}], "controls": []}
    assert planted_queries(setup.run, setup.train, v1, 2).kind == ["exact"]
    with pytest.raises(ValueError, match="no planted prompt"):
        planted_queries(setup.run, setup.train, {"planted": [], "controls": []}, 2)


def test_oracle_copies_are_found_and_decisions_match_hand_counts(setup):
    opts = BenchmarkOptions(generations=2, steps=4, guidance=1.0, controls_per_token=1, known_copies=10, n_boot=100)
    numbers = run_benchmark(setup.loaded, setup.run, setup.train, setup.validation, setup.heldout, setup.manifest,
                            [pixel_metric(), ssim_metric()], opts)
    images = numbers.pop("_images")
    gen = images["generated"]
    assert np.abs(gen[0].astype(int) - setup.train.images[3]).max() <= 1      # the oracle copies exactly
    for m in ("pixel_correlation", "ssim"):
        r = numbers["retrieval"][m]
        assert r["all"]["recall_at_1"]["mean"] == 1.0 and r["exact"]["recall_at_1"]["n_prompts"] == 1
        assert r["near"]["recall_at_1"]["mean"] == 1.0       # a near copy of the source counts as the source
    # hand count of pixel correlation's calibrated decision: brute-force nearest of every generation
    flat = gen.reshape(-1, 256).astype(np.float64)
    train = setup.train.images.reshape(14, -1).astype(np.float64)
    corr = np.array([[np.corrcoef(g, t)[0, 1] for t in train] for g in flat])
    val = setup.validation.reshape(6, -1).astype(np.float64)
    cal = np.percentile([max(np.corrcoef(t, v)[0, 1] for v in val) for t in train], 95)
    d = numbers["copy_decisions"]["pixel_correlation"]["calibrated"]
    assert d["threshold"] == pytest.approx(cal, abs=1e-5)
    claims = corr.max(1) > cal
    targets = [{3}, {3}, {5, 12, 13}, {5, 12, 13}, set(), set(), set(), set()]
    right = np.array([int(np.argmax(c)) in t for c, t in zip(corr, targets)])
    tp = int((claims & right).sum())
    assert d["n_claims"] == int(claims.sum()) and d["n_positive"] == 4 and d["n_negative"] == 4
    assert d["recall"]["value"] == pytest.approx(tp / 4)
    assert d["precision"]["value"] == pytest.approx(tp / claims.sum())
    assert numbers["default_metric"]["name"] in ("pixel_correlation", "ssim")
    kc = numbers["known_copies"]["pixel_correlation"]
    assert kc["near"]["recall_at_1"]["n"] == 10 and 0 <= kc["near"]["recall_at_1"]["rate"] <= 1


def test_decision_statistics_hand_counts():
    decided = np.array([1, 1, 0, 1, 1, 0], bool)
    correct = np.array([1, 0, 1, 0, 0, 0], bool)
    positive = np.array([1, 1, 1, 0, 0, 0], bool)
    out = decision_statistics(decided, correct, positive, np.arange(6), n_boot=50, seed=0)
    # one right claim (item 0) of four claims; three positives
    assert out["precision"]["value"] == pytest.approx(1 / 4)
    assert out["recall"]["value"] == pytest.approx(1 / 3)
    assert out["f1"]["value"] == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))


def test_default_metric_rule():
    rng = np.random.default_rng(0)
    strong = (rng.random((30, 8)) < 0.8).astype(float)
    weak = (rng.random((30, 8)) < 0.1).astype(float)
    numbers = {"known_copies": {m: {"near": {"recall_at_1": {"rate": r}}} for m, r in
                                (("pixel_correlation", 0.9), ("ssim", 0.95), ("clip", 0.2))}}
    opts = BenchmarkOptions(n_boot=200)
    paired, chosen = choose_default_metric({"pixel_correlation": strong, "ssim": weak, "clip": weak}, numbers, opts)
    assert chosen["name"] == "pixel_correlation" and chosen["tied_with_best"] == ["pixel_correlation"]
    assert paired["differences"]["ssim"]["ci95"][1] < 0
    # tied on generations: the better known-copy retrieval wins
    paired, chosen = choose_default_metric({"pixel_correlation": strong, "ssim": strong.copy(), "clip": weak},
                                           numbers, opts)
    assert chosen["name"] == "ssim" and "not distinguishable" in chosen["reason"]
