"""Summaries and intervals of audit numbers: what the before/after tables and the JSON report."""
from __future__ import annotations

import numpy as np


def distribution_summary(values: np.ndarray) -> dict:
    """n, mean, 5/25/50/75/95th percentiles and every value (for the report's histograms)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"n": 0}
    q = np.percentile(v, [5, 25, 50, 75, 95])
    return {"n": int(v.size), "mean": float(v.mean()), "p05": q[0], "p25": q[1], "median": q[2], "p75": q[3],
            "p95": q[4], "values": v.tolist()}


def prompt_bootstrap_ci(per_prompt: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95% interval of the mean of [P, G] values, resampling whole prompts (a prompt's generations
    share its conditioning, so they are not independent draws)."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(per_prompt), size=(n_boot, len(per_prompt)))
    means = per_prompt.mean(1)[pick].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
