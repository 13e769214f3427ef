"""What a mitigation run takes from the baseline scan: the prompts, the flagging threshold, the target.

Calibration and evaluation never share prompts (engine.audit.planted_truth.prompt_split):
- the threshold flags at most `fpr` (1%) of the CALIBRATION half's non-planted prompts (controls and
  ordinary prompts, a few hundred, so the 1% point is set by more than one score), by mean score;
- the target of Wen's embedding optimisation (per element) is the median first-step score of the
  calibration half's controls: a planted prompt brought down to it no longer stands out from prompts
  of the same token frequency and repetition;
- the audited prompts are the EVALUATION half's planted prompts and controls and a seeded sample of
  its ordinary prompts, so every rate a mitigation audit reports is measured on prompts the threshold
  and target never saw. The threshold is then used unchanged before and after (engine.audit.generation_audit.audit_series).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from engine.audit.planted_truth import prompt_splits
from engine.audit.roc import calibrate_threshold


@dataclass
class MitigationCalibration:
    prompts: list[str]        # evaluation half: planted, controls, sampled ordinary (in scan order)
    target_rms: float         # median first-step score of the calibration half's controls
    threshold: float          # at `fpr` on the calibration half's controls and ordinary prompts
    n_calibration_negatives: int
    n_calibration_controls: int


def calibrate_from_scan(scores_path: str, manifest: dict | None, ordinary: int = 40, fpr: float = 0.01,
                        seed: int = 0) -> MitigationCalibration:
    """Prompts, target and threshold from a baseline scan with planted/control groups (tools/scan_memorization)."""
    table = pq.read_table(scores_path, columns=["prompt", "group", "score", "first_step_score"]).to_pydict()
    prompts, groups = table["prompt"], table["group"]
    halves = prompt_splits(prompts, manifest)
    score, first = np.array(table["score"], np.float64), np.array(table["first_step_score"], np.float64)
    half = np.array(halves)
    group = np.array(groups)
    calibration = (half == "calibration") & (group != "planted")
    controls = (half == "calibration") & (group == "control")
    evaluated = {g: np.flatnonzero((half == "evaluation") & (group == g)) for g in ("planted", "control", "ordinary")}
    if not len(evaluated["planted"]) or not controls.any():
        raise ValueError(f"{scores_path}: no evaluation-half planted prompts or calibration-half controls (was the "
                         f"run trained with data.planted?)")
    rng = np.random.default_rng(seed)
    pool = evaluated["ordinary"]
    sampled = rng.choice(pool, min(ordinary, len(pool)), replace=False) if len(pool) else pool
    chosen = sorted([*evaluated["planted"], *evaluated["control"], *sampled])
    return MitigationCalibration([prompts[i] for i in chosen], float(np.median(first[controls])),
                                 calibrate_threshold(score[calibration], fpr), int(calibration.sum()),
                                 int(controls.sum()))
