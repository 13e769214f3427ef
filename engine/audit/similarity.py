"""Pairwise image/embedding similarities used to compare generated images with training images.

- Pearson correlation: centre and L2-normalise each row, then it is a dot product (Dar et al. compare
  copy-detection embeddings this way; on raw pixels it is the pixel correlation).
- Cosine: L2-normalise, dot product (CLIP).
- SSIM: the exact definition of skimage.metrics.structural_similarity with its defaults (7x7 uniform
  window, K1 = 0.01, K2 = 0.03, sample covariance, mean over the window-valid interior), computed in
  torch for many pairs at once. Images are taken in [-1, 1] and compared in [0, 1] (data_range 1).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

PairSimilarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03


def pearson_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows centred and scaled to unit norm, so that a @ b.T is the Pearson correlation."""
    x = x.reshape(x.shape[0], -1).double()
    x = x - x.mean(dim=1, keepdim=True)
    return (x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()


def cosine_normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(x.shape[0], -1).float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def dot_similarity(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[Q, D] x [K, D] -> [Q, K] for rows already normalised by one of the functions above."""
    return queries @ keys.T


def _ssim_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean and local (unbiased) variance of [N, H, W] images in the 7x7 window interior."""
    x = x.unsqueeze(1)
    mu = F.avg_pool2d(x, SSIM_WINDOW, stride=1)
    n = SSIM_WINDOW * SSIM_WINDOW
    var = (F.avg_pool2d(x * x, SSIM_WINDOW, stride=1) - mu * mu) * (n / (n - 1))
    return mu.squeeze(1), var.squeeze(1)


def ssim_pairwise(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """SSIM of every query against every key: [Q, H, W] x [K, H, W] in [-1, 1] -> [Q, K].

    Memory is Q * K * H * W floats; callers chunk (see engine.audit.nearest_neighbors).
    """
    if queries.shape[-2:] != keys.shape[-2:]:
        raise ValueError(f"ssim: image sizes differ: {tuple(queries.shape[-2:])} vs {tuple(keys.shape[-2:])}")
    if min(queries.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW} px, got {tuple(queries.shape[-2:])}")
    q = (queries.reshape(-1, *queries.shape[-2:]).double() + 1) / 2
    k = (keys.reshape(-1, *keys.shape[-2:]).double() + 1) / 2
    mu_q, var_q = _ssim_stats(q)
    mu_k, var_k = _ssim_stats(k)
    n = SSIM_WINDOW * SSIM_WINDOW
    prod = (q[:, None] * k[None]).flatten(0, 1).unsqueeze(1)           # [Q*K, 1, H, W]
    e_qk = F.avg_pool2d(prod, SSIM_WINDOW, stride=1).reshape(q.shape[0], k.shape[0], *mu_q.shape[-2:])
    mq, mk = mu_q[:, None], mu_k[None]
    cov = (e_qk - mq * mk) * (n / (n - 1))
    return _ssim_index(mq, mk, var_q[:, None], var_k[None], cov)


def _ssim_index(mu_a, mu_b, var_a, var_b, cov) -> torch.Tensor:
    """SSIM from local statistics, averaged over the window-valid interior (last two axes)."""
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(-2, -1)).float()


def ssim_paired(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of a[i] with b[i] only: [N, H, W] x [N, H, W] in [-1, 1] -> [N] (the definition of
    `ssim_pairwise`, without the N x N matrix; NeMo's cross-seed consistency compares many pairs)."""
    if a.shape != b.shape:
        raise ValueError(f"ssim: paired inputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW} px, got {tuple(a.shape[-2:])}")
    x = (a.reshape(-1, *a.shape[-2:]).double() + 1) / 2
    y = (b.reshape(-1, *b.shape[-2:]).double() + 1) / 2
    mu_x, var_x = _ssim_stats(x)
    mu_y, var_y = _ssim_stats(y)
    n = SSIM_WINDOW * SSIM_WINDOW
    e_xy = F.avg_pool2d((x * y).unsqueeze(1), SSIM_WINDOW, stride=1).squeeze(1)
    return _ssim_index(mu_x, mu_y, var_x, var_y, (e_xy - mu_x * mu_y) * (n / (n - 1)))
