"""Validation metrics against known answers: ROC figures, calibration, the Dar threshold, chunked
nearest neighbours, SSIM, NT-Xent and an HTML report that escapes prompts."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.audit.copy_detection import (
    CopyDetectorConfig,
    augment_positive,
    copy_statistics,
    dar_threshold,
    load_copy_detector,
    nt_xent_loss,
    train_copy_detector,
)
from engine.audit.nearest_neighbors import cached_embeddings, topk_neighbors
from engine.audit.roc import calibrate_threshold, roc_metrics
from engine.audit.similarity import pearson_normalize, ssim_pairwise


def test_roc_metrics_known_answer():
    # No ties between positives and negatives, so every count below is by hand.
    pos = np.array([10.55, 9.55, 8.55, 0.25])
    neg = np.arange(100) / 10.0                      # 0.0 .. 9.9
    m = roc_metrics(pos, neg)
    # AUC = P(pos > neg): 10.55 > all 100, 9.55 > 96, 8.55 > 86, 0.25 > 3 -> 285 / 400.
    assert m.auc == pytest.approx(285 / 400)
    # FPR < 1% allows no negative above the threshold: only 10.55 passes -> TPR 0.25.
    assert m.tpr_at_1pct_fpr == pytest.approx(0.25)
    # Balanced accuracy at threshold 8.55: TPR 0.75, FPR 14/100 -> 1 - (0.14 + 0.25) / 2.
    assert m.best_balanced_accuracy == pytest.approx(1 - (0.14 + 0.25) / 2)
    # Brute force over every threshold agrees with the closed forms.
    brute = max(1 - ((neg >= t).mean() + 1 - (pos >= t).mean()) / 2 for t in np.concatenate([pos, neg, [11]]))
    assert m.best_balanced_accuracy == pytest.approx(brute)
    assert roc_metrics(np.array([1.0]), np.array([1.0])).auc == pytest.approx(0.5)  # ties count half


def test_threshold_calibration_at_target_fpr():
    ref = np.random.default_rng(0).permutation(np.arange(200, dtype=float))
    t = calibrate_threshold(ref, 0.01)
    assert t == 197.0                                # 198 and 199 (2 of 200 = 1%) lie strictly above
    assert (ref > t).mean() <= 0.01
    assert (ref > calibrate_threshold(ref, 0.0)).sum() == 0
    assert calibrate_threshold(ref, 0.1) == 179.0


def test_dar_threshold_and_copy_statistics_known_answer():
    # Embeddings built so that correlations are exact: train image i correlates c_i with val image i.
    rng = np.random.default_rng(0)
    d, n = 128, 40
    # Orthonormal rows orthogonal to the all-ones vector: centred, so cosine == Pearson == dot product.
    basis = np.linalg.qr(np.concatenate([np.ones((d, 1)), rng.normal(size=(d, 2 * n + 8))], axis=1))[0].T[1:]
    c = np.linspace(0.1, 0.89, n)
    val = basis[:n]
    train = c[:, None] * val + np.sqrt(1 - c[:, None] ** 2) * basis[n:2 * n]
    best = (pearson_normalize(torch.tensor(train)) @ pearson_normalize(torch.tensor(val)).T).max(1).values.numpy()
    np.testing.assert_allclose(best, c, atol=1e-5)
    thr = dar_threshold(train, val, 95)
    assert thr == pytest.approx(np.percentile(c, 95), abs=1e-5)
    # Generated: an exact copy of train 0, a 0.99-correlated copy of train 5, and an unrelated image.
    gen = np.stack([train[0], 0.99 * train[5] + math.sqrt(1 - 0.99 ** 2) * basis[2 * n], basis[2 * n + 1]])
    stats = copy_statistics(gen, train, thr)
    assert stats["n_copies"] == 2 and stats["copy_fraction"] == pytest.approx(2 / 3)
    assert stats["n_memorized_train"] == 2 and stats["memorized_train_fraction"] == pytest.approx(2 / 40)


def test_chunked_neighbors_equal_brute_force(tmp_path):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(37, 8, generator=g), torch.randn(501, 8, generator=g)
    k[100] = k[7]                                     # a tie: the lower index must come first
    q[3] = k[7]
    v, i = topk_neighbors(q, k.numpy(), 3, query_chunk=5, key_chunk=64)
    full = q @ k.T
    bv, bi = torch.sort(full, dim=1, descending=True, stable=True)
    torch.testing.assert_close(v, bv[:, :3])
    assert torch.equal(i, bi[:, :3])
    assert i[3, 0] == 7 and i[3, 1] == 100
    # Cache: the second call must not recompute; another model key must.
    calls = []
    emb = lambda x: (calls.append(1), x.reshape(len(x), -1)[:, :4].astype(np.float32))[1]  # noqa: E731
    images = np.arange(5 * 16, dtype=np.uint8).reshape(5, 4, 4)
    a = cached_embeddings(str(tmp_path), images, "m1", emb)
    b = cached_embeddings(str(tmp_path), images, "m1", emb)
    cached_embeddings(str(tmp_path), images, "m2", emb)
    assert len(calls) == 2 and np.array_equal(a, b)


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 16, 18, generator=g) * 2 - 1, torch.rand(4, 16, 18, generator=g) * 2 - 1
    b[1] = 0.7 * a[2] + 0.1
    s = ssim_pairwise(a, b)
    for x in range(3):
        for y in range(4):
            ref = structural_similarity(((a[x] + 1) / 2).double().numpy(), ((b[y] + 1) / 2).double().numpy(),
                                        data_range=1.0)
            assert s[x, y].item() == pytest.approx(ref, abs=1e-6)
    # Chunked nearest neighbours with SSIM agree with the full matrix.
    v, i = topk_neighbors(a, b, 2, similarity=ssim_pairwise, query_chunk=2, key_chunk=3)
    assert torch.equal(i, torch.sort(s, dim=1, descending=True, stable=True).indices[:, :2])


def test_nt_xent_matches_explicit_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    t = 0.07
    total = 0.0
    for i in range(8):
        j = (i + 4) % 8
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(8) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    assert nt_xent_loss(z1, z2, t).item() == pytest.approx(total / 8, rel=1e-5)


def test_positive_augmentation_is_flip_or_small_rotation():
    # A left-right ramp: a flip changes it by up to 1.9, a 5-degree turn by < 0.1 (0.7 px at the edge).
    x = torch.linspace(-1, 1, 16).expand(16, 16).reshape(1, 1, 16, 16).repeat(64, 1, 1, 1)
    cfg = CopyDetectorConfig(backbone="tiny")
    y = augment_positive(x, cfg, torch.Generator().manual_seed(0))
    flipped = (y - x.flip(-1)).abs().amax((1, 2, 3)) < 0.2
    same = (y - x).abs().amax((1, 2, 3)) < 0.2
    assert 10 < int(flipped.sum()) < 54 and int(same.sum()) > 5     # ~half flipped, some untouched
    assert bool((flipped | same).all())                              # never more than a 5-degree turn


def test_copy_detector_trains_saves_and_reloads(tmp_path):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 256, (24, 16, 16), dtype=np.uint8), rng.integers(0, 256, (8, 16, 16), dtype=np.uint8)
    det = train_copy_detector(train, val, CopyDetectorConfig(backbone="tiny", epochs=2, batch_size=8), progress=False)
    emb_t, emb_v = det.embed(train), det.embed(val)
    assert emb_t.shape == (24, 128)
    assert det.threshold == pytest.approx(dar_threshold(emb_t, emb_v))
    det.save(str(tmp_path))
    again = load_copy_detector(str(tmp_path))
    np.testing.assert_array_equal(again.embed(train), emb_t)
    assert again.threshold == det.threshold and again.info["best_epoch"] in (0, 1)
