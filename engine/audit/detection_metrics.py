"""How well a memorization score separates planted prompts from the rest: on the evaluation half, with
intervals and n, and the flagging threshold set on the calibration half only.

The halves come from engine.audit.planted_truth.prompt_split. Positives are planted prompts, negatives
their repetition-matched controls or ordinary prompts (and, for v2 manifests, exact and near planted
prompts apart). Each comparison is engine.audit.intervals.detection_summary (AUC with its DeLong
interval, TPR at 1% FPR with a stratified bootstrap interval, best balanced accuracy, n+ and n-) on
evaluation-half prompts only; a comparison with fewer than 2 prompts on either side says so instead.

The operating point is what a user of the scan gets: the threshold that flags at most 1% of the
calibration half's non-planted prompts (controls and ordinary), applied unchanged to the evaluation
half, where the share of planted prompts flagged (TPR) and of controls and ordinary prompts flagged
(FPR) are reported with Wilson intervals and n. TPR at 1% FPR above is the ROC's own operating point
(its threshold chosen on the evaluated negatives, as in Wen et al.), so both are given.
"""
from __future__ import annotations

import numpy as np

from engine.audit.intervals import detection_summary, proportion_interval
from engine.audit.planted_truth import planted_entry, prompt_splits
from engine.audit.roc import calibrate_threshold

SCORES = ("score", "first_step_score")
MIN_PER_SIDE = 2


def prompt_kinds(prompts: list[str], groups: list[str], manifest: dict | None) -> np.ndarray:
    """'exact' / 'near' for planted prompts, '' for the others."""
    out = []
    for prompt, group in zip(prompts, groups):
        entry = planted_entry(prompt, manifest) if group == "planted" else None
        out.append(entry.kind if entry is not None else "")
    return np.array(out)


def comparisons(groups: np.ndarray, halves: np.ndarray, kinds: np.ndarray):
    """(name, positive mask, negative mask) of every comparison, on the evaluation half."""
    evaluation = halves == "evaluation"
    planted = (groups == "planted") & evaluation
    for negatives in ("control", "ordinary"):
        yield f"planted_vs_{negatives}", planted, (groups == negatives) & evaluation
    present = sorted(set(kinds[planted]) - {""})
    if len(present) > 1:
        for kind in present:
            yield f"planted_{kind}_vs_control", planted & (kinds == kind), (groups == "control") & evaluation


def detection_metrics(scores: dict[str, np.ndarray], prompts: list[str], groups: list[str],
                      manifest: dict | None) -> dict:
    """`<score>/<comparison>` -> detection summary (evaluation half), or its n and why it is missing."""
    groups_a, halves = np.array(groups), np.array(prompt_splits(prompts, manifest))
    kinds = prompt_kinds(prompts, groups, manifest)
    out = {}
    for score_name, score in scores.items():
        for name, pos, neg in comparisons(groups_a, halves, kinds):
            key = f"{score_name}/{name}"
            if pos.sum() >= MIN_PER_SIDE and neg.sum() >= MIN_PER_SIDE:
                out[key] = {**detection_summary(score[pos], score[neg]).to_dict(), "half": "evaluation"}
            elif pos.any() or neg.any():
                out[key] = {"n_positive": int(pos.sum()), "n_negative": int(neg.sum()), "half": "evaluation",
                            "note": f"fewer than {MIN_PER_SIDE} evaluation-half prompts on a side: no AUC"}
    return out


def operating_point(score: np.ndarray, prompts: list[str], groups: list[str], manifest: dict | None,
                    fpr: float = 0.01) -> dict:
    """The threshold at `fpr` on calibration-half non-planted prompts, and the evaluation half's flagged
    shares under it (planted: TPR; controls and ordinary: FPR), each with its Wilson interval and n."""
    groups_a, halves = np.array(groups), np.array(prompt_splits(prompts, manifest))
    calibration = (groups_a != "planted") & (halves == "calibration")
    if not calibration.any():
        return {"note": "no calibration-half negatives: no threshold"}
    threshold = calibrate_threshold(score[calibration], fpr)
    out = {"threshold": threshold, "target_fpr": fpr, "n_calibration_negatives": int(calibration.sum()),
           "threshold_from": f"at most {fpr:g} of the calibration half's controls and ordinary prompts above it"}
    for name, label in (("planted", "tpr"), ("control", "fpr_control"), ("ordinary", "fpr_ordinary")):
        rows = (groups_a == name) & (halves == "evaluation")
        k, n = int((score[rows] > threshold).sum()), int(rows.sum())
        out[label] = {"rate": k / n if n else None, "ci95": list(proportion_interval(k, n)) if n else [None, None],
                      "k": k, "n": n}
    return out
