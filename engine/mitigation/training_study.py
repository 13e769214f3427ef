"""Training-time mitigations as one study, audited against the baseline with paired differences.

From one training config (the data config, its splits and seeds are shared by every variant):

    baseline                 the config as given
    augmentation             + data_pipeline.augment's default augmentation (rotation, noise, contrast)
    screening                + Wen's training-time screening, tau = the `screening_quantile` of the
                               baseline's training-time magnitudes (engine.mitigation.screening_threshold)
    dp eps=E                 + DP-SGD at each target epsilon (PRV accountant, delta 1e-5, clip 1,
                               Poisson sampling), optionally with fewer steps / a smaller model
                               (`dp_overrides`) so that it finishes on a CPU; then also
    baseline (DP budget)     the baseline with the same steps / model, non-private: DP is compared
                               with it, so that the difference is DP's and not the shorter training's
and, on the baseline with no retraining, lower guidance weights and Wen's prompt-embedding
optimisation. Every variant is trained into <out>/runs/<name> (resumable: rerunning skips finished
runs), the copy detector and the label classifier are trained once on the baseline's training split,
and every variant is measured by engine.audit.conditioning_study on the SAME prompts and seeds: label
conformance, Fréchet distance, planted ground truth, copy rate, Wen AUC, each with its interval, and
the paired difference against its reference (baseline, or baseline (DP budget) for DP).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from data_pipeline.atomic_files import write_json
from engine.audit.conditioning_study import (
    Condition,
    Reference,
    StudyOptions,
    generate_with_scores,
    measure_conditions,
    study_prompts,
)
from engine.audit.prompt_lists import PromptList
from engine.audit.run_data import read_manifest, read_splits, run_real_images, split_images, split_prompts
from engine.audit.wen_detector import DetectorSettings
from engine.model.export import load_model
from engine.reports.loss_curves import read_metrics
from engine.training.config import load_config

AUGMENTATION = {"rotation_deg": 5.0, "rotation_p": 0.5, "noise_std": 0.02, "noise_p": 0.5, "contrast": 0.1,
                "brightness": 0.05, "jitter_p": 0.5, "hflip_p": 0.0}          # configs/augment.json


@dataclass
class MitigationStudySpec:
    config: str                                   # training config of the baseline (data, model, steps, seeds)
    out_dir: str
    overrides: tuple[str, ...] = ()               # --set applied to every variant (e.g. data.root)
    guidance: float = 7.5
    lower_guidance: tuple[float, ...] = (3.0, 1.0)
    dp_epsilons: tuple[float, ...] = (10.0, 50.0)
    dp_delta: float = 1e-5
    dp_overrides: tuple[str, ...] = ()            # e.g. training.steps=300 so that DP fits a CPU budget
    screening_quantile: float = 0.9
    variants: tuple[str, ...] = ("augmentation", "screening", "dp")   # retrained besides the baseline
    embedding_optimisation: bool = True
    detector_backbone: str = "tiny"
    detector_epochs: int = 15
    classifier_epochs: int = 40
    audit: StudyOptions = field(default_factory=StudyOptions)


def _dp_section(eps: float, delta: float, batch: int) -> str:
    return "dp=" + json.dumps({"enabled": True, "target_epsilon": eps, "delta": delta, "clip_norm": 1.0,
                               "accountant": "prv", "expected_batch_size": batch})


def variant_overrides(spec: MitigationStudySpec, tau: float | None) -> dict[str, list[str]]:
    """name -> the --set overrides of each training variant (in training order)."""
    base = list(spec.overrides)
    run = lambda name: f"output_dir={os.path.join(spec.out_dir, 'runs', name)}"   # noqa: E731
    batch = load_config(spec.config, base).deepspeed.train_micro_batch_size_per_gpu
    unknown = set(spec.variants) - {"augmentation", "screening", "dp"}
    if unknown:
        raise ValueError(f"study variants: unknown {sorted(unknown)} (known: augmentation, screening, dp)")
    out = {"baseline": base + [run("baseline")]}
    if "augmentation" in spec.variants:
        out["augmentation"] = base + [run("augmentation"), "augment=" + json.dumps(AUGMENTATION)]
    if tau is not None and "screening" in spec.variants:
        out["screening"] = base + [run("screening"),
                                   "screening=" + json.dumps({"enabled": True, "tau": tau, "units": "rms"})]
    if spec.dp_epsilons and "dp" in spec.variants:
        if spec.dp_overrides:
            out["baseline (DP budget)"] = base + list(spec.dp_overrides) + [run("baseline_dp_budget")]
        for eps in spec.dp_epsilons:
            out[f"DP eps={eps:g}"] = (base + list(spec.dp_overrides) + [run(f"dp_eps{eps:g}"),
                                                                      _dp_section(eps, spec.dp_delta, batch)])
    return out


def logged_training_seconds(metrics: list[dict], global_batch: int) -> float | None:
    """Wall time of the optimizer steps: the sum of the logged windows' own durations. The first-to-last
    timestamp would count the pauses of a resumed run (hours between two sessions) as training. Rows
    without `window_s` (logs of older runs) give it back from their rate: the trainer logs
    images_per_s = steps x global batch / seconds of the window."""
    total, previous, found = 0.0, 0, False
    for m in metrics:
        if "step" not in m or not ("window_s" in m or m.get("images_per_s")):
            continue
        steps, previous = m["step"] - previous, m["step"]
        total += m["window_s"] if "window_s" in m else steps * global_batch / m["images_per_s"]
        found = True
    return total if found else None


def train_variant(config: str, overrides: list[str], log) -> dict:
    """Train (or finish, or skip when finished) one variant in this process; its wall time and privacy."""
    from engine.training.trainer import train
    cfg = load_config(config, overrides)
    start = time.time()
    summary = train(cfg, resume=True)
    run_dir = cfg.output_dir
    metrics = read_metrics(run_dir)
    privacy_path = os.path.join(run_dir, "privacy.json")
    info = {"run": run_dir, "steps": cfg.training.steps, "seconds_this_call": time.time() - start,
            "training_seconds_logged": logged_training_seconds(
                metrics, cfg.deepspeed.train_micro_batch_size_per_gpu * cfg.deepspeed.gradient_accumulation_steps),
            "privacy": json.load(open(privacy_path)) if os.path.isfile(privacy_path) else summary.get("privacy")}
    log(f"trained {run_dir} ({info['steps']} steps)")
    return info


def run_relative_splits(run_dir: str) -> dict:
    """The run's splits with the paths of files it wrote itself (the near copies of planted duplicates, under
    <run>/planted_images/) made relative to the run: two runs of one data config then compare equal."""
    data = read_splits(run_dir)
    own = os.path.dirname(os.path.abspath(data["path"])) + os.sep

    def record(r: dict) -> dict:
        path = r.get("image_path", "")
        return {**r, "image_path": "<run>/" + path[len(own):]} if path.startswith(own) else r
    return {name: [record(r) for r in records] for name, records in data["splits"].items()}


def require_same_splits(run: str, baseline: str) -> None:
    """A variant must be trained on the baseline's records (same data config, splits, seeds); checked as
    soon as the variant's run exists, so a mismatch does not wait for every other variant's training."""
    if run_relative_splits(run) != run_relative_splits(baseline):
        raise ValueError(f"{run}: its splits.json differs from the baseline's ({baseline}): the study needs the "
                         f"same data config for every variant")


def _audit_networks(spec: MitigationStudySpec, baseline: str, log):
    """The copy detector and label classifier of the baseline run, trained once if absent."""
    from engine.audit.copy_detection import CopyDetectorConfig, load_copy_detector, train_copy_detector
    from engine.audit.label_classifier import LabelClassifierConfig, load_label_classifier, train_label_classifier
    det_dir, clf_dir = os.path.join(baseline, "copy_detector"), os.path.join(baseline, "label_classifier")
    train, val = split_images(baseline, "train", progress=False), split_images(baseline, "val", progress=False)
    if not os.path.isfile(os.path.join(det_dir, "copy_detector.json")):
        log("training the copy detector on the baseline's training split")
        train_copy_detector(train.images, val.images, CopyDetectorConfig(backbone=spec.detector_backbone,
                                                                         epochs=spec.detector_epochs),
                            progress=False).save(det_dir)
    if not os.path.isfile(os.path.join(clf_dir, "label_classifier.json")):
        log("training the label classifier on the baseline's training split")
        train_label_classifier(train.images, train.prompts, val.images, val.prompts,
                               LabelClassifierConfig(epochs=spec.classifier_epochs), progress=False).save(clf_dir)
    return load_copy_detector(det_dir), load_label_classifier(clf_dir)


def _screening_tau(spec: MitigationStudySpec, baseline: str) -> dict:
    from engine.mitigation.screening_threshold import load_training_examples, screening_threshold
    loaded = load_model(baseline)
    return screening_threshold(loaded, load_training_examples(baseline, loaded.vocab), read_manifest(baseline),
                               checkpoint=baseline, quantile=spec.screening_quantile)


def _inference_conditions(spec: MitigationStudySpec, baseline_model, prompts: list[str], groups: list[str],
                          first: Condition, log) -> list[Condition]:
    """Lower guidance and Wen's embedding optimisation on the baseline, no retraining."""
    out = []
    for w in spec.lower_guidance:
        log(f"baseline at w = {w:g}")
        images, norms = generate_with_scores(baseline_model, prompts, w, spec.audit, with_score=True)
        out.append(Condition(f"guidance w={w:g}", images, norms, reference=first.name,
                             info={"kind": "inference", "guidance": w}))
    if spec.embedding_optimisation:
        from engine.mitigation.prompt_optimization import optimized_generations
        control_first = [n[:, 0].mean() for n, g in zip(first.norms, groups) if g == "control"]
        target = float(np.median(control_first)) if control_first else float(np.median(first.norms[:, :, 0]))
        log(f"prompt-embedding optimisation (target {target:.4g} per element: the controls' median first-step score)")
        settings = DetectorSettings(generations=spec.audit.generations, steps=spec.audit.steps,
                                    guidance=spec.guidance, base_seed=spec.audit.base_seed)
        gen, stats = optimized_generations(baseline_model, PromptList(prompts, [f"study:{i}" for i in range(len(prompts))]),
                                           settings, target_rms=target, groups=groups, progress=False)
        reached = sum(s["loss_after_rms"] <= target for s in stats)
        out.append(Condition("embedding optimisation", gen.images, gen.norms_rms.astype(np.float64),
                             reference=first.name, info={"kind": "inference", "target_rms": target,
                                                         "prompts_reaching_target": f"{reached}/{len(stats)}"}))
    return out


