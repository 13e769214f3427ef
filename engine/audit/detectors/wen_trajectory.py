"""Wen et al.'s full score (methods.md section 1) as a detector: the mean over generations AND sampling
steps of ||eps_c - eps_u|| / sqrt(C*H*W) along the guided trajectory.

The magnitudes are recorded by the guided sampler while the generations are made
(engine.audit.detectors.generations), so next to generation-based detectors this score costs nothing
extra; alone, it costs the whole guided sampling run. It is the score of tools/scan_memorization.
"""
from __future__ import annotations

import numpy as np

from engine.audit.detectors.base import Detector, PromptBatch
from engine.audit.wen_detector import DetectorSettings, mean_score


class WenTrajectory(Detector):
    name = "wen_trajectory"
    summary = "Wen et al.: ||eps_c - eps_u|| (rms) averaged over generations and all S guided sampling steps"
    needs_null_condition = True
    needs_generations = True

    def forwards_per_prompt(self, settings: DetectorSettings) -> int:
        return 2 * settings.generations * settings.steps

    def score(self, loaded, batch: PromptBatch, settings: DetectorSettings, *, train=None,
              params: dict | None = None) -> np.ndarray:
        if batch.trajectory_norms is None:
            raise ValueError(f"detector {self.name}: needs the magnitudes recorded along the guided trajectory "
                             f"(make the generations with record_norms=True)")
        return mean_score(batch.trajectory_norms).double().numpy()
