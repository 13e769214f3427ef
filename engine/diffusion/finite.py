"""Non-finite numbers are an error, never a result.

A model with NaN weights (or one whose activations overflow, e.g. under bf16 or an extreme guidance
weight) produces NaN noise predictions: every score is then NaN, which compares false with any
threshold and so reads as "not flagged", and every image converts to black pixels. The places that
produce numbers for people (sampling, the scan, token significance, screening magnitudes, the
audit) check here and stop with one line saying what is not finite and where it came from.
"""
from __future__ import annotations

import numpy as np
import torch


class NonFiniteResult(ValueError):
    """One line: what was not finite, how much of it, and where it came from."""


def require_finite(values: torch.Tensor | np.ndarray, what: str) -> None:
    """Raise NonFiniteResult unless every value is finite; `what` names the values and their source
    ("<file>: the images sampled at w = 7.5")."""
    if isinstance(values, torch.Tensor):
        if not values.is_floating_point():
            return
        ok, n = torch.isfinite(values), values.numel()
        bad = 0 if bool(ok.all()) else int((~ok).sum())
    else:
        values = np.asarray(values)
        if not np.issubdtype(values.dtype, np.floating):
            return
        bad, n = int((~np.isfinite(values)).sum()), values.size
    if bad:
        raise NonFiniteResult(f"{what} are not finite ({bad} of {n} values are NaN or infinite)")


def model_source(model) -> str:
    """The weights file a model was loaded from (engine.model.export.load_model sets it), for messages."""
    return getattr(model, "source", None) or "the model"
