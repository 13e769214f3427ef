"""CFG vs no-CFG, quantified: what conditioning and guidance change in label adherence, image quality
and memorization, on the same prompts and seeds, with intervals.

For every (run, guidance weight) — a run trained with the null prompt (p_uncond > 0) at each weight,
a run trained without it at w = 1 only (its unconditional branch was never trained) — the same
prompts (every planted prompt, a seeded sample of control and ordinary prompts) are generated with
the scan's seed convention (prompt i: seed base + i, G generations from one draw), deterministic DDIM,
and measured:
- label conformance: the label classifier's macro AUC of its scores on the generations against their
  prompts' findings, next to the same number on real held-out images (the ceiling);
- Fréchet distance to held-out images in 8x8 pixels (always) and in the copy detector's embedding
  (when given), next to the real training-vs-held-out distance (the floor);
- memorization: the planted ground truth (share of planted prompts' generations whose nearest training
  image in raw pixels is their planted image, engine.audit.planted_truth; with the null rate) and the
  copy rate (Dar's rule with the given copy detector, per prompt group);
- detection (Wen's score, which needs the null condition): AUC of planted vs control prompts, for
  runs trained with the null prompt only.
Rates resample prompts (a prompt's generations are not independent); AUCs use DeLong's interval;
every (run, w) is also compared with the first run at its first weight by paired differences over the
same prompts (intervals.paired_difference).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from data_pipeline.images import to_model_range, to_uint8
from engine.audit.frechet import frechet_distance_features
from engine.audit.intervals import (
    auc_interval,
    cluster_bootstrap_mean,
    cluster_bootstrap_statistic,
    paired_difference,
)
from engine.audit.label_classifier import per_label_auc, prompt_labels
from engine.audit.nearest_neighbors import topk_neighbors
from engine.audit.planted_truth import nearest_is_planted, planted_sources, prompt_groups
from engine.audit.roc import roc_metrics
from engine.audit.run_data import RealImages
from engine.audit.similarity import pearson_normalize
from engine.diffusion.sampling import sample
from engine.diffusion.seeds import prompt_noise, prompt_seeds

PIXEL_FEATURES = 8


@dataclass
class StudyOptions:
    generations: int = 4
    steps: int = 20
    base_seed: int = 0
    controls: int = 40
    ordinary: int = 40
    n_boot: int = 1000
    batch_prompts: int = 32


def study_prompts(train_prompts: list[str], manifest: dict | None, opts: StudyOptions, seed: int = 0
                  ) -> tuple[list[str], list[str]]:
    """Every planted prompt, then seeded samples of `controls` control and `ordinary` ordinary prompts."""
    prompts = sorted(set(train_prompts))
    groups = prompt_groups(prompts, manifest) or ["ordinary"] * len(prompts)
    rng = np.random.default_rng(seed)
    chosen = [i for i, g in enumerate(groups) if g == "planted"]
    for name, count in (("control", opts.controls), ("ordinary", opts.ordinary)):
        pool = [i for i, g in enumerate(groups) if g == name]
        chosen += sorted(rng.choice(pool, min(count, len(pool)), replace=False).tolist()) if pool else []
    return [prompts[i] for i in chosen], [groups[i] for i in chosen]


@torch.no_grad()
def generate_with_scores(loaded, prompts: list[str], guidance: float, opts: StudyOptions, with_score: bool
                         ) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 [P, G, S, S] generations (scan seed convention, DDIM) and Wen's per-step magnitudes (RMS)
    [P, G, steps] (None when `with_score` is False: the model has no trained null branch)."""
    cfg = loaded.unet_config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    tokens = loaded.vocab.encode_batch(prompts)
    seeds = prompt_seeds(range(len(prompts)), opts.base_seed)
    device = next(loaded.model.parameters()).device
    images, scores = [], []
    for b in range(0, len(prompts), opts.batch_prompts):
        sl = slice(b, b + opts.batch_prompts)
        noise = prompt_noise(seeds[sl], opts.generations, shape, device)
        out = sample(loaded.model, tokens[sl].repeat_interleave(opts.generations, 0).to(device), noise,
                     loaded.schedule, steps=opts.steps, guidance=guidance, sampler="ddim",
                     parameterization=loaded.diffusion_config.parameterization, record_norms=with_score)
        images.append(to_uint8(out.images).reshape(-1, opts.generations, *shape[1:]))
        if with_score:
            scores.append(out.norms_rms.T.reshape(-1, opts.generations, out.norms_rms.shape[0]))
    return np.concatenate(images), (torch.cat(scores).numpy().astype(np.float64) if with_score else None)


def pixel_features(images_u8: np.ndarray) -> np.ndarray:
    x = to_model_range(np.asarray(images_u8))
    return torch.nn.functional.adaptive_avg_pool2d(x, PIXEL_FEATURES).flatten(1).numpy().astype(np.float64)


