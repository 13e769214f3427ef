"""Random streams named by integer keys, e.g. (seed, step, example index, purpose tag).

A stream that is a pure function of its key is what makes training resumable and shardable: the
draws of step s for example i are the same whether the run started at 0 or resumed at s, and
whichever rank or batch position example i lands on. The last key is a constant tag per purpose
(Poisson membership, augmentation, diffusion draws, DP noise), so two purposes never share draws.
"""
from __future__ import annotations

import numpy as np


def keyed_rng(*key: int) -> np.random.Generator:
    """A NumPy generator seeded by the key (each part reduced to 63 bits)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & (2**63 - 1) for k in key]))


def keyed_seed(*key: int) -> int:
    """A 62-bit seed for a torch.Generator or a Philox kernel, drawn from `keyed_rng(*key)`."""
    return int(keyed_rng(*key).integers(2**62))
