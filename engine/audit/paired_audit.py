"""Before/after differences of two audits of the SAME prompts and seeds, with paired bootstrap intervals.

A mitigation audit (engine.audit.generation_audit.audit_series) generates every prompt from the same
seed before and after, so its effect on a prompt is measured on that prompt. Two marginal intervals
would ignore that pairing (and overstate the uncertainty of the difference); each difference here
resamples prompts once for both sides (engine.audit.intervals.paired_difference). Measures, each over
the prompts it concerns (planted, controls or all):
- mean score (Wen's, rms; across guidance weights it is not comparable, as the sweep's page says);
- share flagged at the series' one threshold;
- share of generations whose nearest training image is the planted one (pixels, planted prompts);
- copy rate (share of generations above the audit's copy threshold);
- AUC of planted against control prompts (the AUC recomputed on each paired resample).
"""
from __future__ import annotations

import numpy as np

from engine.audit.intervals import paired_difference
from engine.audit.roc import roc_metrics


def _auc(rows: np.ndarray) -> float:
    """AUC of [score, is_planted] rows; nan when a resample has only one side."""
    pos, neg = rows[rows[:, 1] == 1, 0], rows[rows[:, 1] == 0, 0]
    return roc_metrics(pos, neg).auc if len(pos) and len(neg) else float("nan")


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows])


def paired_differences(before: dict, after: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """after - before for every measure both audits have, each with its paired 95% interval and n."""
    b_rows, a_rows = before["per_prompt"], after["per_prompt"]
    if len(b_rows) != len(a_rows) or [r["seed"] for r in b_rows] != [r["seed"] for r in a_rows]:
        raise ValueError("paired differences: the two audits do not hold the same prompts and seeds")
    group = np.array([r["group"] for r in b_rows])
    out = {}
    for key, label, groups in (("score", "score mean", ("planted", "control")),
                               ("flagged", "flagged", ("planted", "control")),
                               ("nearest_is_planted", "nearest is planted (pixels)", ("planted",)),
                               ("copy_fraction", "copy rate", ("planted", "control", "ordinary", "all"))):
        b_all, a_all = _column(b_rows, key), _column(a_rows, key)
        for name in groups:
            rows = np.ones(len(group), bool) if name == "all" else group == name
            b, a = b_all[rows], a_all[rows]
            if rows.any() and np.isfinite(b).all() and np.isfinite(a).all():
                out[f"{label}, {name}"] = paired_difference(b, a, n_boot=n_boot, seed=seed)
    both = np.isin(group, ("planted", "control"))
    if (group == "planted").any() and (group == "control").any():
        label = (group[both] == "planted").astype(np.float64)
        pairs = lambda rows: np.stack([_column(rows, "score")[both], label], axis=1)  # noqa: E731
        out["AUC planted vs control"] = paired_difference(pairs(b_rows), pairs(a_rows), statistic=_auc,
                                                          n_boot=n_boot, seed=seed)
    return out
