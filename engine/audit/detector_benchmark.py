"""Every applicable memorization detector on the same prompts and seeds, judged against planted ground truth.

Prompts are a run's distinct training prompts: planted prompts (their image was duplicated) are the
positives; matched controls and ordinary prompts are the negatives. Every prompt is in a calibration or
an evaluation half (`ground_truth`). Fitted weights (the anisotropy metric) are fitted on the calibration
half only, and every reported number is measured on the evaluation half only, for every detector alike.

Generation-based detectors share one set of generations (the scan's sampler and seeds: guided at w with
Wen's magnitudes recorded when the null condition is trained, conditional at w = 1 otherwise). Their
speed is reported as if each made the generations itself (generation time + its own scoring time), which
is what running that detector alone would cost. Per detector (engine.audit.intervals.detection_summary):
AUC with its DeLong 95% interval, TPR at 1% FPR with a stratified bootstrap interval, n+ and n-, and the
same against controls only and against ordinary prompts only.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from engine.audit.detectors.base import Detector, FittedDetector, PromptBatch
from engine.audit.detectors.generations import make_generations
from engine.audit.detectors.registry import DETECTORS, applicable
from engine.audit.intervals import detection_summary
from engine.audit.roc import roc_curve
from engine.audit.wen_detector import DetectorSettings
from engine.diffusion.seeds import prompt_seeds
from engine.model.null_condition import null_condition, require_null_condition

SPLITS = ("calibration", "evaluation")


# ---- ground truth -----------------------------------------------------------------------------------

@dataclass
class GroundTruth:
    groups: list[str]            # planted / control / ordinary per prompt
    splits: list[str]            # calibration / evaluation per prompt
    source: str                  # how the split was made


def _text_half(text: str, seed: int) -> str:
    digest = hashlib.sha1(f"{seed}:{text}".encode()).digest()
    return SPLITS[digest[0] & 1]


def ground_truth(prompts: list[str], groups: list[str], manifest: dict) -> GroundTruth:
    """Calibration/evaluation half of every prompt, for prompt groups already known from the manifest.

    A version-2 manifest carries the split (engine.audit.planted_truth.prompt_split owns it). A version-1
    manifest has none; until planted_truth gives v1 a rule, this one is used: the planted and control
    entries alternate calibration/evaluation in manifest order (so both halves hold every kind), and
    ordinary prompts are split by a hash of their text (seeded by the manifest's seed).
    """
    if manifest.get("version", 1) >= 2:
        from engine.audit.planted_truth import prompt_split
        return GroundTruth(list(groups), [prompt_split(p, manifest) for p in prompts],
                           "planted manifest v2 (engine.audit.planted_truth.prompt_split)")
    half = {}
    for key in ("planted", "controls"):
        for j, entry in enumerate(manifest.get(key, [])):
            half[entry["token"]] = SPLITS[j % 2]
    seed = int(manifest.get("seed", 0))
    splits = []
    for prompt, group in zip(prompts, groups):
        extra = [t for t in prompt.partition("|")[2].split() if t in half] if group != "ordinary" else []
        splits.append(half[extra[0]] if extra else _text_half(prompt, seed))
    return GroundTruth(list(groups), splits,
                       "planted manifest v1: planted/control entries alternate calibration/evaluation in manifest "
                       "order; ordinary prompts by sha1(seed:text)")


# ---- running the detectors ----------------------------------------------------------------------------

def benchmark_settings(loaded, settings: DetectorSettings) -> DetectorSettings:
    """The settings the benchmark generates with: w = 1 for a model without a trained null condition."""
    if null_condition(loaded).state == "untrained" and settings.guidance != 1.0:
        return DetectorSettings(**{**settings.to_dict(), "guidance": 1.0})
    return settings


def choose_detectors(loaded, names: list[str] | None, *, have_training_images: bool,
                     force: bool = False) -> tuple[list[Detector], list[str], dict | None]:
    """(detectors to run, notes on those left out, the guard record if a detector was forced)."""
    notes, forced = [], None
    if names:
        unknown = [n for n in names if n not in DETECTORS]
        if unknown:
            raise ValueError(f"detectors: unknown {unknown[0]!r} (known: {', '.join(DETECTORS)})")
        chosen = [DETECTORS[n] for n in names]
        for d in chosen:
            if not applicable(d, loaded):
                forced = require_null_condition(loaded, f"detector {d.name}", force)
    else:
        chosen = [d for d in DETECTORS.values() if applicable(d, loaded)]
        notes += [f"{d.name}: left out, needs the null condition (conditioning.p_uncond = 0)"
                  for d in DETECTORS.values() if not applicable(d, loaded)]
    if not have_training_images:
        notes += [f"{d.name}: left out, needs the run's training images" for d in chosen if d.needs_training_images]
        chosen = [d for d in chosen if not d.needs_training_images]
    return chosen, notes, forced


def _batches(n: int, size: int):
    return [list(range(b, min(n, b + size))) for b in range(0, n, size)]


def run_detectors(loaded, tokens: torch.Tensor, settings: DetectorSettings, detectors: list[Detector], *,
                  train=None, batch_prompts: int = 32, progress: bool = True) -> dict:
    """Raw outputs of every detector on every prompt, with timings.

    Returns {"scores": {name: [P]}, "features": {name: [P, K]} (fitted detectors), "seconds": {name: s},
    "generation_seconds": s, "generations": [P, G, C, H, W] or None}. Seeds follow the scan convention
    (prompt i: base_seed + i)."""
    seeds = prompt_seeds(range(tokens.shape[0]), settings.base_seed)
    batches = _batches(tokens.shape[0], batch_prompts)
    out = {"scores": {}, "features": {}, "seconds": {}, "generation_seconds": 0.0, "generations": None}
    shared: list[PromptBatch] = []
    if any(d.needs_generations for d in detectors):
        record = any(d.needs_null_condition and d.needs_generations for d in detectors) or settings.guidance != 1.0
        start = time.perf_counter()
        for idx in tqdm(batches, desc="generations", unit="batch", disable=not progress):
            shared.append(make_generations(loaded, tokens[idx], [seeds[i] for i in idx], settings,
                                           record_norms=record))
        out["generation_seconds"] = time.perf_counter() - start
        out["generations"] = torch.cat([b.generations for b in shared])
    for det in detectors:
        det.check_settings(settings)
        start = time.perf_counter()
        parts = []
        for k, idx in enumerate(tqdm(batches, desc=det.name, unit="batch", disable=not progress)):
            batch = shared[k] if det.needs_generations else PromptBatch(tokens[idx], [seeds[i] for i in idx])
            if isinstance(det, FittedDetector):
                parts.append(det.features(loaded, batch, settings))
            else:
                parts.append(det.score(loaded, batch, settings, train=train))
        key = "features" if isinstance(det, FittedDetector) else "scores"
        out[key][det.name] = np.concatenate(parts)
        out["seconds"][det.name] = time.perf_counter() - start
    return out


# ---- judging them -------------------------------------------------------------------------------------

def _summary(scores: np.ndarray, positive: np.ndarray, negative: np.ndarray, n_boot: int) -> dict | None:
    if positive.sum() < 2 or negative.sum() < 2:
        return None
    return detection_summary(scores[positive], scores[negative], n_boot=n_boot).to_dict()


def evaluate(raw: dict, truth: GroundTruth, detectors: list[Detector], settings: DetectorSettings,
             n_prompts: int, n_boot: int = 2000) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(one record per detector, final scores [P] per detector). A record holds the detectors.json contract
    (detector, auc, auc_ci, tpr_at_1pct_fpr, tpr_ci, n_positive, n_negative, forwards_per_prompt,
    prompts_per_s, needs_null_condition) and more; fitted detectors are fitted on the calibration half."""
    groups, splits = np.array(truth.groups), np.array(truth.splits)
    evaluation = splits == "evaluation"
    positive = (groups == "planted") & evaluation
    negatives = {"all": (groups != "planted") & evaluation, "control": (groups == "control") & evaluation,
                 "ordinary": (groups == "ordinary") & evaluation}
    if positive.sum() < 2 or negatives["all"].sum() < 2:
        raise ValueError(f"benchmark: the evaluation half has {int(positive.sum())} planted and "
                         f"{int(negatives['all'].sum())} other prompts; need at least 2 of each")
    records = []
    for det in detectors:
        params = None
        if isinstance(det, FittedDetector):
            calibration = splits == "calibration"
            feats = raw["features"][det.name]
            params = det.fit(feats[calibration], groups[calibration] == "planted")
            scores = det.combine(feats, params)
        else:
            scores = raw["scores"][det.name]
        if not np.isfinite(scores[evaluation]).all():
            raise ValueError(f"benchmark: detector {det.name} gave non-finite scores")
        main = _summary(scores, positive, negatives["all"], n_boot)
        seconds = raw["seconds"][det.name] + (raw["generation_seconds"] if det.needs_generations else 0.0)
        fpr, tpr, _ = roc_curve(scores[positive], scores[negatives["all"]])
        records.append({
            "detector": det.name, "auc": main["auc"], "auc_ci": main["auc_ci"],
            "tpr_at_1pct_fpr": main["tpr_at_1pct_fpr"], "tpr_ci": main["tpr_ci"],
            "n_positive": main["n_positive"], "n_negative": main["n_negative"],
            "forwards_per_prompt": det.forwards_per_prompt(settings),
            "prompts_per_s": n_prompts / seconds if seconds > 0 else None,
            "needs_null_condition": det.needs_null_condition,
            "best_balanced_accuracy": main["best_balanced_accuracy"],
            "vs_controls": _summary(scores, positive, negatives["control"], n_boot),
            "vs_ordinary": _summary(scores, positive, negatives["ordinary"], n_boot),
            "needs_generations": det.needs_generations, "needs_training_images": det.needs_training_images,
            "denoising_free": det.denoising_free, "fitted": det.fitted, "fitted_params": params,
            "seconds": seconds, "summary": det.summary,
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        })
    return records, _per_prompt_scores(raw, records, detectors)


def _per_prompt_scores(raw: dict, records: list[dict], detectors: list[Detector]) -> dict[str, np.ndarray]:
    out = {}
    for det, rec in zip(detectors, records):
        if isinstance(det, FittedDetector):
            out[det.name] = det.combine(raw["features"][det.name], rec["fitted_params"])
        else:
            out[det.name] = raw["scores"][det.name]
    return out


# ---- the whole benchmark of a run (what tools/benchmark_detectors does) ---------------------------------

def benchmark_checkpoint(checkpoint: str, out_dir: str, settings: DetectorSettings, *, max_prompts: int | None = 400,
                         detector_names: list[str] | None = None, batch_prompts: int = 32, force: bool = False,
                         device: str = "cpu", n_boot: int = 2000, progress: bool = True, log=print) -> dict:
    """Benchmark every applicable detector on a training run with planted duplicates; write
    out_dir/detectors.json, out_dir/scores.parquet (every prompt's score under every detector, with its
    group and half); the page is engine.reports.detector_benchmark's. Every input is checked before the first
    forward pass. Returns {"records": [...], "meta": {...}}."""
    import json
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.atomic_files import atomic_path, write_json
    from data_pipeline.images import to_uint8
    from engine.audit.detectors.nearest_training import TrainingNeighbours
    from engine.audit.planted_truth import planted_pixel_match, prompt_groups
    from engine.audit.prompt_lists import encode_prompts, training_prompt_list
    from engine.audit.run_data import read_manifest, split_images, split_prompts
    from engine.audit.scan import subsample_prompts
    from engine.model.export import load_model

    loaded = load_model(checkpoint, device=device)
    manifest = read_manifest(checkpoint)
    if not manifest or not manifest.get("planted"):
        raise ValueError(f"{checkpoint}: no planted_manifest.json with planted duplicates; the benchmark needs "
                         f"planted ground truth (train with data.planted)")
    plist = training_prompt_list(split_prompts(checkpoint, "train"), "train split")
    groups = prompt_groups(plist.prompts, manifest)
    if max_prompts is not None and len(plist.prompts) > max_prompts:
        plist, groups = subsample_prompts(plist, groups, max_prompts, settings.base_seed)
    truth = ground_truth(plist.prompts, groups, manifest)
    tokens = encode_prompts(loaded.vocab, plist)
    settings = benchmark_settings(loaded, settings)
    train_images = split_images(checkpoint, "train", progress=progress)
    train = TrainingNeighbours(train_images.images, train_images.image_paths)
    detectors, notes, forced = choose_detectors(loaded, detector_names, have_training_images=True, force=force)
    for note in notes:
        log(note)
    log(f"{len(plist.prompts)} prompts ({groups.count('planted')} planted, {groups.count('control')} control, "
        f"{groups.count('ordinary')} ordinary), {settings.generations} generations, {settings.steps} steps, "
        f"w = {settings.guidance:g}; detectors: {', '.join(d.name for d in detectors)}")
    raw = run_detectors(loaded, tokens, settings, detectors, train=train, batch_prompts=batch_prompts,
                        progress=progress)
    records, scores = evaluate(raw, truth, detectors, settings, len(plist.prompts), n_boot)
    memorized = None
    if raw["generations"] is not None:      # first: did memorization happen at all? (model-free ground truth)
        memorized = planted_pixel_match(to_uint8(raw["generations"]), plist.prompts, truth.groups, train.images_u8,
                                        train.paths, manifest, {})
        memorized.get("own_correlation", {}).pop("values", None)
    nc = null_condition(loaded)
    was_forced = bool(forced and forced["forced_without_null_condition"])
    for rec in records:
        rec["forced_without_null_condition"] = was_forced and rec["needs_null_condition"]
    meta = {"checkpoint": str(loaded.path), "settings": settings.to_dict(), "split_source": truth.source,
            "n_prompts": len(plist.prompts), "generation_seconds": raw["generation_seconds"],
            "null_condition": nc.state, "p_uncond": nc.p_uncond, "forced_without_null_condition": was_forced,
            "ground_truth_memorization": memorized,
            "notes": notes, "device": device, "batch_prompts": batch_prompts,
            "counts": {f"{g}/{s}": int(sum(1 for a, b in zip(truth.groups, truth.splits) if (a, b) == (g, s)))
                       for g in ("planted", "control", "ordinary") for s in SPLITS}}
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "detectors.json"), records)
    write_json(os.path.join(out_dir, "benchmark_meta.json"), meta)
    table = pa.table({"prompt": plist.prompts, "group": truth.groups, "split": truth.splits,
                      "seed": prompt_seeds(range(len(plist.prompts)), settings.base_seed),
                      **{name: pa.array(v, pa.float64()) for name, v in scores.items()}})
    table = table.replace_schema_metadata({b"memdiff_detector_benchmark": json.dumps(meta).encode()})
    with atomic_path(os.path.join(out_dir, "scores.parquet")) as tmp:
        pq.write_table(table, tmp)
    return {"records": records, "meta": meta}


def read_fitted_params(path: str, detector: str) -> dict:
    """The weights a benchmark fitted for `detector`, from its detectors.json (a one-line error otherwise)."""
    import json

    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a detectors.json ({e})") from None
    for rec in records if isinstance(records, list) else []:
        if isinstance(rec, dict) and rec.get("detector") == detector:
            if not rec.get("fitted_params"):
                raise ValueError(f"{path}: detector {detector!r} has no fitted_params")
            return rec["fitted_params"]
    raise ValueError(f"{path}: no record of detector {detector!r} (is it a tools/benchmark_detectors output?)")
