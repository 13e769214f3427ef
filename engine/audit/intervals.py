"""Every reported rate comes with its 95% interval and its n (methods.md section 7).

- `proportion_interval(k, n)`: Wilson score interval of a rate over n independent trials.
- `cluster_bootstrap_mean(values)`: mean of [P, G] values with a percentile interval from resampling
  whole rows (prompts): a prompt's G generations share its conditioning and are not independent.
- `auc_interval(pos, neg)`: AUC with DeLong's variance (normal interval, clipped to [0, 1]).
- `tpr_at_fpr_interval(pos, neg)`: TPR at FPR < 1% with a stratified bootstrap interval, and the n
  that set it (at 1% FPR the operating point is fixed by floor(0.01 n-) negative scores).
- `detection_summary(pos, neg)`: both of the above and the best balanced accuracy, as one record.
- `paired_difference(before, after)`: after - before on the SAME prompts (and seeds), with a paired
  bootstrap interval that resamples prompts once for both sides.
- `spearman_interval(x, y)`: Spearman's rho with a bootstrap interval over pairs.
- `distribution_summary(values)`: n, mean, percentiles and the values themselves (for histograms).
- `cluster_bootstrap_statistic(clusters, statistic)`: any statistic of items (F1, macro-F1), with an
  interval from resampling whole clusters (prompts, anchor images).

Bootstrap intervals are percentile intervals from `n_boot` seeded resamples, so a report is
reproducible; the resample count and seed are recorded where they are used.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from scipy.stats import norm, rankdata, spearmanr

from engine.audit.roc import roc_metrics

Z95 = float(norm.ppf(0.975))
N_BOOT = 2000


def proportion_interval(k: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of k successes in n trials ((nan, nan) for n = 0)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= k <= n:
        raise ValueError(f"proportion: k = {k} outside [0, {n}]")
    p, z2 = k / n, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return (float(lo), float(hi))


def cluster_bootstrap_mean(values: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Mean of `values` [P] or [P, G] and a 95% interval resampling the P rows (prompts)."""
    v = np.asarray(values, np.float64)
    rows = v.reshape(len(v), -1).mean(1) if v.ndim > 1 else v
    if rows.size == 0:
        return {"mean": float("nan"), "ci95": [float("nan")] * 2, "n_prompts": 0, "n_values": 0}
    pick = np.random.default_rng(seed).integers(0, rows.size, size=(n_boot, rows.size))
    return {"mean": float(v.mean()), "ci95": list(_percentile_interval(rows[pick].mean(1))),
            "n_prompts": int(rows.size), "n_values": int(v.size)}