class Reference:
    """What every (run, w) is measured against, computed once: real images, their features, the
    label classifier's real-image conformance, training pixels for the ground truth."""

    def __init__(self, real: RealImages, manifest: dict | None, copy_detector=None, label_classifier=None):
        self.real, self.manifest = real, manifest
        self.copy_detector, self.label_classifier = copy_detector, label_classifier
        self.train_pixels = pearson_normalize(to_model_range(real.train, False))
        self.spaces = {f"pixels_{PIXEL_FEATURES}x{PIXEL_FEATURES}": pixel_features}
        if copy_detector is not None:
            self.spaces["copy_detector"] = copy_detector.embed
            self.train_emb = pearson_normalize(torch.from_numpy(copy_detector.embed(real.train)))
        self.heldout_features = {k: np.asarray(f(real.heldout), np.float64) for k, f in self.spaces.items()}
        pick = np.random.default_rng(0).choice(len(real.train), min(len(real.train), 4 * len(real.heldout)), replace=False)
        self.floor = {k: frechet_distance_features(np.asarray(f(real.train[pick]), np.float64), self.heldout_features[k])
                      for k, f in self.spaces.items()}
        self.real_conformance = None
        if label_classifier is not None and real.heldout_prompts:
            self.real_conformance = label_classifier.conformance(real.heldout, real.heldout_prompts)


def measure(images: np.ndarray, prompts: list[str], groups: list[str], norms: np.ndarray | None, ref: Reference,
            opts: StudyOptions) -> tuple[dict, dict]:
    """Numbers of one condition (a run at a weight, or a mitigation) from its generations and Wen's
    per-step magnitudes [P, G, S] (None: not applicable); and the per-prompt arrays the paired
    differences need."""
    scores = None if norms is None else np.asarray(norms, np.float64).mean(axis=(1, 2))
    p, g = images.shape[:2]
    flat = images.reshape(p * g, *images.shape[2:])
    clusters = np.repeat(np.arange(p), g)
    groups_arr = np.array(groups)
    out, per_prompt = {"n_prompts": p, "generations": g,
                       "groups": {k: int((groups_arr == k).sum()) for k in sorted(set(groups))}}, {}
    # quality: Fréchet distance, with prompts resampled
    out["frechet"] = {}
    for name, embed in ref.spaces.items():
        feats = np.asarray(embed(flat), np.float64)
        fd = cluster_bootstrap_statistic(
            clusters, lambda i, f=feats, h=ref.heldout_features[name]: frechet_distance_features(f[i], h),
            min(opts.n_boot, 200), 0)
        out["frechet"][name] = {**fd, "real_train_vs_heldout": ref.floor[name], "n_heldout": len(ref.heldout_features[name])}
    # quality: label conformance (the classifier's macro AUC against the prompts' findings)
    if ref.label_classifier is not None:
        lc = ref.label_classifier
        probs, targets = lc.predict(flat), prompt_labels([q for q in prompts for _ in range(g)], lc.labels)
        n_labels = len(lc.labels)

        def macro_of_rows(rows: np.ndarray) -> float:   # rows [n, G * 2L] -> macro AUC of their generations
            x = rows.reshape(-1, 2 * n_labels)
            auc = per_label_auc(x[:, :n_labels], x[:, n_labels:], lc.labels, lc.cfg.min_count)["macro_auc"]
            return float("nan") if auc is None else auc
        rows = np.concatenate([probs, targets], 1).reshape(p, g * 2 * n_labels)
        out["label_conformance"] = {**cluster_bootstrap_statistic(np.arange(p), lambda i: macro_of_rows(rows[i]),
                                                                  min(opts.n_boot, 300), 0),
                                    "real_heldout": ref.real_conformance}
        per_prompt["label_rows"], per_prompt["label_macro"] = rows, macro_of_rows
    # memorization: pixel-space ground truth of planted prompts, with the null rate of the others
    nearest = topk_neighbors(pearson_normalize(to_model_range(flat, False)), ref.train_pixels, 1)[1][:, 0].numpy()
    nearest = nearest.reshape(p, g)
    if ref.manifest and "planted" in groups:
        sources = planted_sources(prompts, groups, ref.manifest)
        hits = np.stack([nearest_is_planted(nearest[i], ref.real.train_paths, paths) for i, paths in sources.items()])
        others = nearest[groups_arr != "planted"].ravel()
        null = [nearest_is_planted(others, ref.real.train_paths, paths).mean() for paths in sources.values()]
        out["planted_nearest_is_planted"] = {**cluster_bootstrap_mean(hits.astype(float), opts.n_boot),
                                             "null_rate": float(np.mean(null)) if len(others) else None,
                                             "n_null_generations": int(len(others))}
        per_prompt["planted_hits"] = hits.astype(float)
    # memorization: Dar's copy rate with the given detector
    if ref.copy_detector is not None and ref.copy_detector.threshold is not None:
        v, _ = topk_neighbors(pearson_normalize(torch.from_numpy(ref.copy_detector.embed(flat))), ref.train_emb, 1)
        copies = (v[:, 0].numpy() > ref.copy_detector.threshold).reshape(p, g).astype(float)
        out["copy_rate"] = {"threshold": float(ref.copy_detector.threshold),
                            **{name: cluster_bootstrap_mean(copies[groups_arr == name], opts.n_boot)
                               for name in ("planted", "control", "ordinary") if (groups_arr == name).any()}}
        per_prompt["copies"] = copies
    # detection: Wen's score, planted vs controls (needs the null branch)
    if scores is not None and {"planted", "control"} <= set(groups):
        pos, neg = scores[groups_arr == "planted"], scores[groups_arr == "control"]
        det = {"score": "Wen mean conditional-noise magnitude (RMS)"}
        if len(pos) >= 2 and len(neg) >= 2:
            det.update(auc_interval(pos, neg))
        else:
            det.update(auc=roc_metrics(pos, neg).auc, ci95=[None, None], n_positive=len(pos), n_negative=len(neg),
                       note="fewer than 2 planted or control prompts: no interval")
        out["detection"] = det
        both = np.isin(groups_arr, ["planted", "control"])
        per_prompt["detection_rows"] = np.c_[scores[both], groups_arr[both] == "planted"].astype(np.float64)
    return out, per_prompt


