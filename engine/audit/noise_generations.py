"""Which generations ended as pixel noise? A measurable rule, calibrated on real training images.

A radiograph is spatially coherent: neighbouring pixels are strongly correlated (the NIH sample and
the synthetic phantoms alike: the lowest neighbour correlation of any of their images is far above
0), while a trajectory that failed to converge leaves independent per-pixel noise, whose neighbour
correlation is about 0. The statistic is scale- and offset-free (a saturated or low-contrast image
is not "noise" for that reason alone):

    coherence(x) = mean of the Pearson correlations of (x[i, j], x[i, j+1]) and (x[i, j], x[i+1, j])

A generation is noise when its coherence is below `margin` times the lowest coherence of any training
image (margin 0.5: half as coherent as the least coherent real image). The threshold uses the
training images only, never the generations it judges. A constant image (no variance) has coherence
0 by definition and counts as failed too.
"""
from __future__ import annotations

import numpy as np

from engine.audit.intervals import proportion_interval


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.divide((a * b).sum(1), denom, out=np.zeros(len(a)), where=denom > 0)


def coherence(images: np.ndarray) -> np.ndarray:
    """Neighbouring-pixel correlation [N] of uint8 (or float) [N, S, S] images."""
    x = np.asarray(images, np.float64)
    if x.ndim != 3 or min(x.shape[1:]) < 2:
        raise ValueError(f"coherence: expected [N, S, S] images with S >= 2, got shape {x.shape}")
    n = len(x)
    horizontal = _pearson_rows(x[:, :, :-1].reshape(n, -1), x[:, :, 1:].reshape(n, -1))
    vertical = _pearson_rows(x[:, :-1, :].reshape(n, -1), x[:, 1:, :].reshape(n, -1))
    return (horizontal + vertical) / 2


def noise_threshold(train_images: np.ndarray, margin: float = 0.5) -> float:
    """`margin` x the lowest coherence of any training image."""
    if not 0 < margin <= 1:
        raise ValueError(f"noise margin: expected in (0, 1], got {margin}")
    return float(margin * coherence(train_images).min())


def noise_share(images: np.ndarray, threshold: float) -> dict:
    """How many of `images` ([..., S, S]) are noise under `threshold`, with their coherence."""
    flat = np.asarray(images).reshape(-1, *np.asarray(images).shape[-2:])
    c = coherence(flat)
    k = int((c < threshold).sum())
    return {"noise": k, "n": int(len(c)), "share": k / len(c) if len(c) else float("nan"),
            "ci95": list(proportion_interval(k, len(c))), "threshold": threshold,
            "coherence_median": float(np.median(c)) if len(c) else float("nan")}
