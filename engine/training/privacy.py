"""Privacy accounting for DP-SGD: (epsilon, delta) spent so far, through Opacus' accountants.

We keep the accounting in a maintained library rather than re-deriving it: Opacus' PRV accountant
(Gopi et al. 2021, its default and the tighter one) or its RDP accountant (Mironov 2017). The
history is Opacus' list of (sigma, q, steps) entries; a run at constant sigma and Poisson sample
rate q is one entry, and a resumed run continues the history saved with its checkpoint.

The config gives sigma directly or a target epsilon; in the latter case sigma is solved for the
planned number of steps with `opacus.accountants.utils.get_noise_multiplier` (binary search) once,
at the start of the run, and saved: a resume never re-solves it (changing training.steps on resume
changes how many steps are charged, never the sigma past steps were taken with).

The guarantee is per training record (one row of the train split). A group of k records (an image
duplicated k times, k images of one patient) is protected only at the group level: `group_guarantee`
gives the generic group-privacy bound of (eps, delta)-DP, (k eps, k e^{(k-1) eps} delta) (obtained by
applying the definition k times along a chain of neighbouring datasets; e.g. Vadhan, "The Complexity
of Differential Privacy", 2017), which `group_privacy` reports for the group sizes the train split
holds. No tighter RDP group bound is used. Deduplicate, or sample one image per patient,
when a per-image or per-patient guarantee is wanted.
"""
from __future__ import annotations

import math
import typing
from collections import Counter
from typing import Iterable, Literal

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
    """Counts DP-SGD steps and answers epsilon(delta). Its state is the history of (sigma, q, steps)
    entries, saved with every checkpoint, so a resumed run continues the same history exactly."""

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float = 1e-5,
                 accountant: str = "prv", history: Iterable[Iterable[float]] = ()) -> None:
        _check(sample_rate, delta, accountant)
        self.noise_multiplier, self.sample_rate = float(noise_multiplier), float(sample_rate)
        self.delta, self.accountant = float(delta), accountant
        self.history = [[float(s), float(q), int(n)] for s, q, n in history]
        self._cache: tuple[int, float] | None = None

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def step(self, n: int = 1) -> None:
        if self.history and self.history[-1][:2] == [self.noise_multiplier, self.sample_rate]:
            self.history[-1][2] += int(n)
        else:
            self.history.append([self.noise_multiplier, self.sample_rate, int(n)])

    def epsilon(self) -> float:
        # PRV's epsilon costs tens of ms: cache per step count because loggers ask repeatedly.
        if self._cache is None or self._cache[0] != self.steps:
            self._cache = (self.steps, self._epsilon())
        return self._cache[1]

    def _epsilon(self) -> float:
        if self.steps == 0:
            return 0.0
        if any(s <= 0 for s, _, n in self.history if n > 0):
            return math.inf
        from opacus.accountants import create_accountant  # noqa: PLC0415 - opacus takes seconds to import

        acc = create_accountant(mechanism=self.accountant)
        acc.history = [(s, q, n) for s, q, n in self.history if n > 0]
        return float(acc.get_epsilon(delta=self.delta))

    def summary(self) -> dict:
        return {"epsilon": self.epsilon(), "delta": self.delta, "steps": self.steps,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "accountant": self.accountant, "history": [list(h) for h in self.history]}

    def state_dict(self) -> dict:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "delta": self.delta,
                "accountant": self.accountant, "history": [list(h) for h in self.history]}

    @classmethod
    def from_state(cls, state: dict) -> "PrivacyAccountant":
        """The accountant a checkpoint saved; ValueError (one line) when the state is malformed."""
        try:
            history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
            acc = cls(float(state["noise_multiplier"]), float(state["sample_rate"]), float(state["delta"]),
                      str(state["accountant"]), history)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"privacy state: malformed ({str(exc).splitlines()[0][:80]})") from None
        if not all(math.isfinite(s) and s >= 0 and 0 < q <= 1 and n >= 0 for s, q, n in acc.history):
            raise ValueError("privacy state: history entries must be (sigma >= 0, 0 < q <= 1, steps >= 0)")
        return acc


def group_guarantee(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(epsilon, delta) for a group of k records under (epsilon, delta)-DP: (k eps, k e^{(k-1) eps} delta),
    delta capped at 1 (= no guarantee at that group size)."""
    if k <= 1:
        return epsilon, delta
    exponent = (k - 1) * epsilon
    return k * epsilon, 1.0 if exponent > 700 else min(1.0, k * math.exp(exponent) * delta)


def group_privacy(epsilon: float, delta: float, image_paths: Iterable[str], patient_ids: Iterable[str],
                  planted_manifest: dict | None = None, max_rows: int = 12) -> dict:
    """The group guarantee for the groups the train split holds: copies of one image (same file, or
    a planted duplicate's copies listed in the manifest's `copy_paths`) and images of one patient."""
    source_of = {}
    for entry in (planted_manifest or {}).get("planted", []):
        for path in entry.get("copy_paths", []) or []:
            source_of[path] = entry.get("image_path", path)
    images = Counter(source_of.get(p, p) for p in image_paths)
    patients = Counter(patient_ids)
    largest_image, largest_patient = max(images.values(), default=1), max(patients.values(), default=1)
    sizes = sorted({1, largest_patient} | set(images.values()))
    if len(sizes) > max_rows:   # keep the smallest, the largest and the patient group
        sizes = sorted(set(sizes[:max_rows - 2] + [largest_image, largest_patient]))
    rows = []
    for k in sizes:
        eps_k, delta_k = group_guarantee(epsilon, delta, k)
        rows.append({"k": k, "epsilon": eps_k, "delta": delta_k,
                     "images_with_k_copies": sum(1 for c in images.values() if c == k)})
    return {"bound": "a group of k records (k copies of one image, or k images of one patient) is "
                     "(k*epsilon, k*exp((k-1)*epsilon)*delta)-DP: the generic group-privacy bound of "
                     "(epsilon, delta)-DP, not a tighter RDP group bound; delta 1 = no guarantee",
            "largest_image_group": largest_image, "largest_patient_group": largest_patient,
            "by_group_size": rows}
