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
  interval and the null rate of generations that never asked for the planted image;
- quality: Fréchet distance between generated and held-out real images in each feature space
  available offline (copy-detection embedding, CLIP if given, and 8x8 pixels always), next to the
  same distance between real training and held-out images (the floor a perfect model would reach);
  with a label classifier, label conformance of the generations to their prompts next to the same
  number on real held-out images.

Generations come from engine.audit.scan.scan_prompts (resumable; images saved as PNGs and read back) or
from any other generator that yields a `Generations` (e.g. the optimised-embedding sampler).
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.images import read_png, to_model_range
from engine.audit.copy_detection import CopyDetector, copy_statistics, dar_threshold
from engine.audit.frechet import frechet_distance_features
from engine.audit.nearest_neighbors import topk_neighbors
from engine.audit.roc import calibrate_threshold, roc_metrics
from engine.audit.scan import PromptList, prompt_groups, scan_prompts
from engine.audit.similarity import pearson_normalize
from engine.audit.wen_detector import DetectorSettings, mean_score
from engine.reports.figures import figure_img, png_data_uri, pyplot

PIXEL_FEATURE_SIZE = 8


@dataclass
class Generations:
    prompts: list[str]
    groups: list[str]              # planted / control / ordinary per prompt
    seeds: list[int]
    norms_rms: np.ndarray          # [P, G, S]
    images: np.ndarray             # uint8 [P, G, S, S]
    truth_prompts: list[str] | None = None   # prompts whose planted tokens are the ground truth (default: prompts)


@dataclass
class RealImages:
    train: np.ndarray              # uint8 [N, S, S]
    train_paths: list[str]         # image path of each training image (planted copies share one)
    heldout: np.ndarray            # uint8 [M, S, S] validation/test images, never trained on
    heldout_prompts: list[str] | None = None   # their prompts (label conformance of real images)


def scan_generations(loaded, prompt_list: PromptList, settings: DetectorSettings, out_dir: str, *,
                     manifest: dict | None, groups: list[str] | None = None, batch_prompts: int = 16,
                     progress: bool = True, description: str = "scan") -> Generations:
    """Scan (resumably) into out_dir/scores.parquet with images under out_dir/images, read both back."""
    os.makedirs(out_dir, exist_ok=True)
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


# ---- planted ground truth -----------------------------------------------------------------------------

def planted_sources(gen: Generations, manifest: dict) -> dict[int, set[str]]:
    """Prompt index -> image path(s) planted under that prompt's planted token(s), for planted prompts."""
    token_path = {e["token"]: e["image_path"] for e in manifest.get("planted", [])}
    out = {}
    for i, (prompt, group) in enumerate(zip(gen.truth_prompts or gen.prompts, gen.groups)):
        if group == "planted":
            out[i] = {token_path[t] for t in prompt.partition("|")[2].split() if t in token_path}
    return out


