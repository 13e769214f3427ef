"""Every memorization detector by name, and which of them a given model can use.

| detector                    | null branch | input                  | forwards per prompt  | method            |
|-----------------------------|-------------|------------------------|----------------------|-------------------|
| wen_trajectory              | yes         | guided generations     | 2 G S                | Wen et al.        |
| first_step_wen              | yes         | pure noise, 1 step     | 2 G                  | Wen et al.        |
| anisotropy (fitted)         | yes         | pure noise, 2 t        | 4 G                  | Asthana & B.      |
| nemo_consistency            | no          | pure noise, 1 step     | G                    | Hintersdorf et al.|
| generation_spread           | no          | generations            | G S (x2 if guided)   | Carlini et al.    |
| nearest_training_similarity | no          | generations + training | G S (x2 if guided)   | copy detection    |
| nn_ratio                    | no          | generations + training | G S (x2 if guided)   | Gu et al.         |

A model trained with conditioning.p_uncond = 0 has no trained null branch: only the detectors marked
"no" apply to it (and its generations are made at w = 1).
"""
from __future__ import annotations

from engine.audit.detectors.anisotropy import Anisotropy
from engine.audit.detectors.base import Detector
from engine.audit.detectors.first_step import FirstStepWen
from engine.audit.detectors.generation_spread import GenerationSpread
from engine.audit.detectors.nearest_training import NearestNeighbourRatio, NearestTrainingSimilarity
from engine.audit.detectors.nemo import NemoConsistency
from engine.audit.detectors.wen_trajectory import WenTrajectory
from engine.model.null_condition import null_condition

DETECTORS: dict[str, Detector] = {d.name: d for d in (
    WenTrajectory(), FirstStepWen(), Anisotropy(), NemoConsistency(), GenerationSpread(),
    NearestTrainingSimilarity(), NearestNeighbourRatio())}


def applicable(detector: Detector, loaded) -> bool:
    """Whether `detector` means anything for this model: a detector that needs the null condition does
    not apply to a model trained with p_uncond = 0 (an export that does not record p_uncond is given the
    benefit of the doubt, as engine.model.null_condition does)."""
    return not detector.needs_null_condition or null_condition(loaded).state != "untrained"


def get_detector(name: str) -> Detector:
    if name not in DETECTORS:
        raise ValueError(f"detector: unknown name {name!r} (known: {', '.join(DETECTORS)})")
    return DETECTORS[name]
