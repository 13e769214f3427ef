"""Train/val/test splits by patient: no patient's images in two splits, or memorization and
generalization cannot be told apart."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .records import XrayRecord

SPLIT_NAMES = ("train", "val", "test")


def split_by_patient(records: Sequence[XrayRecord], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                     seed: int = 0) -> dict[str, list[XrayRecord]]:
    """Assign whole patients to train/val/test with the given fractions of patients.

    Deterministic in (set of patient ids, seed): patients are sorted before the seeded shuffle, so
    the order of `records` does not matter. Records keep their input order inside each split.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions: {fractions!r} must be three non-negative numbers summing to 1")
    patients = sorted({r.patient_id for r in records})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_train = int(round(fractions[0] * len(patients)))
    n_val = min(int(round(fractions[1] * len(patients))), len(patients) - n_train)
    split_of = {}
    for rank, i in enumerate(order):
        split_of[patients[i]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    splits: dict[str, list[XrayRecord]] = {name: [] for name in SPLIT_NAMES}
    for r in records:
        splits[split_of[r.patient_id]].append(r)
    return splits
