"""Which generations ended as pixel noise? A measurable rule, calibrated on real training images.

A radiograph is spatially coherent: neighbouring pixels are strongly correlated (the NIH sample and
the synthetic phantoms alike: the lowest neighbour correlation of any of their images is far above
0), while a trajectory that failed to converge leaves independent per-pixel noise, whose neighbour
correlation is about 0. The statistic is scale- and offset-free (a saturated or low-contrast image
is not "noise" for that reason alone):

    coherence(x) = mean of the Pearson correlations of (x[i, j], x[i, j+1]) and (x[i, j], x[i+1, j])

Independent pixel noise of variance s2 added to an image of variance v and coherence c0 leaves
coherence c0 * v / (v + s2): at a signal-to-noise ratio SNR = v / s2 the coherence is
c0 * SNR / (1 + SNR). A generation is noise when its coherence is below that of the LEAST coherent
training image at SNR = 1 (as much independent pixel noise as image: half its coherence), and
"noisy" below SNR = 4 (0.8 of it). The thresholds use the training images only, never the
generations they judge. A constant image (no variance) has coherence 0 and counts as noise too.
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


NOISE_SNR, NOISY_SNR = 1.0, 4.0


def noise_threshold(train_images: np.ndarray, snr: float = NOISE_SNR) -> float:
    """Coherence of the least coherent training image with independent noise at `snr` added."""
    if snr <= 0:
        raise ValueError(f"noise snr: expected > 0, got {snr}")
    return float(coherence(train_images).min() * snr / (1 + snr))


def noise_share(images: np.ndarray, threshold: float) -> dict:
    """How many of `images` ([..., S, S]) are noise under `threshold`, with their coherence."""
    flat = np.asarray(images).reshape(-1, *np.asarray(images).shape[-2:])
    c = coherence(flat)
    k = int((c < threshold).sum())
    return {"noise": k, "n": int(len(c)), "share": k / len(c) if len(c) else float("nan"),
            "ci95": list(proportion_interval(k, len(c))), "threshold": threshold,
            "coherence_median": float(np.median(c)) if len(c) else float("nan")}
