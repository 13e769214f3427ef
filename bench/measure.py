"""Timing and statistics shared by the side-by-side benchmarks: interleaved rounds, medians, the
machine's load, and bootstrap intervals for AUCs (methods.md §7: every rate with its interval and n)."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable

import numpy as np

from engine.audit.roc import roc_metrics


def machine() -> dict:
    """Date, CPU, core count and the load average: the figures a timing is read against."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def interleaved(cases: dict[str, Callable[[], None]], rounds: int, calls: int, warmup: int = 1,
                sync: Callable[[], None] = lambda: None, say: Callable[[str], None] = lambda s: None
                ) -> dict[str, list[float]]:
    """Seconds per call of every case, one value per round. Each round runs every case `calls`
    times back to back; the order of the cases rotates from round to round, so a load change on a
    shared machine falls on all cases alike. `warmup` calls of each case run first, untimed."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
        sync()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                cases[name]()
            sync()
            out[name].append((time.perf_counter() - start) / calls)
        say(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {out[n][-1] * 1e3:.0f} ms" for n in names))
    return out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> str:
    """'median [min-max] over n rounds' in ms."""
    return f"{median(values) * 1e3:.1f} ms [{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}, {len(values)} rounds]"


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return roc_metrics(pos, neg).auc


def bootstrap_aucs(scores: dict[str, np.ndarray], positive: np.ndarray, negative: np.ndarray,
                   n_boot: int = 2000, seed: int = 0) -> dict[str, np.ndarray]:
    """AUC of each score on `n_boot` stratified resamples of the prompts (positives and negatives
    resampled separately, the same resample for every score: paired)."""
    rng = np.random.default_rng(seed)
    pos_idx, neg_idx = np.flatnonzero(positive), np.flatnonzero(negative)
    out = {name: np.empty(n_boot) for name in scores}
    for b in range(n_boot):
        p = rng.choice(pos_idx, pos_idx.size)
        n = rng.choice(neg_idx, neg_idx.size)
        for name, s in scores.items():
            out[name][b] = auc(s[p], s[n])
    return out


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
