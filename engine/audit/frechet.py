"""Fréchet distance between two feature sets (the FID formula, in whatever feature space is given).

    d^2 = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2})

tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}) equals tr((S_a S_b)^{1/2}) (the two matrices are similar), but
the symmetric form is PSD, so a symmetric eigendecomposition gives it without the complex
round-off that a general `sqrtm(S_a S_b)` produces for singular covariances (fewer samples than
feature dimensions is the usual case for small audits). Computed in float64.
"""
from __future__ import annotations

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D], unbiased covariance (N - 1), as FID does."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"frechet: need features [N >= 2, D], got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("frechet: features contain NaN or infinity")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The squared Fréchet (2-Wasserstein) distance between N(mu_a, cov_a) and N(mu_b, cov_b)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.size, mu_a.size):
        raise ValueError(f"frechet: shapes differ: mu {mu_a.shape}/{mu_b.shape}, cov {cov_a.shape}/{cov_b.shape}")
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    tr_cross = float(np.sqrt(np.clip(cross, 0, None)).sum())
    d = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_cross)
    return max(d, 0.0)


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets [N_a, D] and [N_b, D]."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))
