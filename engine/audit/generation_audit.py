"""The before/after audit: the same prompts and seeds through each model (or mitigation), same numbers.

One audit of a set of generations gives:
- detection: Wen's score per prompt, ROC of planted prompts against matched controls (and ordinary
  prompts), and the fraction of planted prompts flagged at a threshold (given, or calibrated at a
  target FPR on the run's own non-planted prompts);
- copying: every generation's highest similarity to any training image (Dar's copy-detection
  correlation when a detector is given, pixel Pearson correlation otherwise), the Dar copy rate at
  the detector's threshold (pixel space: the same 95th-percentile rule computed here), and for
  planted prompts the share of generations whose nearest training image is the planted image —
  in the primary space and, as model-free ground truth, in raw pixels with a prompt-resampled
  interval and the null rate of generations that never asked for the planted image
  (engine.audit.planted_truth);
- quality: Fréchet distance between generated and held-out real images in each feature space
  available offline (copy-detection embedding, CLIP if given, and 8x8 pixels always), next to the
  same distance between real training and held-out images (the floor a perfect model would reach);
  with a label classifier, label conformance of the generations to their prompts next to the same
  number on real held-out images.

Generations come from engine.audit.scan.scan_prompts (resumable; images saved as PNGs and read back) or
from any other generator that yields a `Generations` (e.g. the optimised-embedding sampler). The pages
showing these numbers are engine.reports.comparison_page.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from data_pipeline.images import read_png, to_model_range
from engine.audit.audit_inputs import AuditInputs
from engine.audit.copy_detection import CopyDetector, copy_statistics, dar_threshold
from engine.audit.frechet import frechet_distance_features
from engine.audit.intervals import cluster_bootstrap_mean, detection_summary, distribution_summary, proportion_interval
from engine.audit.nearest_neighbors import topk_neighbors
from engine.audit.paired_audit import paired_differences
from engine.audit.planted_truth import nearest_is_planted, planted_pixel_match, planted_sources, prompt_groups
from engine.audit.prompt_lists import PromptList, encode_prompts
from engine.audit.roc import calibrate_threshold, roc_metrics
from engine.audit.run_data import RealImages
from engine.audit.scan import scan_prompts
from engine.audit.similarity import pearson_normalize
from engine.audit.wen_detector import DetectorSettings, mean_score
from engine.diffusion.finite import require_finite
from engine.model.export import load_model

PIXEL_FEATURE_SIZE = 8
GROUPS = ("planted", "control", "ordinary")


@dataclass
class Generations:
    prompts: list[str]
    groups: list[str]              # planted / control / ordinary per prompt
    seeds: list[int]
    norms_rms: np.ndarray          # [P, G, S]
    images: np.ndarray             # uint8 [P, G, S, S]
    truth_prompts: list[str] | None = None   # prompts whose planted tokens are the ground truth (default: prompts)


@dataclass
class Comparison:
    """Audits of the same prompts and seeds through several models or mitigations, ready to report."""
    title: str
    names: list[str]
    audits: list[dict]
    generations: list[Generations]
    real: RealImages | None
    summary: dict = field(default_factory=dict)   # extra keys of summary.json (weights, edits, ...)
    notes: list[str] = field(default_factory=list)


def scan_generations(loaded, prompt_list: PromptList, settings: DetectorSettings, out_dir: str, *,
                     manifest: dict | None, groups: list[str] | None = None, batch_prompts: int = 16,
                     progress: bool = True, description: str = "scan") -> Generations:
    """Scan (resumably) into out_dir/scores.parquet with images under out_dir/images, read both back
    (out_dir is made by the scan's first write: a scan that fails first leaves nothing)."""
    groups = groups or prompt_groups(prompt_list.prompts, manifest) or ["ordinary"] * len(prompt_list.prompts)
    image_dir = os.path.join(out_dir, "images")
    res = scan_prompts(loaded, prompt_list, os.path.join(out_dir, "scores.parquet"), settings,
                       batch_prompts=batch_prompts, save_images=image_dir, groups=groups, progress=progress,
                       description=description)
    rows = res.table.to_pylist()
    g = settings.generations
    images = np.stack([np.stack([read_png(os.path.join(image_dir, f"{r['prompt_index']:06d}_g{j}.png"))
                                 for j in range(g)]) for r in rows])
    return Generations([r["prompt"] for r in rows], [groups[r["prompt_index"]] for r in rows],
                       [int(r["seed"]) for r in rows], np.array([r["norms_rms"] for r in rows], np.float32), images)


# ---- features -------------------------------------------------------------------------------------

def pixel_features(images_u8: np.ndarray, size: int = PIXEL_FEATURE_SIZE) -> np.ndarray:
    """Area-downsampled pixels in [-1, 1] as a small offline feature vector [N, size*size]."""
    x = to_model_range(np.asarray(images_u8))
    return torch.nn.functional.adaptive_avg_pool2d(x, size).flatten(1).numpy().astype(np.float64)


def feature_spaces(copy_detector: CopyDetector | None, clip) -> dict:
    """name -> embed(uint8 [N, S, S]) -> [N, D]; 8x8 pixels always, the learned spaces when given."""
    spaces = {f"pixels_{PIXEL_FEATURE_SIZE}x{PIXEL_FEATURE_SIZE}": pixel_features}
    if copy_detector is not None:
        spaces["copy_detector"] = copy_detector.embed
    if clip is not None:
        spaces["clip"] = clip.embed
    return spaces


# ---- one audit, step by step ------------------------------------------------------------------------

def detection_numbers(gen: Generations, threshold: float | None, threshold_from: str,
                      target_fpr: float) -> tuple[dict, list[dict]]:
    """Scores, the flagging threshold (given, or calibrated at `target_fpr` on the non-planted prompts),
    flagged fractions and planted-vs-negatives ROC per group; and one row per prompt."""
    require_finite(gen.norms_rms, "audit: the conditional-noise magnitudes of the generations")
    groups = np.array(gen.groups)
    score = mean_score(torch.from_numpy(gen.norms_rms)).numpy().astype(np.float64)
    first = mean_score(torch.from_numpy(gen.norms_rms), (0, 1)).numpy().astype(np.float64)
    negatives = groups != "planted"
    if threshold is None and negatives.any():
        threshold_used, how = calibrate_threshold(score[negatives], target_fpr), f"calibrated at FPR {target_fpr}"
    else:
        threshold_used, how = threshold, threshold_from
    flagged = score > threshold_used if threshold_used is not None else np.zeros(len(score), bool)
    det = {"threshold": threshold_used, "threshold_from": how, "score_mean": float(score.mean()),
           "flagged_fraction": float(flagged.mean())}
    for name in GROUPS:
        m = groups == name
        if m.any():
            k, n = int(flagged[m].sum()), int(m.sum())
            det[f"{name}_score_mean"] = float(score[m].mean())
            det[f"{name}_flagged_fraction"] = k / n
            det[f"{name}_flagged"] = {"rate": k / n, "ci95": list(proportion_interval(k, n)), "k": k, "n": n}
    for s_name, s in (("score", score), ("first_step_score", first)):
        for neg in ("control", "ordinary"):
            pos_s, neg_s = s[groups == "planted"], s[groups == neg]
            if len(pos_s) >= 2 and len(neg_s) >= 2:
                det[f"auc/{s_name}/planted_vs_{neg}"] = detection_summary(pos_s, neg_s).to_dict()
            elif len(pos_s) and len(neg_s):   # too few for an interval: the point value, said so
                det[f"auc/{s_name}/planted_vs_{neg}"] = {**roc_metrics(pos_s, neg_s).to_dict(),
                                                         "note": "fewer than 2 prompts on a side: no interval"}
    per_prompt = [{"prompt": gen.prompts[i], "group": gen.groups[i], "seed": gen.seeds[i],
                   "score": float(score[i]), "first_step_score": float(first[i]), "flagged": bool(flagged[i])}
                  for i in range(len(score))]
    return det, per_prompt


def copy_space(flat: np.ndarray, real: RealImages, copy_detector: CopyDetector | None,
               cache: dict) -> tuple[str, np.ndarray, np.ndarray, float | None]:
    """(space name, generation embeddings, training embeddings, copy threshold) of the copy statistics:
    Dar's copy-detection embedding when a detector is given, else raw pixels (Pearson correlation)
    with the same 95th-percentile threshold computed on the held-out images."""
    if copy_detector is not None:
        if "dar_train" not in cache:
            cache["dar_train"] = copy_detector.embed(real.train)
        return "copy_detector", copy_detector.embed(flat), cache["dar_train"], copy_detector.threshold
    to_vec = lambda a: to_model_range(a, False).reshape(len(a), -1).numpy()  # noqa: E731
    train_emb = to_vec(real.train)
    if "pixel_threshold" not in cache:
        cache["pixel_threshold"] = dar_threshold(train_emb, to_vec(real.heldout)) if len(real.heldout) else None
    return "pixel_correlation", to_vec(flat), train_emb, cache["pixel_threshold"]


def copying_numbers(gen: Generations, real: RealImages, space: str, gen_emb: np.ndarray, train_emb: np.ndarray,
                    copy_threshold: float | None, manifest: dict | None, cache: dict) -> tuple[dict, np.ndarray]:
    """Nearest-training similarity per group, Dar copy rates and the planted ground truth; and the
    index of every generation's nearest training image [P * G]."""
    g = gen.images.shape[1]
    best_v, best_i = topk_neighbors(pearson_normalize(torch.from_numpy(gen_emb)),
                                    pearson_normalize(torch.from_numpy(train_emb)), k=1)
    nearest = best_v[:, 0].numpy().astype(np.float64)
    nearest_idx = best_i[:, 0].numpy()
    copying = {"space": space, "nearest_similarity": distribution_summary(nearest)}
    per_gen_group = np.repeat(np.array(gen.groups), g)
    for name in GROUPS:
        m = per_gen_group == name
        if m.any():
            copying[f"nearest_similarity_{name}"] = distribution_summary(nearest[m])
    if copy_threshold is not None:
        stats = copy_statistics(gen_emb, train_emb, copy_threshold)
        stats.pop("generated_max_correlation")
        copying["dar"] = stats
        copies = nearest > copy_threshold
        copying["copy_fraction_per_prompt"] = copies.reshape(-1, g).mean(axis=1).tolist()
        for name in GROUPS:
            m = per_gen_group == name
            if m.any():
                copying[f"copy_fraction_{name}"] = float(copies[m].mean())
                c = cluster_bootstrap_mean(copies.reshape(-1, g)[np.array(gen.groups) == name].astype(np.float64))
                copying[f"copy_fraction_{name}_ci95"] = c["ci95"]
    if manifest and manifest.get("planted"):
        truth = gen.truth_prompts or gen.prompts
        per_prompt = nearest_idx.reshape(-1, g)
        hits = [nearest_is_planted(per_prompt[i], real.train_paths, paths)
                for i, paths in planted_sources(truth, gen.groups, manifest).items()]
        copying["planted_nearest_is_planted_fraction"] = float(np.concatenate(hits).mean()) if hits else None
        copying["planted_pixels"] = planted_pixel_match(gen.images, truth, gen.groups, real.train, real.train_paths,
                                                        manifest, cache)
    return copying, nearest_idx


def quality_numbers(gen: Generations, real: RealImages, flat: np.ndarray, space: str, gen_emb: np.ndarray, *,
                    copy_detector: CopyDetector | None, clip, label_classifier, cache: dict) -> dict:
    """Fréchet distance to held-out real images per feature space (with the real train-vs-held-out
    floor), and label conformance of the generations to their prompts next to real held-out images."""
    g = gen.images.shape[1]
    quality = {}
    if len(real.heldout) >= 2:
        for name, embed in feature_spaces(copy_detector, clip).items():
            if f"fd_{name}" not in cache:
                held = np.asarray(embed(real.heldout), np.float64)
                n_ref = min(len(real.train), max(len(flat), len(real.heldout)))
                pick = np.random.default_rng(0).choice(len(real.train), n_ref, replace=False)
                cache[f"fd_{name}"] = (held, frechet_distance_features(np.asarray(embed(real.train[pick])), held))
            held, floor = cache[f"fd_{name}"]
            # the copy detector already embedded these generations for the copy statistics
            feats = gen_emb if name == "copy_detector" and space == "copy_detector" else embed(flat)
            quality[name] = {"frechet_to_heldout": frechet_distance_features(np.asarray(feats, np.float64), held),
                             "real_train_vs_heldout": floor, "n_generated": int(len(flat)), "n_heldout": int(len(held))}
    if label_classifier is not None:
        # The prompt asked for these findings: does the classifier see them in the generations?
        conf = {"generated": label_classifier.conformance(flat, [q for q in gen.prompts for _ in range(g)])}
        if real.heldout_prompts is not None and len(real.heldout):
            if "labels_real" not in cache:
                cache["labels_real"] = label_classifier.conformance(real.heldout, real.heldout_prompts)
            conf["real_heldout"] = cache["labels_real"]
        quality["label_conformance"] = conf
    return quality


def deepssim_copying(gen: Generations, flat: np.ndarray, real: RealImages, deepssim, cache: dict) -> dict:
    """DeepSSIM's copy rule: a generation copies its nearest training image when their score is a
    Duplicate (> 0.85); the copy fraction per prompt group."""
    if "deepssim_train" not in cache:
        cache["deepssim_train"] = torch.from_numpy(deepssim.embed(real.train))
    best, _ = topk_neighbors(torch.from_numpy(deepssim.embed(flat)), cache["deepssim_train"], k=1)
    copies = best[:, 0].numpy() > deepssim.threshold
    groups = np.repeat(np.array(gen.groups), gen.images.shape[1])
    return {"threshold": deepssim.threshold, "copy_fraction": float(copies.mean()),
            **{f"copy_fraction_{name}": float(copies[groups == name].mean()) for name in GROUPS if (groups == name).any()}}


def audit_generations(gen: Generations, real: RealImages | None, *, manifest: dict | None = None,
                      copy_detector: CopyDetector | None = None, clip=None, label_classifier=None, deepssim=None,
                      threshold: float | None = None,
                      target_fpr: float = 0.01, train_cache: dict | None = None,
                      threshold_from: str = "given") -> dict:
    """All numbers of one audit (JSON-able). `train_cache` (a dict) keeps training embeddings between calls."""
    cache = train_cache if train_cache is not None else {}
    p, g = gen.images.shape[:2]
    if real is not None and gen.images.shape[2:] != real.train.shape[1:]:
        raise ValueError(f"audit: generations are {gen.images.shape[2:]} px but training images {real.train.shape[1:]}")
    out: dict = {"n_prompts": p, "generations": g,
                 "groups": {k: int((np.array(gen.groups) == k).sum()) for k in set(gen.groups)}}
    out["detection"], out["per_prompt"] = detection_numbers(gen, threshold, threshold_from, target_fpr)
    out["copying"], out["quality"], out["nearest_train_index"] = {"space": None, "nearest_similarity": {}}, {}, None
    if real is None:   # no training images known (a bare export): detection numbers only
        return out
    flat = gen.images.reshape(p * g, *gen.images.shape[2:])
    space, gen_emb, train_emb, copy_threshold = copy_space(flat, real, copy_detector, cache)
    out["copying"], nearest_idx = copying_numbers(gen, real, space, gen_emb, train_emb, copy_threshold, manifest,
                                                  cache)
    if deepssim is not None:
        out["copying"]["deepssim"] = deepssim_copying(gen, flat, real, deepssim, cache)
    out["quality"] = quality_numbers(gen, real, flat, space, gen_emb, copy_detector=copy_detector, clip=clip,
                                     label_classifier=label_classifier, cache=cache)
    out["nearest_train_index"] = nearest_idx.reshape(p, g).tolist()
    _per_prompt_copying(out, gen)
    return out


def _per_prompt_copying(audit: dict, gen: Generations) -> None:
    """Each prompt's copy rate and (planted prompts) share of generations nearest their planted image,
    into its per_prompt row: what engine.audit.paired_audit pairs before and after."""
    per_copy = audit["copying"].pop("copy_fraction_per_prompt", None)
    hits = (audit["copying"].get("planted_pixels") or {}).pop("per_prompt", {})
    for i, row in enumerate(audit["per_prompt"]):
        row["copy_fraction"] = per_copy[i] if per_copy is not None else None
        row["nearest_is_planted"] = hits.get(i)


def audit_series(gens: list[Generations], real: RealImages | None, *, threshold: float | None = None,
                 **kwargs) -> list[dict]:
    """Audits of a baseline and its mitigations, all judged by ONE flagging threshold.

    The threshold is the given one, or the one calibrated on the first (baseline) audit; calibrating
    each audit on its own non-planted prompts would move the threshold with the mitigation and make
    "fraction flagged" incomparable before and after.
    """
    audits, how = [], "given"
    for gen in gens:
        audits.append(audit_generations(gen, real, threshold=threshold, threshold_from=how, **kwargs))
        if threshold is None:
            threshold = audits[0]["detection"]["threshold"]
            how = f"from the first audit ({audits[0]['detection']['threshold_from']})"
    for audit in audits[1:]:   # same prompts, same seeds: every difference to the first audit is paired
        audit["paired_vs_first"] = paired_differences(audits[0], audit)
    return audits


def audit_runs(runs: list[str], names: list[str], inputs: AuditInputs, settings: DetectorSettings, out_dir: str, *,
               device: str = "cpu", threshold: float | None = None, target_fpr: float = 0.01, batch_prompts: int = 16,
               progress: bool = True) -> Comparison:
    """Trained runs (the baseline first, e.g. a training-time mitigation next) on the same prompts and
    seeds, each scanned into out_dir/<i>_<name>/ (resumable); ground truth and real images from `inputs`."""
    loaded_runs = [load_model(r, device) for r in runs]
    for r, m in zip(runs, loaded_runs):
        try:
            encode_prompts(m.vocab, inputs.prompts)
        except ValueError as e:
            raise ValueError(f"{r}: {e}") from None
    gens = [scan_generations(m, inputs.prompts, settings, os.path.join(out_dir, f"{i:02d}_{name}"),
                             manifest=inputs.manifest, batch_prompts=batch_prompts, progress=progress,
                             description=f"scan {name}")
            for i, (name, m) in enumerate(zip(names, loaded_runs))]
    audits = audit_series(gens, inputs.real, manifest=inputs.manifest, threshold=threshold, target_fpr=target_fpr,
                          train_cache={}, **inputs.models())
    note = (f"Same {len(inputs.prompts.prompts)} prompts, same seeds (base {settings.base_seed}), "
            f"{settings.generations} generations, {settings.steps} steps, w = {settings.guidance}. "
            f"Ground truth and real images: {runs[0]}.")
    return Comparison("Before / after", list(names), audits, gens, inputs.real, {"runs_paths": list(runs)}, [note])
