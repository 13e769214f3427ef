"""What a mitigation run takes from the baseline scan: the prompts, the flagging threshold, the target.

The prompts are the planted prompts plus a seeded sample of their matched controls. The threshold is
calibrated at a target FPR (1%) on the controls' mean scores, then used unchanged for the baseline and
the mitigated audit, so "flagged" means the same before and after. The target of Wen's embedding
optimisation (per element) is the median first-step score of the controls: a planted prompt brought
down to it no longer stands out from prompts of the same token frequency.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from engine.audit.roc import calibrate_threshold


@dataclass
class MitigationCalibration:
    prompts: list[str]        # planted prompts, then the sampled controls (in scan order)
    target_rms: float         # median first-step score of the controls
    threshold: float          # at `fpr` on the controls' mean scores


def calibrate_from_scan(scores_path: str, controls: int = 40, fpr: float = 0.01,
                        seed: int = 0) -> MitigationCalibration:
    """Prompts, target and threshold from a baseline scan with planted/control groups (tools/scan_memorization)."""
    table = pq.read_table(scores_path, columns=["prompt", "group", "score", "first_step_score"]).to_pydict()
    rows = list(zip(table["prompt"], table["group"], table["score"], table["first_step_score"]))
    planted = [r[0] for r in rows if r[1] == "planted"]
    control = [r for r in rows if r[1] == "control"]
    if not planted or not control:
        raise ValueError(f"{scores_path}: no planted/control prompts (was the run trained with data.planted?)")
    rng = np.random.default_rng(seed)
    chosen = [control[i][0] for i in sorted(rng.choice(len(control), min(controls, len(control)), replace=False))]
    target = float(np.median([r[3] for r in control]))
    threshold = calibrate_threshold(np.array([r[2] for r in control]), fpr)
    return MitigationCalibration(planted + chosen, target, threshold)
