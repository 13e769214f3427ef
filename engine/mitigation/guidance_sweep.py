"""Lower guidance as a mitigation: the same prompts and seeds scanned at several guidance weights w.

Each w gets the full audit of engine.audit.generation_audit (score, detection, copy rate, planted
ground truth, Fréchet distance, label conformance), all judged by one flagging threshold. Wen's score
is measured along each w's own guided trajectory, so it is not comparable across w (the page says so);
copying, ground truth and quality are: same prompts, same seeds, same real images.
"""
from __future__ import annotations

import os

from engine.audit.audit_inputs import AuditInputs
from engine.audit.generation_audit import Comparison, audit_series, scan_generations
from engine.audit.prompt_lists import encode_prompts
from engine.audit.wen_detector import DetectorSettings

NOTE = ("Each w is sampled and scored along its own guided trajectory, so Wen's score (and 'flagged') "
        "is not comparable across w: detection is the scan at the default w. The copying, planted "
        "ground-truth and quality rows are comparable: same prompts, same seeds, same real images.")


def guidance_sweep(loaded, inputs: AuditInputs, settings: DetectorSettings, weights: list[float], out_dir: str, *,
                   threshold: float | None = None, target_fpr: float = 0.01, batch_prompts: int = 16,
                   progress: bool = True) -> Comparison:
    """One audit per guidance weight (same prompts, same seeds). Each w scans into out_dir/w<w>/ (resumable);
    one threshold for every w (the given one, else calibrated on the first weight)."""
    if not weights:
        raise ValueError("guidance sweep: no weights")
    encode_prompts(loaded.vocab, inputs.prompts)                     # fail fast on unknown phrases
    gens = []
    for w in weights:
        s = DetectorSettings(**{**settings.to_dict(), "guidance": float(w)})
        gens.append(scan_generations(loaded, inputs.prompts, s, os.path.join(out_dir, f"w{w:g}"),
                                     manifest=inputs.manifest, batch_prompts=batch_prompts, progress=progress,
                                     description=f"scan w={w:g}"))
    audits = audit_series(gens, inputs.real, manifest=inputs.manifest, threshold=threshold, target_fpr=target_fpr,
                          train_cache={}, **inputs.models())
    for audit, w in zip(audits, weights):
        audit["guidance"] = float(w)
    return Comparison("Guidance sweep", [f"w={w:g}" for w in weights], audits, gens, inputs.real,
                      {"weights": list(weights)}, [NOTE])
