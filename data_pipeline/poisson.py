"""Poisson-sampled batches for DP-SGD: each training example is in a step's batch independently
with probability q, so the batch size varies (E|B| = qN). This is the sampling the privacy
accountant assumes; the fixed-size batches of data_pipeline.loaders are not.

The global batch of a step is a pure function of (seed, step) and identical on every rank; a rank
takes a strided share of it. Resuming at `start_step` therefore continues the same stream, and
the union of the ranks' shares is the single-process batch.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .augment import AugmentConfig, augment_batch
from .images import to_model_range
from .keyed_random import keyed_rng, keyed_seed

MEMBERSHIP_TAG, AUGMENT_TAG = 0x9015, 0xA06


def poisson_indices(num_examples: int, sample_rate: float, seed: int, step: int) -> torch.Tensor:
    """The global batch of `step`: each example kept independently with prob q; sorted int64 indices."""
    keep = keyed_rng(seed, step, MEMBERSHIP_TAG).random(num_examples) < sample_rate
    return torch.from_numpy(np.flatnonzero(keep)).long()


def shard_indices(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of a global batch (strided, so shares differ in size by at most one)."""
    return indices[rank::world_size]


def poisson_batches(images: np.ndarray | torch.Tensor, tokens: torch.Tensor, sample_rate: float, *, seed: int,
                    rank: int = 0, world_size: int = 1, start_step: int = 0, augment: AugmentConfig | None = None,
                    device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Infinite stream of this rank's (images float [-1,1] [b,1,S,S], tokens [b,L], index [b]) per step.

    images: uint8 [N, S, S] (SplitData.images); b may be 0 on a step. Images and tokens go to
    `device`; the example index stays on the CPU, where per-example randomness is drawn from it.
    `augment` is applied by `augment_batch` with a (seed, step, rank) generator.
    """
    images = torch.as_tensor(images)
    n = images.shape[0]
    step = start_step
    while True:
        idx = shard_indices(poisson_indices(n, sample_rate, seed, step), rank, world_size)
        x = to_model_range(images[idx])
        if augment is not None and len(idx):
            x = augment_batch(x, augment, torch.Generator().manual_seed(keyed_seed(seed, step, rank, AUGMENT_TAG)))
        yield x.to(device), tokens[idx].to(device), idx
        step += 1
