"""Label conformance: prompt labels, per-finding AUC against sklearn, a classifier that must learn a
visible finding, save/load, and the audit's label-conformance numbers."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from engine.audit.generation_audit import Generations, audit_generations
from engine.audit.label_classifier import (
    LabelClassifier,
    LabelClassifierConfig,
    choose_labels,
    load_label_classifier,
    per_label_auc,
    prompt_labels,
    train_label_classifier,
)
from engine.audit.run_data import RealImages

EFF = "frontal PA chest x-ray, female, 60s: pleural effusion"
EFF_UNC_EDEMA = "frontal PA chest x-ray, male, 40s: pleural effusion, uncertain edema"
PLAIN = "frontal PA chest x-ray, male, 40s"


def test_prompt_labels_and_choice():
    y = prompt_labels([EFF, EFF_UNC_EDEMA, PLAIN], ["edema", "pleural effusion"])
    assert np.isnan(y[1, 0]) and y[0, 0] == 0 and y[2, 0] == 0
    assert y[:, 1].tolist() == [1, 1, 0]
    prompts = [EFF] * 3 + [PLAIN] * 3 + ["frontal PA chest x-ray: edema"] * 2
    assert choose_labels(prompts, 3) == ["pleural effusion"]          # edema: only 2 positives
    assert choose_labels(prompts, 2) == ["edema", "pleural effusion"]


def test_per_label_auc_matches_sklearn():
    rng = np.random.default_rng(0)
    targets = (rng.random((60, 3)) < 0.4).astype(np.float32)
    targets[:5, 1] = np.nan
    targets[:, 2] = 0
    targets[:3, 2] = 1                                           # 3 positives < min_count: not scored
    scores = rng.random((60, 3)) + 0.5 * np.nan_to_num(targets)
    out = per_label_auc(scores, targets, ["a", "b", "c"], min_count=5)
    known = ~np.isnan(targets[:, 1])
    assert out["per_label"]["a"]["auc"] == pytest.approx(roc_auc_score(targets[:, 0], scores[:, 0]))
    assert out["per_label"]["b"]["auc"] == pytest.approx(roc_auc_score(targets[known, 1], scores[known, 1]))
    assert "c" not in out["per_label"] and out["n_labels_scored"] == 2
    assert out["macro_auc"] == pytest.approx((out["per_label"]["a"]["auc"] + out["per_label"]["b"]["auc"]) / 2)


def _images(prompts, seed, size=16):
    """Noise images; 'pleural effusion' draws a bright bar in the lower left (what the phantom does, cruder)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(40, 120, (len(prompts), size, size))
    for i, p in enumerate(prompts):
        if "pleural effusion" in p:
            x[i, size // 2:, : size // 3] += 110
    return np.clip(x, 0, 255).astype(np.uint8)


def test_classifier_learns_a_visible_finding_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    train_p = [EFF if rng.random() < 0.5 else PLAIN for _ in range(96)]
    val_p = [EFF if i % 2 else PLAIN for i in range(24)]
    clf = train_label_classifier(_images(train_p, 0), train_p, _images(val_p, 1), val_p,
                                 LabelClassifierConfig(epochs=12, batch_size=32, width=8, min_count=5), progress=False)
    assert clf.labels == ["pleural effusion"]
    assert clf.info["validation"]["macro_auc"] > 0.95
    test_p = [EFF, PLAIN] * 6
    test_x = _images(test_p, 2)
    assert clf.conformance(test_x, test_p)["macro_auc"] > 0.95
    # Images that ignore their prompt (effusion drawn where it was not asked for) score below chance.
    assert clf.conformance(test_x, [PLAIN, EFF] * 6)["macro_auc"] < 0.05
    clf.save(str(tmp_path / "lc"))
    again = load_label_classifier(str(tmp_path / "lc"))
    assert again.labels == clf.labels
    np.testing.assert_array_equal(again.predict(test_x), clf.predict(test_x))


class _Brightness(torch.nn.Module):
    """A fixed 'classifier': logit = mean pixel value (bright = finding present)."""
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        return x.mean(dim=(1, 2, 3)).unsqueeze(1) * self.scale


def test_audit_reports_conformance_of_generations_and_real_heldout():
    clf = LabelClassifier(_Brightness(), ["pleural effusion"], LabelClassifierConfig(min_count=2))
    dark, bright = np.full((16, 16), 30, np.uint8), np.full((16, 16), 220, np.uint8)
    prompts = [EFF, PLAIN, EFF, PLAIN]
    # Generations: prompts 0 and 1 conform, 2 and 3 are swapped; 2 generations each.
    images = np.stack([np.stack([bright, bright]), np.stack([dark, dark]), np.stack([dark, dark]),
                       np.stack([bright, bright])])
    gen = Generations(prompts, ["ordinary"] * 4, [0, 1, 2, 3], np.ones((4, 2, 2), np.float32), images)
    held = np.stack([bright, dark, bright, dark])
    real = RealImages(np.stack([dark, bright]), ["/a", "/b"], held, [EFF, PLAIN, EFF, PLAIN])
    a = audit_generations(gen, real, label_classifier=clf, threshold=1.0)
    conf = a["quality"]["label_conformance"]
    assert conf["real_heldout"]["macro_auc"] == pytest.approx(1.0)
    # 4 positives (2 bright, 2 dark) vs 4 negatives (2 dark, 2 bright): ties count half -> AUC 0.5.
    want = roc_auc_score([1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 1, 1])
    assert conf["generated"]["macro_auc"] == pytest.approx(want)


def test_network_files_round_trip_and_one_line_errors(tmp_path):
    from engine.model.network_files import load_network, save_network
    net = torch.nn.Linear(3, 2)
    save_network(str(tmp_path), "label_classifier", net, {"labels": ["edema"]})
    state, meta = load_network(str(tmp_path), "label_classifier", "tools/train_label_classifier")
    assert meta == {"labels": ["edema"]} and torch.equal(state["weight"], net.weight.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["label_classifier.json", "label_classifier.safetensors"]
    with pytest.raises(ValueError, match=r"copy_detector\.json: not a memdiff-copy-detector file"):
        (tmp_path / "copy_detector.json").write_text('{"format": "memdiff-label-classifier"}')
        (tmp_path / "copy_detector.safetensors").write_bytes((tmp_path / "label_classifier.safetensors").read_bytes())
        load_network(str(tmp_path), "copy_detector", "tools/train_copy_detector")
    with pytest.raises(ValueError, match=r"nothing/label_classifier\.json: missing \(train one with tools/train_label"):
        load_network(str(tmp_path / "nothing"), "label_classifier", "tools/train_label_classifier")
