"""The copy rule, fixed before any score is looked at: when is a generation a copy of a training image?

A generation is a copy when its highest pixel Pearson correlation to any training image exceeds the
copy threshold; the threshold is Dar et al.'s rule (methods.md section 2) applied to raw pixels: the
95th percentile, over training images, of each one's highest correlation to any held-out image (a
training image that close to an image never trained on is what "similar but not copied" looks like).
A prompt produces copies when at least half of its generations are copies.

Pixels need no learned model, and the threshold comes from real images only (training vs held-out),
never from generations or scores, so the rule cannot be tuned toward a detector. It is the rule behind
the validation's copy rate by score decile and precision of the flagged set, and the dose-response's
copy rates.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.audit.copy_detection import dar_threshold
from engine.audit.nearest_neighbors import topk_neighbors
from engine.audit.similarity import pearson_normalize

RULE = ("a generation is a copy when its highest pixel Pearson correlation to any training image exceeds the "
        "threshold: the 95th percentile, over training images, of each one's highest pixel correlation to any "
        "held-out image (Dar et al.'s rule in pixel space); a prompt produces copies when at least half of its "
        "generations are copies")
PROMPT_SHARE = 0.5


def _pixel_rows(images_u8: np.ndarray) -> torch.Tensor:
    return pearson_normalize(torch.from_numpy(np.asarray(images_u8, np.float32).reshape(len(images_u8), -1)))


def pixel_nearest(images_u8: np.ndarray, train_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(correlation [N], index [N]) of each image's nearest training image by pixel Pearson correlation."""
    values, index = topk_neighbors(_pixel_rows(images_u8), _pixel_rows(train_u8), 1)
    return values[:, 0].numpy().astype(np.float64), index[:, 0].numpy()


def pixel_copy_threshold(train_u8: np.ndarray, heldout_u8: np.ndarray) -> float:
    """The rule's threshold from the training and held-out images (uint8 [N, S, S], [M, S, S])."""
    if len(heldout_u8) == 0:
        raise ValueError("copy rule: no held-out images to calibrate the copy threshold on")
    as_rows = lambda a: np.asarray(a, np.float32).reshape(len(a), -1)  # noqa: E731
    return dar_threshold(as_rows(train_u8), as_rows(heldout_u8))


def prompt_copies(copy_flags: np.ndarray) -> np.ndarray:
    """bool [P] from per-generation copy flags [P, G]: at least half of a prompt's generations are copies."""
    return np.asarray(copy_flags, np.float64).mean(axis=1) >= PROMPT_SHARE