def run_study(spec: MitigationStudySpec, log=print) -> dict:
    """Train every variant (resumable), audit each on the same prompts and seeds, write
    <out>/mitigation_study.json. Returns the study document."""
    first = variant_overrides(spec, None)          # unknown variants fail here, before any training, and a bad
    configs = {name: load_config(spec.config, overrides)   # config, --set or --dp-set key (an hour of baseline
               for name, overrides in first.items()}       # training must not end in a typo)
    if configs["baseline"].conditioning.p_uncond == 0:
        raise ValueError(f"{spec.config}: conditioning.p_uncond: the study generates with guidance and scores with "
                         f"Wen's ||eps_c - eps_u||, which need a trained null condition; got 0 (train the baseline "
                         f"with p_uncond > 0)")
    trained = {"baseline": train_variant(spec.config, first["baseline"], log)}
    baseline = trained["baseline"]["run"]
    screening = _screening_tau(spec, baseline) if spec.screening_quantile and "screening" in spec.variants else None
    variants = variant_overrides(spec, screening["tau_rms"] if screening else None)
    for name, overrides in variants.items():
        if name not in trained:
            trained[name] = train_variant(spec.config, overrides, log)
            require_same_splits(trained[name]["run"], baseline)
    runs = {name: info["run"] for name, info in trained.items()}
    detector, classifier = _audit_networks(spec, baseline, log)
    prompts, groups = study_prompts(split_prompts(baseline, "train"), read_manifest(baseline), spec.audit)
    conditions = []
    for name, run in runs.items():
        log(f"generating {name} (w = {spec.guidance:g})")
        loaded = load_model(run)
        images, norms = generate_with_scores(loaded, prompts, spec.guidance, spec.audit, with_score=True)
        reference = None if name == "baseline" else ("baseline (DP budget)" if name.startswith("DP") and
                                                     "baseline (DP budget)" in runs else "baseline")
        conditions.append(Condition(name, images, norms, reference, {"kind": "training", **trained[name]}))
        if name == "baseline":
            conditions += _inference_conditions(spec, loaded, prompts, groups, conditions[0], log)
    ref = Reference(run_real_images(baseline, "val", progress=False), read_manifest(baseline), detector, classifier)
    results = measure_conditions(conditions, prompts, groups, ref, spec.audit, log)
    doc = {"spec": {**asdict(spec), "audit": asdict(spec.audit)}, "screening": screening, "prompts": prompts,
           "groups": groups, "results": results, "n_train_images": int(len(ref.real.train)),
           "n_heldout_images": int(len(ref.real.heldout))}
    write_json(os.path.join(spec.out_dir, "mitigation_study.json"), doc)
    return doc