def paired_to_reference(per: dict, ref_per: dict, n_boot: int) -> dict:
    """This (run, w) minus the reference (run, w), resampling the same prompts on both sides."""
    out = {}
    for key, name in (("planted_hits", "planted_nearest_is_planted"), ("copies", "copy_rate_all")):
        if key in per and key in ref_per:
            out[name] = paired_difference(ref_per[key], per[key], n_boot=n_boot)
    if "detection_rows" in per and "detection_rows" in ref_per:
        def auc(x: np.ndarray) -> float:   # a resample may hold no planted (or no control) prompt
            pos, neg = x[x[:, 1] == 1, 0], x[x[:, 1] == 0, 0]
            return roc_metrics(pos, neg).auc if len(pos) and len(neg) else float("nan")
        out["wen_auc_planted_vs_control"] = paired_difference(ref_per["detection_rows"], per["detection_rows"],
                                                              statistic=auc, n_boot=n_boot)
    if "label_rows" in per and "label_rows" in ref_per:
        # a row is one prompt: its G generations' classifier scores and prompt targets, side by side
        macro = per["label_macro"]
        out["label_conformance_macro_auc"] = paired_difference(ref_per["label_rows"], per["label_rows"],
                                                               statistic=macro, n_boot=min(n_boot, 300))
    return out


@dataclass
class Condition:
    """One set of generations of the study's prompts and seeds: a run at a weight, or a mitigation."""
    name: str
    images: np.ndarray                    # uint8 [P, G, S, S]
    norms: np.ndarray | None              # Wen's per-step magnitudes [P, G, S]; None: no null branch
    reference: str | None = None          # paired differences against this condition's name
    info: dict | None = None              # anything to report beside the numbers


NO_NULL_BRANCH = "trained without the null prompt (p_uncond = 0): Wen's score needs the unconditional branch"


def measure_conditions(conditions: list[Condition], prompts: list[str], groups: list[str], ref: Reference,
                       opts: StudyOptions, log=lambda s: None) -> list[dict]:
    """Numbers of every condition, each with its paired differences against its reference."""
    results, per_of = [], {}
    for c in conditions:
        log(f"measuring {c.name}")
        numbers, per_of[c.name] = measure(c.images, prompts, groups, c.norms, ref, opts)
        numbers.update({"name": c.name, **(c.info or {})})
        if c.norms is None:
            numbers["detection"] = {"not_applicable": NO_NULL_BRANCH}
        if c.reference is not None:
            if c.reference not in per_of:
                raise ValueError(f"condition {c.name!r}: its reference {c.reference!r} must be measured before it")
            numbers["paired_vs_reference"] = {"reference": c.reference,
                                              **paired_to_reference(per_of[c.name], per_of[c.reference], opts.n_boot)}
        results.append(numbers)
    return results


def quantify_runs(runs: list, names: list[str], weights: list[list[float]], real: RealImages, manifest: dict | None,
                  train_prompts: list[str], *, copy_detector=None, label_classifier=None,
                  opts: StudyOptions = StudyOptions(), log=lambda s: None) -> dict:
    """Numbers of every (run, w) on the same prompts and seeds; `runs` are loaded models (engine.model.
    export.LoadedModel); weights[i] the guidance weights of run i. The first (run, w) is the reference
    of the paired differences."""
    prompts, groups = study_prompts(train_prompts, manifest, opts)
    ref = Reference(real, manifest, copy_detector, label_classifier)
    conditions = []
    for loaded, name, ws in zip(runs, names, weights):
        null_branch = (loaded.metadata.get("p_uncond") or 0) > 0
        for w in ws:
            log(f"{name} w = {w:g}: generating {len(prompts)} prompts x {opts.generations}")
            images, norms = generate_with_scores(loaded, prompts, w, opts, with_score=null_branch)
            conditions.append(Condition(f"{name} w = {w:g}", images, norms,
                                        reference=conditions[0].name if conditions else None,
                                        info={"run": name, "guidance": w, "trained_with_null_prompt": null_branch}))
    results = measure_conditions(conditions, prompts, groups, ref, opts, log)
    return {"options": asdict(opts), "prompts": prompts, "groups": groups, "results": results,
            "n_train_images": int(len(real.train)), "n_heldout_images": int(len(real.heldout))}
