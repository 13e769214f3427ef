"""DeepSSIM and the three-class pair evaluation against independent references: skimage's SSIM,
sklearn's F1, hand-built pairs with known answers, and a training run whose validation error must
fall below the untrained network's."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.audit.deepssim import (
    DeepSSIMConfig,
    augment_view,
    classify,
    draw_pairs,
    load_deepssim,
    pair_loss,
    train_deepssim,
)
from engine.audit.intervals import cluster_bootstrap_statistic
from engine.audit.pair_classes import (
    PairSpec,
    confusion,
    duplicate_f1,
    macro_f1,
    make_pairs,
    paired_embedding_similarity,
    paired_pixel_correlation,
    paired_ssim,
    three_class_evaluation,
)
from engine.audit.similarity import ssim_paired, ssim_pairwise


def smooth_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size] blurred noise: structured enough for SSIM to vary between images."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, 1, size + 4, size + 4, generator=g), 5, stride=1)
    x = (x - x.amin((2, 3), keepdim=True)) / (x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True))
    return (x[:, 0] * 255).round().to(torch.uint8).numpy()


def test_ssim_paired_matches_skimage_and_the_pairwise_diagonal():
    from skimage.metrics import structural_similarity
    a = torch.rand(5, 12, 12) * 2 - 1
    b = (a + 0.3 * torch.randn(5, 12, 12)).clamp(-1, 1)
    got = ssim_paired(a, b)
    assert torch.allclose(got, torch.diagonal(ssim_pairwise(a, b)), atol=1e-6)
    for i in range(5):
        ref = structural_similarity(((a[i] + 1) / 2).double().numpy(), ((b[i] + 1) / 2).double().numpy(),
                                    data_range=1.0)
        assert got[i].item() == pytest.approx(ref, abs=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        ssim_paired(a, b[:4])


def test_augment_view_known_answers():
    x = torch.rand(3, 1, 10, 10) * 2 - 1
    g = torch.Generator().manual_seed(0)
    identity = DeepSSIMConfig(backbone="tiny", flip_p=0.0, rotation_deg=0.0, gamma_max=1.0)
    assert torch.allclose(augment_view(x, identity, g), x.clamp(-1 + 2e-6, 1), atol=1e-5)
    flip = DeepSSIMConfig(backbone="tiny", flip_p=1.0, rotation_deg=0.0, gamma_max=1.0)
    assert torch.allclose(augment_view(x, flip, g), x.flip(-1).clamp(-1 + 2e-6, 1), atol=1e-5)
    # gamma only: every pixel of [0, 1] raised to one power per image, so the order of pixels is kept
    gamma = DeepSSIMConfig(backbone="tiny", flip_p=0.0, rotation_deg=0.0, gamma_max=2.0)
    out = (augment_view(x, gamma, g) + 1) / 2
    x01 = ((x + 1) / 2).clamp_min(1e-6)
    powers = torch.log(out.flatten(1)) / torch.log(x01.flatten(1))
    ok = (x01.flatten(1) < 0.9) & (x01.flatten(1) > 0.1)
    for i in range(3):
        p = powers[i][ok[i]]
        assert p.std() < 1e-3 and 0.5 - 1e-4 <= p.mean() <= 2.0 + 1e-4


def test_draw_pairs_targets_are_the_ssim_of_the_unaugmented_pair():
    images = torch.from_numpy(smooth_images(12)).float().div(127.5).sub(1).unsqueeze(1)
    cfg = DeepSSIMConfig(backbone="tiny", pair_mix=(0.5, 0.0, 0.5))
    a, b, target = draw_pairs(images, torch.arange(12).repeat(4), cfg, torch.Generator().manual_seed(1))
    same = (a == b).flatten(1).all(1)
    assert 0 < same.sum() < len(same)
    assert torch.allclose(target[same], torch.ones(int(same.sum())), atol=1e-6)
    assert (target[~same] < 0.99).all()
    # other pairs are exactly other images of the set, never the anchor itself
    for i in torch.nonzero(~same).flatten().tolist():
        assert any(torch.equal(b[i], images[j]) for j in range(12))
    with pytest.raises(ValueError, match="pair_mix"):
        DeepSSIMConfig(backbone="tiny", pair_mix=(0.5, 0.5, 0.5))


def test_training_lowers_the_validation_error_and_reloads(tmp_path):
    train, val = smooth_images(48, seed=1), smooth_images(16, seed=2)
    cfg = DeepSSIMConfig(backbone="tiny", epochs=8, batch_size=16, lr=3e-3, val_pairs=64, embed_dim=32)
    torch.manual_seed(cfg.seed)
    from engine.audit.copy_detection import build_embedder
    untrained = build_embedder("tiny", 32).eval()
    val_x = torch.from_numpy(val).float().div(127.5).sub(1).unsqueeze(1)
    from engine.audit.deepssim import _validation_pairs
    a, b, t = _validation_pairs(val_x, cfg)
    with torch.no_grad():
        before = float(pair_loss(untrained, a, b, t, cfg, torch.Generator().manual_seed(cfg.seed + 2)))
    model = train_deepssim(train, val, cfg, progress=False)
    assert model.info["best_val_mse"] < 0.5 * before
    model.save(str(tmp_path))
    again = load_deepssim(str(tmp_path))
    assert again.cfg == cfg and again.threshold == 0.85
    assert np.allclose(again.embed(val), model.embed(val), atol=1e-6)
    assert np.allclose(np.linalg.norm(model.embed(val), axis=1), 1.0, atol=1e-5)


def test_classify_uses_the_deepssim_scale():
    assert classify(np.array([-1.0, 0.6, 0.6001, 0.85, 0.8501, 1.0])).tolist() == [0, 0, 1, 1, 2, 2]


def test_pair_classes_known_answers():
    images = smooth_images(6, size=24)
    patients = ["p0", "p0", "p1", "p2", "p3", "p4"]
    zero = PairSpec(near_rotation_deg=0.0, near_shift=0.0, near_gamma=1.0, near_noise=0.0)
    pairs = make_pairs(images, patients, per_class=2, spec=zero, seed=0)
    assert pairs.label.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    dup = pairs.label == 2
    assert np.abs(pairs.a[dup].astype(int) - pairs.b[dup]).max() <= 1        # zero transform: the image itself
    different = np.flatnonzero(pairs.label == 0)
    for i in different:                                                       # another patient's image
        j = next(k for k in range(6) if np.abs(images[k].astype(int) - pairs.b[i]).max() <= 1)
        assert patients[j] != patients[pairs.anchor[i]]
    assert set(pairs.kind[12:24]) <= {"blend", "heavy"}
    with pytest.raises(ValueError, match="two patients"):
        make_pairs(images, ["p"] * 6)
    pc = paired_pixel_correlation(pairs.a, pairs.b)
    assert np.allclose(pc[dup], 1.0, atol=1e-3)
    ref = [np.corrcoef(pairs.a[i].ravel().astype(float), pairs.b[i].ravel().astype(float))[0, 1] for i in range(36)]
    assert np.allclose(pc, ref, atol=1e-5)
    assert np.allclose(paired_ssim(pairs.a, pairs.b, chunk=5), paired_ssim(pairs.a, pairs.b), atol=1e-6)
    e = np.random.default_rng(0).normal(size=(4, 8))
    shifted = e + 3.0
    assert np.allclose(paired_embedding_similarity(e, shifted, pearson=True), 1.0)
    assert not np.allclose(paired_embedding_similarity(e, shifted, pearson=False), 1.0)


def test_f1_matches_sklearn():
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(0)
    label, pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert macro_f1(label, pred) == pytest.approx(f1_score(label, pred, average="macro", labels=[0, 1, 2]))
    assert duplicate_f1(label, pred) == pytest.approx(f1_score(label == 2, pred == 2))
    assert macro_f1(label, np.where(pred == 1, 0, pred)) == pytest.approx(
        f1_score(label, np.where(pred == 1, 0, pred), average="macro", labels=[0, 1, 2], zero_division=0))
    assert confusion(label, pred).sum() == 200


def test_three_class_evaluation_oracle_and_binary_rule():
    images = smooth_images(40, size=16)
    pairs = make_pairs(images, [f"p{i}" for i in range(40)], per_class=1, seed=0)
    oracle = np.array([0.3, 0.7, 0.95])[pairs.label]
    noise = np.random.default_rng(0).uniform(-1, 1, len(pairs.label))
    result = three_class_evaluation(pairs, {"oracle": oracle, "noise": noise}, {"rule": ("oracle", 0.85)}, n_boot=200)
    assert result["n_anchors_evaluation"] == 20 and result["n_pairs_evaluation"] == 60
    assert result["metrics"]["oracle"]["fixed"]["macro_f1"]["value"] == 1.0
    assert result["metrics"]["oracle"]["calibrated"]["macro_f1"]["value"] == 1.0
    assert result["metrics"]["noise"]["calibrated"]["macro_f1"]["value"] < 0.6
    rule = result["binary_rules"]["rule"]          # a binary rule never says Similar
    assert rule["duplicate_f1"]["value"] == 1.0
    # Different: precision 20/40, recall 1 -> F1 2/3; Similar: 0; Duplicate: 1 -> macro 5/9
    assert rule["macro_f1"]["value"] == pytest.approx(5 / 9)


def test_cluster_bootstrap_statistic_matches_the_normal_interval_for_a_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(size=2000)
    out = cluster_bootstrap_statistic(np.arange(2000), lambda i: float(x[i].mean()), n_boot=1000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(2000)
    assert out["value"] == pytest.approx(x.mean())
    assert out["ci95"][0] == pytest.approx(x.mean() - half, abs=0.2 * half)
    assert out["ci95"][1] == pytest.approx(x.mean() + half, abs=0.2 * half)
    # clustered: 100 clusters of 20 identical values have the spread of 100 values, not 2000
    c = np.repeat(np.arange(100), 20)
    v = np.repeat(rng.normal(size=100), 20)
    out = cluster_bootstrap_statistic(c, lambda i: float(v[i].mean()), n_boot=1000)
    assert out["n_clusters"] == 100 and out["n_items"] == 2000
    width = out["ci95"][1] - out["ci95"][0]
    assert width == pytest.approx(2 * 1.96 * v[::20].std(ddof=1) / 10, rel=0.2)


def test_deepssim_neighbours_in_validation_are_the_brute_force_top_scores(tmp_path):
    from engine.audit.copy_detection import build_embedder
    from engine.audit.deepssim import DeepSSIM
    from engine.audit.run_data import TrainingImages
    from engine.audit.validation import ValidationOptions, neighbors_by_metric
    torch.manual_seed(0)
    ds = DeepSSIM(build_embedder("tiny", 16), DeepSSIMConfig(backbone="tiny", embed_dim=16))
    train = TrainingImages(smooth_images(12, seed=3), ["p"] * 12, [f"i{k}" for k in range(12)])
    gen = smooth_images(4, seed=4)
    found = neighbors_by_metric(gen, train, ValidationOptions(neighbors=3, cache_dir=str(tmp_path)), None, None, ds)
    v, i = found["neighbors"]["deepssim"]
    scores = ds.embed(gen) @ ds.embed(train.images).T
    assert np.allclose(v.numpy(), np.sort(scores, 1)[:, ::-1][:, :3], atol=1e-5)
    assert (i[:, 0].numpy() == scores.argmax(1)).all()


def test_deepssim_copy_rule_in_the_before_after_audit():
    from engine.audit.copy_detection import build_embedder
    from engine.audit.deepssim import DeepSSIM
    from engine.audit.generation_audit import Generations, deepssim_copying
    from engine.audit.run_data import RealImages
    torch.manual_seed(0)
    ds = DeepSSIM(build_embedder("tiny", 16), DeepSSIMConfig(backbone="tiny", embed_dim=16))
    train = smooth_images(10, seed=5)
    images = np.stack([train[:3], smooth_images(3, seed=6)])          # prompt 0 copies, prompt 1 does not
    gen = Generations(["a", "b"], ["planted", "control"], [0, 1], np.zeros((2, 3, 1)), images)
    out = deepssim_copying(gen, images.reshape(6, 16, 16), RealImages(train, ["p"] * 10, train[:2]), ds, {})
    best = (ds.embed(images.reshape(6, 16, 16)) @ ds.embed(train).T).max(1)
    assert out["copy_fraction"] == pytest.approx(float((best > 0.85).mean()))
    assert out["copy_fraction_planted"] == pytest.approx(float((best[:3] > 0.85).mean())) == 1.0   # exact copies
    assert out["copy_fraction_control"] == pytest.approx(float((best[3:] > 0.85).mean()))
