"""Do high memorization scores go with copies? Measured over every scanned prompt, with intervals.

Spearman's rho alone is the wrong summary (at 32 px ordinary prompts' generations also sit near 0.9
pixel correlation to some training image, so the ranks of the bulk drown the tail). Next to it:
- the copy rate by score decile: every scanned prompt ranked by its score, cut into ten equal groups,
  each group's share of generations that are copies (engine.audit.copy_rule), prompt-resampled interval;
- the precision of the flagged set: the threshold flags at most 1% of the calibration half's
  non-planted prompts; among the evaluation half's flagged prompts, the share whose generations are
  copies (a prompt copies when at least half of its generations do), with its Wilson interval and n,
  next to the same share among the unflagged ones and the share of flagged prompts that are planted.
The copy rule is fixed before any score is looked at (its threshold comes from training vs held-out
images only).
"""
from __future__ import annotations

import numpy as np

from engine.audit.copy_rule import RULE, prompt_copies
from engine.audit.intervals import cluster_bootstrap_mean, proportion_interval, spearman_interval
from engine.audit.planted_truth import prompt_splits
from engine.audit.roc import calibrate_threshold

DECILES = 10


def _share(flags: np.ndarray) -> dict:
    k, n = int(np.sum(flags)), int(len(flags))
    return {"rate": k / n if n else None, "ci95": list(proportion_interval(k, n)) if n else [None, None], "k": k,
            "n": n}


def copy_rate_by_decile(score: np.ndarray, copies: np.ndarray) -> list[dict]:
    """Ten equal groups of prompts by score rank (lowest first): score range and copy rate of each."""
    order = np.argsort(score, kind="stable")
    out = []
    for d, rows in enumerate(np.array_split(order, min(DECILES, len(order)))):
        c = cluster_bootstrap_mean(copies[rows])
        out.append({"decile": d + 1, "score_min": float(score[rows].min()), "score_max": float(score[rows].max()),
                    "copy_rate": c["mean"], "ci95": c["ci95"], "n_prompts": c["n_prompts"]})
    return out


def flagged_precision(score: np.ndarray, copies: np.ndarray, prompts: list[str], groups: list[str],
                      manifest: dict | None, fpr: float = 0.01) -> dict:
    """Threshold from calibration-half negatives; copy shares of the evaluation half's flagged and unflagged prompts."""
    groups_a, halves = np.array(groups), np.array(prompt_splits(prompts, manifest))
    calibration = (groups_a != "planted") & (halves == "calibration")
    if not calibration.any():
        return {"note": "no calibration-half negatives: no threshold"}
    threshold = calibrate_threshold(score[calibration], fpr)
    evaluation = halves == "evaluation"
    flagged, copying = evaluation & (score > threshold), prompt_copies(copies)
    unflagged = evaluation & ~flagged
    return {"threshold": threshold, "target_fpr": fpr, "n_calibration_negatives": int(calibration.sum()),
            "flagged_rows": [int(i) for i in np.flatnonzero(flagged)],     # the exposure table's prompts
            "precision": _share(copying[flagged]), "copy_share_unflagged": _share(copying[unflagged]),
            "planted_share_flagged": _share(groups_a[flagged] == "planted"),
            "n_evaluation_prompts": int(evaluation.sum())}


def score_vs_copies(score: np.ndarray, nearest: np.ndarray, copy_threshold: float, prompts: list[str],
                    groups: list[str] | None, manifest: dict | None) -> dict:
    """score [P] of every scanned prompt; nearest [P, G] each generation's highest pixel correlation to
    any training image; the copy rule's threshold. JSON-able."""
    score, nearest = np.asarray(score, np.float64), np.asarray(nearest, np.float64)
    copies = (nearest > copy_threshold).astype(np.float64)
    groups = list(groups) if groups is not None else ["ordinary"] * len(prompts)
    rho = spearman_interval(score, nearest.max(axis=1))
    return {"copy_rule": RULE, "copy_threshold": float(copy_threshold), "n_prompts": int(len(score)),
            "generations": int(nearest.shape[1]),
            "spearman_all_prompts": {**rho, "of": "score vs the prompt's highest nearest-training pixel "
                                                  "correlation, over all scanned prompts"},
            "copy_rate_all": cluster_bootstrap_mean(copies)["mean"],
            "copy_rate_by_score_decile": copy_rate_by_decile(score, copies),
            "flagged": flagged_precision(score, copies, prompts, groups, manifest)}
