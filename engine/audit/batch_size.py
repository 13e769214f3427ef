"""`--batch-prompts auto`: measure, on the device at hand, which number of prompts per forward is fastest.

Bigger batches are not always faster: on a 2-core CPU the demo's batched scan ran 66 s at 32 prompts per
forward against 45 s at 1 (the U-Net's activations outgrow the caches), while a GPU wants the biggest batch
that fits. So the choice is measured, not assumed: each candidate runs the real workload on the first
prompts of the scan (a warm-up call, then the best of `repeats` timed calls), and the candidate with the
most prompts per second wins. The measurement's results are thrown away; it costs a few seconds.
"""
from __future__ import annotations

import time
from typing import Callable

from engine.audit.wen_detector import DetectorSettings, detect

CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128)


def fastest_batch(run: Callable[[int], None], n_prompts: int, candidates: tuple[int, ...] = CANDIDATES,
                  repeats: int = 2, time_budget_s: float = 20.0,
                  clock: Callable[[], float] = time.perf_counter) -> tuple[int, dict[int, float]]:
    """(the batch size with the highest prompts/s, {batch size: prompts/s}) for `run(b)`, which must
    process b prompts. Candidates above n_prompts are skipped; the search stops early once a candidate is
    clearly slower (below 70% of the best so far) or the time budget is spent, since rates rise to one
    peak and then fall. `clock` is the timer (tests drive a simulated one)."""
    if n_prompts < 1:
        raise ValueError("batch size search: no prompts")
    rates: dict[int, float] = {}
    spent = 0.0
    for b in [c for c in candidates if c <= n_prompts] or [n_prompts]:
        run(b)                                          # warm-up: allocator, kernels, caches
        best = float("inf")
        for _ in range(repeats):
            start = clock()
            run(b)
            best = min(best, clock() - start)
        spent += best * (repeats + 1)
        rates[b] = b / max(best, 1e-9)
        if rates[b] < 0.7 * max(rates.values()) or spent > time_budget_s:
            break
    return max(rates, key=rates.get), rates


def fastest_scan_batch(loaded, tokens, settings, n_prompts: int, time_budget_s: float = 10.0) -> tuple[int, dict]:
    """The fastest prompts per forward for the full scan (engine.audit.wen_detector.detect), timed on ONE
    guided step of the first prompts: every sampling step is the same network call, so the ranking of batch
    sizes is the same for any number of steps."""
    cfg = loaded.unet_config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    one_step = DetectorSettings(**{**settings.to_dict(), "steps": 1})
    return fastest_batch(lambda b: detect(loaded.model, loaded.schedule, tokens[:b], list(range(b)), one_step,
                                          image_shape=shape, parameterization=loaded.diffusion_config.parameterization),
                         n_prompts, time_budget_s=time_budget_s)
