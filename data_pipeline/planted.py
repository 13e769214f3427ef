"""Planted duplicates: memorization ground truth with controls matched in token frequency.

K training images are each repeated C times and given a dedicated prompt token (`plantNNN`).
K control tokens (`ctrlNNN`) are each attached to C *distinct* images. Both kinds of token are
equally rare (C occurrences), so a detector that flags planted tokens but not controls is
detecting memorization of a duplicated image, not the rarity of a token.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .records import XrayRecord

PLANTED_PREFIX = "plant"
CONTROL_PREFIX = "ctrl"


def plant_duplicates(records: Sequence[XrayRecord], k: int, copies: int, seed: int) -> tuple[list[XrayRecord], dict]:
    """Return (records with K*C planted copies appended and control tokens attached, manifest).

    Planted images and control images are disjoint, and each is drawn from a different patient
    when there are enough patients. The originals of planted images stay in the set untouched
    (so an image appears C + 1 times: once plainly, C times with its token).
    """
    if k < 0 or copies < 1:
        raise ValueError(f"planted: k must be >= 0 and copies >= 1 (got k={k}, copies={copies})")
    records = list(records)
    needed = k + k * copies
    if needed > len(records):
        raise ValueError(f"planted: k={k}, copies={copies} needs {needed} distinct images, only {len(records)} available")
    rng = np.random.default_rng(seed)
    # Prefer one image per patient so neither planted nor control images share a patient.
    order = rng.permutation(len(records))
    seen, first_of_patient, rest = set(), [], []
    for i in order:
        (rest if records[i].patient_id in seen else first_of_patient).append(int(i))
        seen.add(records[i].patient_id)
    chosen = (first_of_patient + rest)[:needed]
    planted_idx, control_idx = chosen[:k], chosen[k:]
    width = max(3, len(str(max(k - 1, 0))))

    out = list(records)
    manifest = {"k": k, "copies": copies, "seed": seed, "planted": [], "controls": []}
    for j, i in enumerate(planted_idx):
        token = f"{PLANTED_PREFIX}{j:0{width}d}"
        out.extend(records[i].with_extra_tokens((token,)) for _ in range(copies))
        manifest["planted"].append({"token": token, "image_path": records[i].image_path,
                                    "patient_id": records[i].patient_id, "copies": copies})
    for j in range(k):
        token = f"{CONTROL_PREFIX}{j:0{width}d}"
        group = control_idx[j * copies:(j + 1) * copies]
        for i in group:
            out[i] = out[i].with_extra_tokens((token,))
        manifest["controls"].append({"token": token, "image_paths": [records[i].image_path for i in group]})
    return out, manifest


def manifest_tokens(manifest: dict) -> list[str]:
    """Every dedicated token of a manifest (planted first, then controls)."""
    return [p["token"] for p in manifest["planted"]] + [c["token"] for c in manifest["controls"]]
