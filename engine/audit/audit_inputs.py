"""What every before/after audit of a run is judged against, loaded and checked before any sampling.

The run's planted manifest (ground truth), the prompts (a file, or the run's distinct training
prompts), its real training and held-out images (copy rate, Fréchet distance; absent for a bare export
without splits.json) and the optional models of the audit: Dar's copy detector, a CLIP embedding and
the label-conformance classifier. tools/mitigate loads this once per command.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.audit.prompt_lists import PromptList, load_prompts
from engine.audit.run_data import RealImages, find_run_file, read_manifest, run_prompts, run_real_images


@dataclass
class AuditInputs:
    manifest: dict | None
    prompts: PromptList | None
    real: RealImages | None
    copy_detector: object | None = None      # engine.audit.copy_detection.CopyDetector
    clip: object | None = None               # engine.audit.clip_embedding.ClipEmbedder
    label_classifier: object | None = None   # engine.audit.label_classifier.LabelClassifier
    deepssim: object | None = None           # engine.audit.deepssim.DeepSSIM

    def models(self) -> dict:
        """The audit's models as keyword arguments of engine.audit.generation_audit.audit_generations."""
        return {"copy_detector": self.copy_detector, "clip": self.clip, "label_classifier": self.label_classifier,
                "deepssim": self.deepssim}


def load_audit_inputs(run: str, *, prompts_file: str | None = None, need_prompts: bool = True,
                      heldout_split: str = "val", copy_detector: str | None = None, clip_model: str | None = None,
                      clip_weights: str | None = None, label_classifier: str | None = None,
                      deepssim: str | None = None, device: str = "cpu") -> AuditInputs:
    """Manifest, prompts (`prompts_file`, else the run's training prompts when `need_prompts`), real
    images and the models given by directory or name (the learned models are imported only when asked
    for: open_clip is slow to import)."""
    manifest = read_manifest(run)
    has_splits = find_run_file(run, "splits.json") is not None   # the run dir or its export/ dir
    prompts = None
    if prompts_file:
        prompts = load_prompts(prompts_file)
    elif need_prompts:
        if not has_splits:
            raise ValueError(f"{run}: no splits.json to take training prompts from; give --prompts")
        prompts = run_prompts(run)
    inputs = AuditInputs(manifest, prompts, run_real_images(run, heldout_split) if has_splits else None)
    if copy_detector:
        from engine.audit.copy_detection import load_copy_detector
        inputs.copy_detector = load_copy_detector(copy_detector, device)
    if clip_model:
        from engine.audit.clip_embedding import ClipEmbedder, ClipSpec
        inputs.clip = ClipEmbedder(ClipSpec(clip_model, clip_weights), device)
    if label_classifier:
        from engine.audit.label_classifier import load_label_classifier
        inputs.label_classifier = load_label_classifier(label_classifier, device)
    if deepssim:
        from engine.audit.deepssim import load_deepssim
        inputs.deepssim = load_deepssim(deepssim, device)
    return inputs