def _delong_components(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components V10 [m] (per positive) and V01 [n] (per negative),
    from midranks: V10_i = P(neg < pos_i) + 0.5 P(neg == pos_i), likewise V01_j."""
    m, n = pos.size, neg.size
    all_ranks = rankdata(np.concatenate([pos, neg]))
    pos_ranks, neg_ranks = all_ranks[:m], all_ranks[m:]
    v10 = (pos_ranks - rankdata(pos)) / n
    v01 = 1.0 - (neg_ranks - rankdata(neg)) / m
    return float(v10.mean()), v10, v01


def auc_interval(positive: np.ndarray, negative: np.ndarray) -> dict:
    """AUC, its DeLong standard error and a 95% interval on the logit scale (delta method).

    The logit interval stays inside (0, 1) and covers better than the plain normal one near AUC 1
    with few positives. Coverage measured on binormal data (400 data sets per cell, 200 negatives):
    40 positives, 94% at AUC 0.86 and 91-93% at AUC 0.95; 10-20 positives at AUC 0.95, 87-89% (the
    plain normal interval: 81% at 10 positives). Few positives undercover whatever the method, so
    the n is always reported beside the interval.
    """
    pos, neg = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    if pos.size < 2 or neg.size < 2:
        raise ValueError(f"auc interval: need at least 2 positives and 2 negatives, got {pos.size} and {neg.size}")
    auc, v10, v01 = _delong_components(pos, neg)
    se = float(np.sqrt(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size))
    if se == 0.0 or auc in (0.0, 1.0):   # perfect (or perfectly wrong) separation: no spread to scale
        ci = [auc, auc] if se == 0.0 else [max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se)]
    else:
        logit, se_logit = np.log(auc / (1 - auc)), se / (auc * (1 - auc))
        ci = [float(1 / (1 + np.exp(-(logit + s * Z95 * se_logit)))) for s in (-1, 1)]
    return {"auc": auc, "se": se, "ci95": ci, "method": "DeLong, logit scale", "n_positive": int(pos.size),
            "n_negative": int(neg.size)}


def tpr_at_fpr_interval(positive: np.ndarray, negative: np.ndarray, max_fpr: float = 0.01,
                        n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """TPR at FPR < max_fpr with a stratified bootstrap interval (positives and negatives resampled apart)."""
    pos, neg = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    point = roc_metrics(pos, neg, max_fpr).tpr_at_1pct_fpr
    rng = np.random.default_rng(seed)
    boots = np.array([roc_metrics(rng.choice(pos, pos.size), rng.choice(neg, neg.size), max_fpr).tpr_at_1pct_fpr
                      for _ in range(n_boot)])
    return {"tpr": point, "ci95": list(_percentile_interval(boots)), "max_fpr": max_fpr,
            "n_positive": int(pos.size), "n_negative": int(neg.size),
            "false_positives_allowed": int(np.ceil(max_fpr * neg.size) - 1)}


@dataclass(frozen=True)
class DetectionSummary:
    """A detector's separation of positives (memorized) from negatives, with intervals and n."""
    auc: float
    auc_ci: list[float]
    tpr_at_1pct_fpr: float
    tpr_ci: list[float]
    best_balanced_accuracy: float
    n_positive: int
    n_negative: int

    def to_dict(self) -> dict:
        return asdict(self)


def detection_summary(positive: np.ndarray, negative: np.ndarray, n_boot: int = N_BOOT,
                      seed: int = 0) -> DetectionSummary:
    m = roc_metrics(positive, negative)
    auc = auc_interval(positive, negative)
    tpr = tpr_at_fpr_interval(positive, negative, 0.01, n_boot, seed)
    return DetectionSummary(auc=m.auc, auc_ci=auc["ci95"], tpr_at_1pct_fpr=m.tpr_at_1pct_fpr, tpr_ci=tpr["ci95"],
                            best_balanced_accuracy=m.best_balanced_accuracy, n_positive=m.n_positive,
                            n_negative=m.n_negative)


def paired_difference(before: np.ndarray, after: np.ndarray, statistic: Callable[[np.ndarray], float] | None = None,
                      n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """statistic(after) - statistic(before) over the same P prompts (rows of [P] or [P, G] arrays), with
    a paired bootstrap: every resample draws one set of prompts and applies it to both sides.
    The default statistic is the mean."""
    b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"paired difference: {b.shape[0]} prompts before but {a.shape[0]} after")
    stat = statistic or (lambda x: float(np.mean(x)))
    point = stat(a) - stat(b)
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, b.shape[0], b.shape[0])
        boots[i] = stat(a[idx]) - stat(b[idx])
    return {"difference": float(point), "ci95": list(_percentile_interval(boots)), "before": stat(b),
            "after": stat(a), "n_prompts": int(b.shape[0]), "paired": True}


def spearman_interval(x: np.ndarray, y: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Spearman's rho of (x, y) pairs with a 95% bootstrap interval over pairs."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"spearman: {x.size} x values but {y.size} y values")
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": None, "ci95": [None, None], "n": int(x.size)}
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, x.size, x.size)
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boots.append(spearmanr(x[i], y[i]).statistic)
    return {"rho": float(spearmanr(x, y).statistic), "ci95": list(_percentile_interval(np.array(boots))),
            "n": int(x.size)}


def distribution_summary(values: np.ndarray) -> dict:
    """n, mean, 5/25/50/75/95th percentiles and every value (for the report's histograms)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"n": 0}
    q = np.percentile(v, [5, 25, 50, 75, 95])
    return {"n": int(v.size), "mean": float(v.mean()), "p05": q[0], "p25": q[1], "median": q[2], "p75": q[3],
            "p95": q[4], "values": v.tolist()}
def cluster_bootstrap_statistic(clusters: np.ndarray, statistic: Callable[[np.ndarray], float],
                                n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """statistic(item indices) over all items, with a 95% interval from resampling whole clusters.

    For statistics that are not a mean of per-cluster values (F1, macro-F1, precision): `clusters`
    [M] names each item's cluster (the prompt of a generation, the anchor image of a pair); a
    resample draws clusters with replacement and passes the indices of all their items.
    """
    ids = np.asarray(clusters)
    if ids.size == 0:
        return {"value": float("nan"), "ci95": [float("nan")] * 2, "n_clusters": 0, "n_items": 0}
    groups = [np.flatnonzero(ids == c) for c in np.unique(ids)]
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for i in range(n_boot):
        pick = rng.integers(0, len(groups), len(groups))
        boots[i] = statistic(np.concatenate([groups[j] for j in pick]))
    return {"value": float(statistic(np.arange(ids.size))), "ci95": list(_percentile_interval(boots)),
            "n_clusters": len(groups), "n_items": int(ids.size)}
