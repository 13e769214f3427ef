"""Privacy accounting for DP-SGD: (epsilon, delta) spent so far, through Opacus' accountants.

We keep the accounting in a maintained library rather than re-deriving it: Opacus' PRV accountant
(Gopi et al. 2021, its default and the tighter one) or its RDP accountant (Mironov 2017). Training
with a constant noise multiplier sigma and Poisson sample rate q is one mechanism composed `steps`
times, so the history is a single (sigma, q, steps) entry and the epsilon at any step is one call.

The config gives sigma directly or a target epsilon; in the latter case sigma is solved for the
planned number of steps with `opacus.accountants.utils.get_noise_multiplier` (binary search).

The guarantee is per training example (one image record). A patient with k images in the train
split, or an image duplicated k times, is protected only at the group level (roughly k * epsilon
for small k); deduplicate or sample one image per patient when a per-patient guarantee is wanted.
"""
from __future__ import annotations

import math
import typing
from typing import Literal

Accountant = Literal["prv", "rdp"]
ACCOUNTANTS = typing.get_args(Accountant)


def _check(sample_rate: float, delta: float, accountant: str) -> None:
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"dp.sample_rate: expected 0 < q <= 1, got {sample_rate}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"dp.delta: expected 0 < delta < 1, got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"dp.accountant: expected one of {ACCOUNTANTS}, got {accountant!r}")


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "prv") -> float:
    """epsilon after `steps` Poisson-subsampled Gaussian steps (0 steps -> 0; sigma = 0 -> inf)."""
    _check(sample_rate, delta, accountant)
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import create_accountant  # noqa: PLC0415 - opacus takes seconds to import

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def solve_noise_multiplier(target_epsilon: float, sample_rate: float, steps: int, delta: float,
                           accountant: str = "prv", tolerance: float = 0.01) -> float:
    """The smallest sigma (to `tolerance` in epsilon) whose epsilon after `steps` is <= target."""
    _check(sample_rate, delta, accountant)
    if target_epsilon <= 0:
        raise ValueError(f"dp.target_epsilon: expected > 0, got {target_epsilon}")
    if steps <= 0:
        raise ValueError(f"dp: the planned number of steps must be > 0 to solve sigma, got {steps}")
    from opacus.accountants.utils import get_noise_multiplier  # noqa: PLC0415

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant, epsilon_tolerance=tolerance))


class PrivacyAccountant:
    """Counts DP-SGD steps and answers epsilon(delta); its state is one integer, so resuming is exact."""

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float = 1e-5,
                 accountant: str = "prv", steps: int = 0) -> None:
        _check(sample_rate, delta, accountant)
        self.noise_multiplier, self.sample_rate = float(noise_multiplier), float(sample_rate)
        self.delta, self.accountant, self.steps = float(delta), accountant, int(steps)
        self._cache: tuple[int, float] | None = None

    def step(self, n: int = 1) -> None:
        self.steps += int(n)

    def epsilon(self) -> float:
        # PRV's epsilon costs tens of ms: cache per step count because loggers ask repeatedly.
        if self._cache is None or self._cache[0] != self.steps:
            self._cache = (self.steps, epsilon_for(self.noise_multiplier, self.sample_rate, self.steps,
                                                   self.delta, self.accountant))
        return self._cache[1]

    def summary(self) -> dict:
        return {"epsilon": self.epsilon(), "delta": self.delta, "steps": self.steps,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "accountant": self.accountant}

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self._cache = None
