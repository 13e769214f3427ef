"""Detection metrics of a score that should be higher for memorized prompts, and threshold calibration.

Conventions follow Wen et al. (methods.md §1): a prompt is flagged when its score is strictly above the
threshold; TPR at 1% FPR is the largest TPR over thresholds whose FPR is below 0.01; the best balanced
accuracy is max over thresholds of 1 - (FPR + FNR) / 2.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class RocMetrics:
    auc: float
    tpr_at_1pct_fpr: float
    best_balanced_accuracy: float
    n_positive: int
    n_negative: int

    def to_dict(self) -> dict:
        return asdict(self)


def roc_curve(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for the rule `score >= threshold`, one point per distinct score plus (0, 0).

    Tied scores are one operating point, so the curve never claims an order the scores do not have.
    """
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"roc: need positives and negatives, got {pos.size} and {neg.size}")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("roc: scores contain NaN or infinity")
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    # Counts of scores >= each threshold, by binary search on sorted arrays (O(n log n)).
    tp = pos.size - np.searchsorted(np.sort(pos), thresholds, side="left")
    fp = neg.size - np.searchsorted(np.sort(neg), thresholds, side="left")
    fpr = np.concatenate([[0.0], fp / neg.size])
    tpr = np.concatenate([[0.0], tp / pos.size])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def roc_metrics(positive: np.ndarray, negative: np.ndarray, max_fpr: float = 0.01) -> RocMetrics:
    fpr, tpr, _ = roc_curve(positive, negative)
    auc = float(np.trapezoid(tpr, fpr))
    below = fpr < max_fpr
    return RocMetrics(
        auc=auc,
        tpr_at_1pct_fpr=float(tpr[below].max()) if below.any() else 0.0,
        best_balanced_accuracy=float(np.max(1.0 - (fpr + (1.0 - tpr)) / 2.0)),
        n_positive=int(np.asarray(positive).size),
        n_negative=int(np.asarray(negative).size),
    )


def calibrate_threshold(reference_scores: np.ndarray, target_fpr: float) -> float:
    """The smallest threshold among the reference scores whose FPR (share strictly above it) <= target.

    The reference prompts are taken as non-memorized; flagging `score > threshold` then flags at most
    floor(target_fpr * n) of them.
    """
    ref = np.sort(np.asarray(reference_scores, dtype=np.float64).ravel())[::-1]
    if ref.size == 0:
        raise ValueError("calibrate: no reference scores")
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"calibrate: target FPR must be in [0, 1), got {target_fpr}")
    if not np.isfinite(ref).all():
        raise ValueError("calibrate: reference scores contain NaN or infinity")
    allowed = int(np.floor(target_fpr * ref.size + 1e-9))
    threshold = float(ref[allowed])
    # Ties at the threshold stay unflagged; if the tie block pushes us further, the rule still holds
    # because only values strictly above the threshold are flagged.
    return threshold