def planted_pixel_match(gen: Generations, real: RealImages, manifest: dict, cache: dict) -> dict:
    """How close planted prompts' generations come to THEIR planted image, in raw pixels.

    Pixel Pearson correlation needs no learned model, so this is the audit's ground truth for the
    planted duplicates: for every planted generation, its correlation to its own planted image and
    whether that image is its nearest training image. `null_rate` is the same event for generations
    that never asked for it: the share of the audit's non-planted prompts' generations whose nearest
    training image is a given planted image, averaged over the planted images (None without
    non-planted prompts) — the level a mitigation that removes the copying should come down to.
    """
    sources = planted_sources(gen, manifest)
    if not sources:
        return {}
    if "pixel_train" not in cache:
        cache["pixel_train"] = pearson_normalize(torch.from_numpy(real.train.reshape(len(real.train), -1)).float())
    train_vec = cache["pixel_train"]
    train_paths = np.array(real.train_paths)
    g = gen.images.shape[1]

    def nearest_paths(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = pearson_normalize(torch.from_numpy(images.reshape(len(images), -1)).float())
        corr = (q @ train_vec.T).numpy()                              # [n, N]
        return corr, train_paths[corr.argmax(1)]

    own, hits_per_prompt, source_paths = [], [], []
    for i, paths in sources.items():
        mine = np.isin(train_paths, list(paths))
        if not mine.any():
            continue
        source_paths.append(list(paths))
        corr, nearest = nearest_paths(gen.images[i])
        own += corr[:, mine].max(1).tolist()
        hits_per_prompt.append(np.isin(nearest, list(paths)).astype(np.float64))
    if not own:
        return {}
    others = [i for i, group in enumerate(gen.groups) if group != "planted"]
    null_rate = None
    if others:
        _, nearest = nearest_paths(gen.images[others].reshape(-1, *gen.images.shape[2:]))
        null_rate = float(np.mean([np.isin(nearest, paths).mean() for paths in source_paths]))
    hits = np.stack(hits_per_prompt)                                 # [P_planted, G]
    return {"own_correlation": _summary(np.array(own)),
            "nearest_is_planted_fraction": float(hits.mean()),
            "nearest_is_planted_ci95": prompt_bootstrap_ci(hits),
            "null_rate": null_rate, "n_null_generations": len(others) * g}


def prompt_bootstrap_ci(per_prompt: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95% interval of the mean of [P, G] values, resampling whole prompts (a prompt's generations
    share its conditioning, so they are not independent draws)."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(per_prompt), size=(n_boot, len(per_prompt)))
    means = per_prompt.mean(1)[pick].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


# ---- one audit --------------------------------------------------------------------------------------

def _summary(values: np.ndarray) -> dict:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"n": 0}
    q = np.percentile(v, [5, 25, 50, 75, 95])
    return {"n": int(v.size), "mean": float(v.mean()), "p05": q[0], "p25": q[1], "median": q[2], "p75": q[3],
            "p95": q[4], "values": v.tolist()}


def audit_generations(gen: Generations, real: RealImages | None, *, manifest: dict | None = None,
                      copy_detector: CopyDetector | None = None, clip=None, label_classifier=None,
                      threshold: float | None = None,
                      target_fpr: float = 0.01, train_cache: dict | None = None,
                      threshold_from: str = "given") -> dict:
    """All numbers of one audit (JSON-able). `train_cache` (a dict) keeps training embeddings between calls."""
    cache = train_cache if train_cache is not None else {}
    p, g = gen.images.shape[:2]
    if real is not None and gen.images.shape[2:] != real.train.shape[1:]:
        raise ValueError(f"audit: generations are {gen.images.shape[2:]} px but training images {real.train.shape[1:]}")
    groups = np.array(gen.groups)
    score = mean_score(torch.from_numpy(gen.norms_rms)).numpy().astype(np.float64)
    first = mean_score(torch.from_numpy(gen.norms_rms), (0, 1)).numpy().astype(np.float64)
    out: dict = {"n_prompts": p, "generations": g, "groups": {k: int((groups == k).sum()) for k in set(gen.groups)}}

    # detection
    negatives = groups != "planted"
    if threshold is None and negatives.any():
        threshold_used, how = calibrate_threshold(score[negatives], target_fpr), f"calibrated at FPR {target_fpr}"
    else:
        threshold_used, how = threshold, threshold_from
    flagged = score > threshold_used if threshold_used is not None else np.zeros(p, bool)
    det = {"threshold": threshold_used, "threshold_from": how, "score_mean": float(score.mean()),
           "flagged_fraction": float(flagged.mean())}
    for name in ("planted", "control", "ordinary"):
        m = groups == name
        if m.any():
            det[f"{name}_score_mean"] = float(score[m].mean())
            det[f"{name}_flagged_fraction"] = float(flagged[m].mean())
    for s_name, s in (("score", score), ("first_step_score", first)):
        for neg in ("control", "ordinary"):
            if (groups == "planted").any() and (groups == neg).any():
                det[f"auc/{s_name}/planted_vs_{neg}"] = roc_metrics(s[groups == "planted"], s[groups == neg]).to_dict()
    out["detection"] = det
    out["per_prompt"] = [{"prompt": gen.prompts[i], "group": gen.groups[i], "seed": gen.seeds[i],
                          "score": float(score[i]), "first_step_score": float(first[i]), "flagged": bool(flagged[i])}
                         for i in range(p)]

    out["copying"], out["quality"], out["nearest_train_index"] = {"space": None, "nearest_similarity": {}}, {}, None
    if real is None:   # no training images known (a bare export): detection numbers only
        return out
    # copying: nearest training image of every generation in the primary space
    flat = gen.images.reshape(p * g, *gen.images.shape[2:])
    if copy_detector is not None:
        space = "copy_detector"
        if "dar_train" not in cache:
            cache["dar_train"] = copy_detector.embed(real.train)
        train_emb, gen_emb = cache["dar_train"], copy_detector.embed(flat)
        copy_threshold = copy_detector.threshold
    else:
        space = "pixel_correlation"
        to_vec = lambda a: to_model_range(a, False).reshape(len(a), -1).numpy()  # noqa: E731
        train_emb, gen_emb = to_vec(real.train), to_vec(flat)
        if "pixel_threshold" not in cache:
            cache["pixel_threshold"] = dar_threshold(train_emb, to_vec(real.heldout)) if len(real.heldout) else None
        copy_threshold = cache["pixel_threshold"]
    best_v, best_i = topk_neighbors(pearson_normalize(torch.from_numpy(gen_emb)),
                                    pearson_normalize(torch.from_numpy(train_emb)), k=1)
    nearest = best_v[:, 0].numpy().astype(np.float64)
    nearest_idx = best_i[:, 0].numpy()
    copying = {"space": space, "nearest_similarity": _summary(nearest)}
    per_gen_group = np.repeat(groups, g)
    for name in ("planted", "control", "ordinary"):
        m = per_gen_group == name
        if m.any():
            copying[f"nearest_similarity_{name}"] = _summary(nearest[m])
    if copy_threshold is not None:
        stats = copy_statistics(gen_emb, train_emb, copy_threshold)
        stats.pop("generated_max_correlation")
        copying["dar"] = stats
        copies = nearest > copy_threshold
        for name in ("planted", "control", "ordinary"):
            m = per_gen_group == name
            if m.any():
                copying[f"copy_fraction_{name}"] = float(copies[m].mean())
    if manifest and manifest.get("planted"):
        hits = [real.train_paths[nearest_idx[i * g + j]] in paths
                for i, paths in planted_sources(gen, manifest).items() for j in range(g)]
        copying["planted_nearest_is_planted_fraction"] = float(np.mean(hits)) if hits else None
        copying["planted_pixels"] = planted_pixel_match(gen, real, manifest, cache)
    out["copying"] = copying
    out["nearest_train_index"] = nearest_idx.reshape(p, g).tolist()

    # quality: Fréchet distance to held-out real images
    quality = {}
    if len(real.heldout) >= 2:
        for name, embed in feature_spaces(copy_detector, clip).items():
            if f"fd_{name}" not in cache:
                held = np.asarray(embed(real.heldout), np.float64)
                n_ref = min(len(real.train), max(len(flat), len(real.heldout)))
                pick = np.random.default_rng(0).choice(len(real.train), n_ref, replace=False)
                cache[f"fd_{name}"] = (held, frechet_distance_features(np.asarray(embed(real.train[pick])), held))
            held, floor = cache[f"fd_{name}"]
            # the copy detector already embedded these generations for the copy statistics above
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
    out["quality"] = quality
    return out


# ---- report --------------------------------------------------------------------------------------


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
    return audits

def headline(audit: dict) -> dict:
    """The few numbers a before/after table shows, flat."""
    det, cop, q = audit["detection"], audit["copying"], audit["quality"]
    row = {"score mean (rms)": det["score_mean"], "planted score mean": det.get("planted_score_mean"),
           "control score mean": det.get("control_score_mean"),
           "planted flagged": det.get("planted_flagged_fraction"), "threshold": det["threshold"],
           "AUC planted vs control": (det.get("auc/score/planted_vs_control") or {}).get("auc"),
           "TPR@1%FPR planted vs control": (det.get("auc/score/planted_vs_control") or {}).get("tpr_at_1pct_fpr"),
           f"nearest-train sim. median ({cop['space']})": cop["nearest_similarity"].get("median"),
           "copy rate (Dar)": (cop.get("dar") or {}).get("copy_fraction"),
           "copy rate, planted prompts": cop.get("copy_fraction_planted"),
           "planted: nearest is planted image": cop.get("planted_nearest_is_planted_fraction")}
    pix = cop.get("planted_pixels") or {}
    if pix:
        row["planted: nearest is planted image (pixels)"] = pix["nearest_is_planted_fraction"]
        row["  95% interval (prompts resampled); null rate (other prompts' generations)"] = \
            "[{:.3g}, {:.3g}]; {}".format(*pix["nearest_is_planted_ci95"], _fmt(pix["null_rate"]))
        row["planted: correlation to own planted image, median (pixels)"] = pix["own_correlation"]["median"]
    for name, v in q.items():
        if name == "label_conformance":
            real_auc = (v.get("real_heldout") or {}).get("macro_auc")
            row[f"label conformance, macro AUC (real held-out {_fmt(real_auc)})"] = v["generated"]["macro_auc"]
        else:
            row[f"FD {name} (real floor {v['real_train_vs_heldout']:.3g})"] = v["frechet_to_heldout"]
    return row


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def comparison_table(names: list[str], audits: list[dict]) -> str:
    rows = [headline(a) for a in audits]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    head = "<tr><th>measure</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
    body = "".join("<tr><td>" + html.escape(k) + "</td>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for r in rows)
                   + "</tr>" for k in keys)
    return f"<table>{head}{body}</table>"


def distribution_plot(names: list[str], audits: list[dict]) -> str:
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.4))
    for name, a in zip(names, audits):
        v = a["copying"]["nearest_similarity"].get("values", [])
        axes[0].hist(v, bins=30, histtype="step", label=name)
        axes[1].scatter([name] * len(a["per_prompt"]), [r["score"] for r in a["per_prompt"]], s=10,
                        c=["tab:red" if r["group"] == "planted" else "tab:blue" for r in a["per_prompt"]])
    axes[0].set(xlabel=f"nearest training similarity ({audits[0]['copying']['space']})", ylabel="generations")
    axes[0].legend(fontsize=7)
    axes[1].set(ylabel="memorization score (rms)", title="per prompt (red: planted)")
    return figure_img(fig)


