"""Was this model's null condition trained? The guard of everything that uses the unconditional branch.

Classifier-free guidance, Wen's magnitude ||eps(x, y) - eps(x, null)||, the anisotropy metric, token
significance and prompt-embedding optimisation all evaluate the model on the null prompt. A model
trained with `conditioning.p_uncond` = 0 never saw that prompt: its NULL embedding is the random
initialisation, so every number computed from it is meaningless, and silently so. The export records
p_uncond in its metadata (engine.training.trainer); this module reads it and refuses such a model for a
use that needs the null branch, unless the user forces it, in which case every output says so.

    record = require_null_condition(loaded, "Wen's score", force=False)   # raises NullConditionError
    write_json(path, {..., **record})                                     # the fact travels with the output
"""
from __future__ import annotations

from dataclasses import dataclass

P_UNCOND_KEY = "conditioning.p_uncond"


class NullConditionError(ValueError):
    """A use that needs the unconditional branch was asked of a model trained without it."""


@dataclass(frozen=True)
class NullCondition:
    p_uncond: float | None      # from the export's metadata; None when the export does not record it

    @property
    def state(self) -> str:
        """'trained' (p_uncond > 0), 'untrained' (p_uncond == 0) or 'unknown' (not recorded)."""
        if self.p_uncond is None:
            return "unknown"
        return "trained" if self.p_uncond > 0 else "untrained"


def null_condition(loaded) -> NullCondition:
    """The null condition of an exported model (engine.model.export.LoadedModel), from its metadata."""
    value = (loaded.metadata or {}).get("p_uncond")
    return NullCondition(None if value is None else float(value))


def refusal_message(path, needed_by: str) -> str:
    """The one-line error for a model trained with p_uncond = 0 (tests compare it exactly)."""
    return (f"{path}: {needed_by} needs the null condition, but this model was trained with "
            f"{P_UNCOND_KEY} = 0 (its null prompt was never trained); use a detector that needs no null "
            f"condition (tools/benchmark_detectors lists them) or --force to proceed anyway")


def require_null_condition(loaded, needed_by: str, force: bool = False) -> dict:
    """Refuse (NullConditionError) a model trained with p_uncond = 0 for `needed_by`, unless `force`.

    Returns the record every output of the use must carry: p_uncond, the state ('trained', 'untrained',
    'unknown') and `forced_without_null_condition` (True only when a p_uncond = 0 model was forced).
    An export that does not record p_uncond passes with state 'unknown' (and a `note` saying so): such
    exports predate the record, and refusing them would lock out every model exported before it.
    """
    nc = null_condition(loaded)
    if nc.state == "untrained" and not force:
        raise NullConditionError(refusal_message(loaded.path, needed_by))
    record = {"p_uncond": nc.p_uncond, "null_condition": nc.state,
              "forced_without_null_condition": nc.state == "untrained"}
    if nc.state == "unknown":
        record["note"] = (f"{loaded.path}: the export does not record {P_UNCOND_KEY}; whether its null "
                          f"condition was trained is unknown, so {needed_by} may be meaningless")
    return record
