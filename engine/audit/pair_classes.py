"""Image pairs of known class (Different / Similar / Duplicate) and the three-class evaluation of
similarity metrics on them (DeepSSIM's protocol, methods.md §3).

How the classes are made, from held-out images (never the images a metric was trained on), per
anchor image a of patient P (parameters in PairSpec):
- Duplicate: (a, near(a)), near = a rotation of U(-3, 3) degrees, a shift of up to 2% of the width,
  a contrast gamma in [1/1.1, 1.1] and Gaussian noise of std 0.01 (in [0, 1] units): what an
  imperfect copy of a training image looks like.
- Similar: (a, s) with s, half the time, near(lam * a + (1 - lam) * c) for an image c of another
  patient and lam ~ U(0.6, 0.8) (a's anatomy dominates but another patient's is mixed in), and the
  other half a heavy geometric change of a: rotation 8-15 degrees either way, zoom 1.1-1.2 and a
  shift of 3-6% of the width (the same patient image, clearly re-framed).
- Different: (a, near(c)) for an image c of another patient.
The label is the construction, not any metric's value, so SSIM itself is evaluated, not assumed.

Scores map to classes by the DeepSSIM scale (Different <= 0.6 < Similar <= 0.85 < Duplicate) —
"fixed" — and by two thresholds fitted per metric to maximise macro-F1 on a calibration half of the
anchors — "calibrated" (pixel correlation, say, is not on SSIM's scale). Both are reported on the
other (evaluation) half only, with intervals from resampling anchors. A binary rule (Dar's copy
threshold) maps to Duplicate / Different and so can never say Similar.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.images import to_model_range, to_uint8
from engine.audit.deepssim import CLASSES, DIFFERENT_AT_MOST, DUPLICATE_ABOVE, classify
from engine.audit.intervals import cluster_bootstrap_statistic
from engine.audit.run_data import read_splits, split_images
from engine.audit.similarity import pearson_normalize, ssim_paired


@dataclass(frozen=True)
class PairSpec:
    near_rotation_deg: float = 3.0
    near_shift: float = 0.02            # fraction of the width
    near_gamma: float = 1.1
    near_noise: float = 0.01            # std in [0, 1] units
    blend: tuple[float, float] = (0.6, 0.8)
    heavy_rotation_deg: tuple[float, float] = (8.0, 15.0)
    heavy_zoom: tuple[float, float] = (1.1, 1.2)
    heavy_shift: tuple[float, float] = (0.03, 0.06)


@dataclass
class PairSet:
    a: np.ndarray          # uint8 [M, S, S]
    b: np.ndarray          # uint8 [M, S, S]
    label: np.ndarray      # int [M]: 0 different, 1 similar, 2 duplicate
    anchor: np.ndarray     # int [M]: index of the anchor image (the bootstrap cluster)
    kind: list[str]        # "near", "blend", "heavy", "other" per pair


def affine(x01: torch.Tensor, angle_deg: torch.Tensor, zoom: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate, zoom in and shift [B, 1, S, S] images (shift [B, 2] in fractions of the size); border fill."""
    theta = angle_deg.double() * math.pi / 180
    cos, sin = torch.cos(theta) / zoom.double(), torch.sin(theta) / zoom.double()
    matrix = torch.stack([torch.stack([cos, -sin, 2 * shift[:, 0].double()], 1),
                          torch.stack([sin, cos, 2 * shift[:, 1].double()], 1)], 1).float()
    grid = F.affine_grid(matrix, list(x01.shape), align_corners=False)
    return F.grid_sample(x01, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def near_duplicate(x01: torch.Tensor, spec: PairSpec, gen: torch.Generator) -> torch.Tensor:
    n = x01.shape[0]
    angle = _uniform(n, -spec.near_rotation_deg, spec.near_rotation_deg, gen)
    shift = _uniform(2 * n, -spec.near_shift, spec.near_shift, gen).view(n, 2)
    out = affine(x01, angle, torch.ones(n, dtype=torch.float64), shift)
    gamma = torch.exp(_uniform(n, -math.log(spec.near_gamma), math.log(spec.near_gamma), gen)).float()
    out = out.clamp(1e-6, 1) ** gamma.view(n, 1, 1, 1)
    return (out + spec.near_noise * torch.randn(out.shape, generator=gen)).clamp(0, 1)


def heavy_change(x01: torch.Tensor, spec: PairSpec, gen: torch.Generator) -> torch.Tensor:
    n = x01.shape[0]
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    angle = sign * _uniform(n, *spec.heavy_rotation_deg, gen)
    zoom = _uniform(n, *spec.heavy_zoom, gen)
    direction = _uniform(n, 0, 2 * math.pi, gen)
    size = _uniform(n, *spec.heavy_shift, gen)
    shift = torch.stack([size * torch.cos(direction), size * torch.sin(direction)], 1)
    return affine(x01, angle, zoom, shift).clamp(0, 1)


def make_pairs(images: np.ndarray, patients: list[str], per_class: int = 1, spec: PairSpec = PairSpec(),
               seed: int = 0) -> PairSet:
    """`per_class` pairs of each class per anchor, every image of `images` (uint8 [N, S, S]) an anchor."""
    n = len(images)
    if n != len(patients):
        raise ValueError(f"pairs: {n} images but {len(patients)} patient ids")
    if len(set(patients)) < 2:
        raise ValueError("pairs: need images of at least two patients (Different and Similar pairs mix patients)")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    patients_arr = np.asarray(patients)
    anchors = np.repeat(np.arange(n), per_class)
    others = np.array([rng.choice(np.flatnonzero(patients_arr != patients_arr[i])) for i in anchors])
    x01 = (to_model_range(images) + 1) / 2                                           # [N, 1, S, S]
    a, c = x01[anchors], x01[others]
    m = len(anchors)
    duplicate = near_duplicate(a, spec, gen)
    lam = _uniform(m, *spec.blend, gen).float().view(m, 1, 1, 1)
    use_blend = torch.rand(m, generator=gen) < 0.5
    similar = torch.where(use_blend.view(m, 1, 1, 1), near_duplicate(lam * a + (1 - lam) * c, spec, gen),
                          heavy_change(a, spec, gen))
    different = near_duplicate(c, spec, gen)
    u8 = lambda t: to_uint8(t * 2 - 1)   # noqa: E731
    a_u8 = u8(a)
    return PairSet(a=np.concatenate([a_u8] * 3), b=np.concatenate([u8(different), u8(similar), u8(duplicate)]),
                   label=np.repeat([0, 1, 2], m), anchor=np.tile(anchors, 3),
                   kind=["other"] * m + ["blend" if b else "heavy" for b in use_blend.tolist()] + ["near"] * m)


def paired_pixel_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    qa, qb = pearson_normalize(to_model_range(a, False)), pearson_normalize(to_model_range(b, False))
    return (qa * qb).sum(1).numpy()


def paired_ssim(a: np.ndarray, b: np.ndarray, chunk: int = 512) -> np.ndarray:
    return np.concatenate([ssim_paired(to_model_range(a[i:i + chunk], False), to_model_range(b[i:i + chunk], False))
                           .numpy() for i in range(0, len(a), chunk)])


def paired_embedding_similarity(emb_a: np.ndarray, emb_b: np.ndarray, pearson: bool) -> np.ndarray:
    """Pearson (Dar) or cosine (DeepSSIM, CLIP) similarity of emb_a[i] with emb_b[i]."""
    ta, tb = torch.as_tensor(emb_a).double(), torch.as_tensor(emb_b).double()
    if pearson:
        ta, tb = ta - ta.mean(1, keepdim=True), tb - tb.mean(1, keepdim=True)
    return F.cosine_similarity(ta, tb, dim=1).numpy()


def confusion(label: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """[3, 3] counts, rows = true class, columns = predicted class."""
    return np.bincount(3 * np.asarray(label) + np.asarray(predicted), minlength=9).reshape(3, 3)


def per_class_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class (0 where undefined, as a class never predicted scores 0)."""
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(3), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(3), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(3), where=precision + recall > 0)
    return precision, recall, f1


def macro_f1(label: np.ndarray, predicted: np.ndarray) -> float:
    return float(per_class_f1(confusion(label, predicted))[2].mean())


def duplicate_f1(label: np.ndarray, predicted: np.ndarray) -> float:
    """F1 of the binary copy decision: Duplicate against the other two classes."""
    return float(per_class_f1(confusion(label == 2, predicted == 2))[2][1]) if len(label) else float("nan")


def fit_thresholds(scores: np.ndarray, label: np.ndarray, candidates: int = 60) -> tuple[float, float]:
    """(lower, upper) maximising macro-F1 over pairs of score quantiles (lower < upper)."""
    grid = np.unique(np.quantile(scores, np.linspace(0, 1, candidates)))
    best, best_pair = -1.0, (DIFFERENT_AT_MOST, DUPLICATE_ABOVE)
    for i, lo in enumerate(grid):
        for hi in grid[i:]:
            f = macro_f1(label, classify(scores, lo, hi))
            if f > best:
                best, best_pair = f, (float(lo), float(hi))
    return best_pair


def _rule_result(label, predicted, anchor, n_boot, seed) -> dict:
    cm = confusion(label, predicted)
    precision, recall, f1 = per_class_f1(cm)
    return {
        "macro_f1": cluster_bootstrap_statistic(anchor, lambda i: macro_f1(label[i], predicted[i]), n_boot, seed),
        "duplicate_f1": cluster_bootstrap_statistic(anchor, lambda i: duplicate_f1(label[i], predicted[i]),
                                                    n_boot, seed),
        "per_class": {c: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                          "n_true": int(cm[k].sum()), "n_predicted": int(cm[:, k].sum())}
                      for k, c in enumerate(CLASSES)},
        "confusion": cm.tolist(),
    }


def three_class_evaluation(pairs: PairSet, scores: dict[str, np.ndarray], binary_rules: dict[str, tuple[str, float]],
                           n_boot: int = 1000, seed: int = 0) -> dict:
    """Every metric's three-class result on the evaluation half of the anchors.

    `scores`: metric name -> score per pair; each gets the fixed DeepSSIM thresholds and thresholds
    calibrated on the calibration half. `binary_rules`: rule name -> (metric name, threshold): a
    binary copy rule (Duplicate above the threshold, else Different).
    """
    anchors = np.unique(pairs.anchor)
    calibration = np.random.default_rng(seed).permutation(anchors)[:len(anchors) // 2]
    is_cal = np.isin(pairs.anchor, calibration)
    ev = ~is_cal
    label, anchor = pairs.label[ev], pairs.anchor[ev]
    out = {"n_pairs_evaluation": int(ev.sum()), "n_anchors_evaluation": int(len(np.unique(anchor))),
           "n_pairs_calibration": int(is_cal.sum()), "n_bootstrap": n_boot,
           "kinds": {k: int(sum(1 for x in pairs.kind if x == k)) for k in sorted(set(pairs.kind))},
           "fixed_thresholds": [DIFFERENT_AT_MOST, DUPLICATE_ABOVE], "metrics": {}, "binary_rules": {}}
    for name, s in scores.items():
        s = np.asarray(s, np.float64)
        lo, hi = fit_thresholds(s[is_cal], pairs.label[is_cal])
        out["metrics"][name] = {
            "median_score_by_class": {c: float(np.median(s[pairs.label == k])) for k, c in enumerate(CLASSES)},
            "fixed": _rule_result(label, classify(s[ev]), anchor, n_boot, seed),
            "calibrated": {"thresholds": [lo, hi], **_rule_result(label, classify(s[ev], lo, hi), anchor, n_boot, seed)},
        }
    for name, (metric, threshold) in binary_rules.items():
        predicted = np.where(np.asarray(scores[metric], np.float64)[ev] > threshold, 2, 0)
        out["binary_rules"][name] = {"metric": metric, "threshold": float(threshold),
                                     **_rule_result(label, predicted, anchor, n_boot, seed)}
    return out


def split_patients(run_dir: str, split: str, paths: list[str]) -> list[str]:
    """Patient id of each image path of a run's split (from splits.json)."""
    records = read_splits(run_dir)["splits"][split]
    patient = {r["image_path"]: r["patient_id"] for r in records}
    return [patient[p] for p in paths]


def evaluate_run(run_dir: str, *, deepssim=None, copy_detector=None, split: str = "test", per_class: int = 4,
                 spec: PairSpec = PairSpec(), seed: int = 0, n_boot: int = 1000, progress: bool = True) -> dict:
    """The three-class evaluation on pairs built from a run's held-out `split` (default: test, which
    neither the diffusion model nor the embedders trained or selected on): pixel correlation, SSIM,
    and DeepSSIM and Dar's rule when given."""
    held_out = split_images(run_dir, split, progress=progress)
    pairs = make_pairs(held_out.images, split_patients(run_dir, split, held_out.image_paths), per_class, spec, seed)
    scores = {"pixel_correlation": paired_pixel_correlation(pairs.a, pairs.b), "ssim": paired_ssim(pairs.a, pairs.b)}
    rules = {}
    if deepssim is not None:
        scores["deepssim"] = paired_embedding_similarity(deepssim.embed(pairs.a), deepssim.embed(pairs.b), False)
    if copy_detector is not None:
        scores["dar_correlation"] = paired_embedding_similarity(copy_detector.embed(pairs.a),
                                                                copy_detector.embed(pairs.b), True)
        if copy_detector.threshold is not None:
            rules["dar_rule"] = ("dar_correlation", copy_detector.threshold)
    result = three_class_evaluation(pairs, scores, rules, n_boot, seed)
    return {"run": run_dir, "split": split, "n_images": int(len(held_out.images)), "pairs_per_class_per_anchor": per_class,
            "pair_spec": asdict(spec), "seed": seed, **result}