def side_by_side_grid(names: list[str], gens: list[Generations], real: RealImages, audits: list[dict],
                      max_prompts: int = 8) -> str:
    """For the first planted prompts (then others): generation 0 of every run and each one's nearest training image."""
    order = sorted(range(len(gens[0].prompts)), key=lambda i: (gens[0].groups[i] != "planted", i))[:max_prompts]
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(n)}</th><th>nearest train</th>" for n in names) + "</tr>"
    rows = []
    for i in order:
        cells = [f"<td><code>{html.escape(gens[0].prompts[i])}</code><br>{html.escape(gens[0].groups[i])}</td>"]
        for gen, a in zip(gens, audits):
            nn_i = a["nearest_train_index"][i][0] if a["nearest_train_index"] else None
            cells.append(f'<td><img width="96" style="image-rendering:pixelated" src="{png_data_uri(gen.images[i, 0])}"><br>'
                         f'score {a["per_prompt"][i]["score"]:.4f}</td>')
            cells.append(f'<td><img width="96" style="image-rendering:pixelated" src="{png_data_uri(real.train[nn_i])}"></td>'
                         if real is not None else "<td>–</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1300px}table{border-collapse:collapse}"
       "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;vertical-align:top}")


def render_comparison_html(title: str, names: list[str], audits: list[dict], gens: list[Generations],
                           real: RealImages, notes: list[str] = (), extra_html: str = "") -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    parts += ["<h2>Numbers</h2>", comparison_table(names, audits), "<h2>Distributions</h2>",
              distribution_plot(names, audits), extra_html, "<h2>Side by side (same prompt, same seed)</h2>",
              side_by_side_grid(names, gens, real, audits), "</body></html>"]
    return "".join(parts)

