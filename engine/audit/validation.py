"""Validating memorization scores against the training set: are high-scoring prompts' generations copies?

For selected prompts (top- and bottom-scoring, planted, and an even spread over the score ranking)
the scan's generations are reproduced from their recorded seeds, and every generated image is
compared with the whole training set under several similarities: pixel Pearson correlation, SSIM,
CLIP cosine and (if a detector is given) Dar et al.'s copy-detection correlation. The result is a
plain dict of numbers (JSON-able) plus the images the report shows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from data_pipeline.images import read_png, to_model_range, to_uint8
from engine.audit.clip_embedding import ClipEmbedder, ClipSpec
from engine.audit.copy_detection import CopyDetector, copy_statistics, load_copy_detector
from engine.audit.copy_rule import pixel_copy_threshold, pixel_nearest
from engine.audit.deepssim import load_deepssim
from engine.audit.detectors.nearest_training import TrainingNeighbours
from engine.audit.exposure import exposed_training_images, patient_ids
from engine.audit.intervals import detection_summary
from engine.audit.nearest_neighbors import array_fingerprint, cached_embeddings, topk_neighbors
from engine.audit.planted_truth import nearest_is_planted, planted_sources
from engine.audit.roc import roc_curve
from engine.audit.run_data import TrainingImages, read_manifest, read_splits, split_images
from engine.audit.scan import model_fingerprint, planted_comparisons, read_scores, scan_metadata, scan_settings
from engine.audit.score_vs_copies import score_vs_copies
from engine.audit.similarity import cosine_normalize, pearson_normalize, ssim_pairwise
from engine.audit.wen_detector import detect, mean_score
from engine.model.export import load_model
from engine.model.null_condition import require_null_condition


@dataclass
class ValidationOptions:
    top_k: int = 8
    bottom_k: int = 8
    max_planted: int = 20
    spread: int = 48                       # extra prompts spread over the ranking for the correlations
    batch_prompts: int = 16
    neighbors: int = 3
    bootstrap: int = 1000
    tsne_train: int = 500
    seed: int = 0
    clip: ClipSpec = field(default_factory=ClipSpec)
    cache_dir: str | None = None


@dataclass
class ValidationResult:
    numbers: dict                          # everything, JSON-able
    generated: np.ndarray                  # uint8 [P, G, S, S] of the selected prompts
    train_images: np.ndarray               # uint8 [N, S, S]
    figures: dict[str, bytes]              # name -> PNG


def select_prompts(table: pa.Table, opts: ValidationOptions) -> dict[str, list[int]]:
    """Row positions of the top, bottom, planted and spread prompts (by the mean score)."""
    score = table.column("score").to_numpy()
    order = np.argsort(-score, kind="stable")
    groups = table.column("group").to_pylist() if "group" in table.column_names else [None] * len(score)
    planted = [int(i) for i in order if groups[i] == "planted"][:opts.max_planted]
    n_spread = min(opts.spread, len(order))
    spread = [int(order[int(round(j))]) for j in np.linspace(0, len(order) - 1, n_spread)] if n_spread else []
    return {"top": [int(i) for i in order[:opts.top_k]],
            "bottom": [int(i) for i in order[::-1][:opts.bottom_k]],
            "planted": planted, "spread": spread}


def regenerate(loaded, table: pa.Table, rows: list[int], opts: ValidationOptions, progress: bool = True):
    """Generated images [P, G, C, H, W] of the rows, from the scan's settings and seeds, and the
    largest difference between the reproduced and the recorded mean score (a consistency check)."""
    settings = scan_settings(table)
    cfg = loaded.unet_config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    tokens = torch.tensor([table.column("tokens")[i].as_py() for i in rows], dtype=torch.long)
    seeds = [int(table.column("seed")[i].as_py()) for i in rows]
    images, scores = [], []
    for b in tqdm(range(0, len(rows), opts.batch_prompts), desc="regenerate", unit="batch", disable=not progress):
        sl = slice(b, b + opts.batch_prompts)
        det = detect(loaded.model, loaded.schedule, tokens[sl], seeds[sl], settings, image_shape=shape,
                     parameterization=loaded.diffusion_config.parameterization, keep_images=True)
        images.append(det.images)
        scores.append(mean_score(det.norms_rms, _step_range(table)))
    recorded = torch.tensor([table.column("score")[i].as_py() for i in rows])
    drift = float((torch.cat(scores) - recorded).abs().max()) if rows else 0.0
    return torch.cat(images), drift


def scanned_generations(loaded, table: pa.Table, opts: ValidationOptions, scan_images: str | None = None,
                        progress: bool = True) -> tuple[np.ndarray, str]:
    """uint8 [P, G, S, S] generations of EVERY scanned prompt: read from the scan's --save-images folder
    when it holds all of them (`<prompt_index>_g<g>.png`), else made again from the recorded seeds."""
    g = int(scan_metadata(table)["scan"]["settings"]["generations"])
    index = table.column("prompt_index").to_pylist()
    if scan_images:
        names = [[os.path.join(scan_images, f"{i:06d}_g{j}.png") for j in range(g)] for i in index]
        if all(os.path.isfile(n) for row in names for n in row):
            return np.stack([np.stack([read_png(n) for n in row]) for row in names]), f"read from {scan_images}"
    images, _ = regenerate(loaded, table, list(range(len(table))), opts, progress)
    return to_uint8(images), "made again from the scan's seeds"


def _step_range(table: pa.Table):
    r = scan_metadata(table).get("step_range")
    return tuple(r) if r else None


def bootstrap_spearman(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> dict:
    """Spearman rho with a 95% percentile bootstrap interval over resampled prompts."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": None, "ci95": [None, None], "n": int(len(x))}
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boots.append(spearmanr(x[i], y[i]).statistic)
    ci = [float(v) for v in np.percentile(boots, [2.5, 97.5])] if boots else [None, None]
    return {"rho": rho, "ci95": ci, "n": int(len(x))}


def neighbors_by_metric(generated_u8: np.ndarray, train: TrainingImages, opts: ValidationOptions,
                        copy_detector: CopyDetector | None, clip: ClipEmbedder | None, deepssim=None) -> dict:
    """For each metric: (values [Q, k], indices [Q, k]) of the nearest training images, plus embeddings."""
    q, keys = to_model_range(generated_u8, False), to_model_range(train.images, False)
    k = opts.neighbors
    out = {}
    v, i = topk_neighbors(pearson_normalize(q), pearson_normalize(keys), k)
    out["pixel_correlation"] = (v, i)
    v, i = topk_neighbors(q, keys, k, similarity=ssim_pairwise, query_chunk=32, key_chunk=256)
    out["ssim"] = (v, i)
    embeddings = {}
    if clip is not None:
        train_emb = cached_embeddings(opts.cache_dir, train.images, clip.spec.cache_key(), clip.embed)
        gen_emb = clip.embed(generated_u8)
        out["clip_cosine"] = topk_neighbors(cosine_normalize(torch.from_numpy(gen_emb)),
                                            cosine_normalize(torch.from_numpy(train_emb)), k)
        embeddings["clip"] = (train_emb, gen_emb)
    if copy_detector is not None:
        train_emb = cached_embeddings(opts.cache_dir, train.images, "dar:" + copy_detector.weight_hash(),
                                      copy_detector.embed)
        gen_emb = copy_detector.embed(generated_u8)
        out["dar_correlation"] = topk_neighbors(pearson_normalize(torch.from_numpy(gen_emb)),
                                                pearson_normalize(torch.from_numpy(train_emb)), k)
        embeddings["dar"] = (train_emb, gen_emb)
    if deepssim is not None:
        train_emb = cached_embeddings(opts.cache_dir, train.images, "deepssim:" + deepssim.weight_hash(), deepssim.embed)
        gen_emb = deepssim.embed(generated_u8)                       # unit norm: the dot product is the score
        out["deepssim"] = topk_neighbors(torch.from_numpy(gen_emb), torch.from_numpy(train_emb), k)
    return {"neighbors": out, "embeddings": embeddings}


def tsne_coordinates(train_emb: np.ndarray, gen_emb: np.ndarray, n_train: int, seed: int) -> dict:
    from sklearn.manifold import TSNE
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(train_emb), size=min(n_train, len(train_emb)), replace=False))
    x = np.concatenate([train_emb[pick], gen_emb]).astype(np.float64)
    perplexity = float(max(2.0, min(30.0, (len(x) - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return {"train_index": pick.tolist(), "train_xy": xy[:len(pick)].tolist(), "generated_xy": xy[len(pick):].tolist()}


def roc_curves(table: pa.Table, manifest: dict | None = None) -> dict:
    """ROC curves and detection summaries (intervals, n) of planted prompts vs controls / ordinary prompts
    on the evaluation half (engine.audit.detection_metrics), where the scan has groups."""
    out = {}
    for name, pos, neg in planted_comparisons(table, manifest):
        if len(pos) < 2 or len(neg) < 2:
            continue
        fpr, tpr, _ = roc_curve(pos, neg)
        out[name] = {**detection_summary(pos, neg).to_dict(), "half": "evaluation", "fpr": fpr.tolist(),
                     "tpr": tpr.tolist()}
    return out


def all_prompts_vs_copies(loaded, table: pa.Table, train: TrainingImages, heldout: np.ndarray, manifest: dict | None,
                          opts: ValidationOptions, scan_images: str | None, progress: bool) -> tuple[dict, np.ndarray]:
    """engine.audit.score_vs_copies over every scanned prompt (JSON-able), and the generations it used."""
    generated, source = scanned_generations(loaded, table, opts, scan_images, progress)
    p, g = generated.shape[:2]
    nearest, _ = pixel_nearest(generated.reshape(p * g, *generated.shape[2:]), train.images)
    groups = table.column("group").to_pylist() if "group" in table.column_names else None
    out = score_vs_copies(table.column("score").to_numpy(), nearest.reshape(p, g),
                          pixel_copy_threshold(train.images, heldout), table.column("prompt").to_pylist(), groups,
                          manifest)
    return {**out, "generations_source": source}, generated


def validate(loaded, table: pa.Table, train: TrainingImages, *, manifest: dict | None = None,
             copy_detector: CopyDetector | None = None, opts: ValidationOptions = ValidationOptions(),
             use_clip: bool = True, heldout: np.ndarray | None = None, scan_images: str | None = None,
             progress: bool = True, deepssim=None) -> ValidationResult:
    """The validation numbers of a scan. With `heldout` (uint8 held-out images) also the score against
    copies over every scanned prompt (engine.audit.score_vs_copies; generations from `scan_images`
    when the scan saved them all); with `deepssim`, DeepSSIM's copy share."""
    if len(table) == 0:
        raise ValueError("validate: the scores table has no rows")
    size = loaded.unet_config.image_size
    if train.images.shape[1:] != (size, size):
        raise ValueError(f"validate: training images are {train.images.shape[1:]}, the model makes {size}x{size}")
    selection = select_prompts(table, opts)
    rows = sorted({i for ids in selection.values() for i in ids})
    images, drift = regenerate(loaded, table, rows, opts, progress)
    n_p, n_g = images.shape[:2]
    generated = to_uint8(images)                                  # [P, G, S, S]
    flat = generated.reshape(n_p * n_g, size, size)
    clip = ClipEmbedder(opts.clip) if use_clip else None
    found = neighbors_by_metric(flat, train, opts, copy_detector, clip, deepssim)

    score = table.column("score").to_numpy()
    first = table.column("first_step_score").to_numpy()
    groups = table.column("group").to_pylist() if "group" in table.column_names else [None] * len(table)
    prompts_out = []
    nearest = {m: np.zeros(n_p) for m in found["neighbors"]}
    for p, row in enumerate(rows):
        entry = {"row": row, "prompt_index": int(table.column("prompt_index")[row].as_py()),
                 "prompt": table.column("prompt")[row].as_py(), "group": groups[row],
                 "score": float(score[row]), "first_step_score": float(first[row]),
                 "seed": int(table.column("seed")[row].as_py()), "neighbors": {}}
        for metric, (v, i) in found["neighbors"].items():
            v = v[p * n_g:(p + 1) * n_g]
            i = i[p * n_g:(p + 1) * n_g]
            nearest[metric][p] = float(v[:, 0].max())
            entry["neighbors"][metric] = {"values": v.tolist(), "train_indices": i.tolist(),
                                          "nearest": nearest[metric][p]}
        prompts_out.append(entry)

    correlations = {m: {**bootstrap_spearman(score[rows], nearest[m], opts.bootstrap, opts.seed),
                        "prompts": "the weighted selection (top, bottom, planted, spread over the ranking)"}
                    for m in nearest}
    numbers = {
        "n_prompts_scanned": int(len(table)), "n_train_images": int(len(train.images)),
        "generations": int(n_g), "selection": {k: [int(table.column("prompt_index")[i].as_py()) for i in v]
                                               for k, v in selection.items()},
        "regenerated_score_max_abs_diff": drift,
        "clip": {"model": opts.clip.model_name, "pretrained": opts.clip.pretrained,
                 "random_init": opts.clip.is_random} if use_clip else None,
        "train_fingerprint": array_fingerprint(train.images),
        "prompts": prompts_out,
        "spearman_score_vs_nearest_similarity": correlations,
        "roc": roc_curves(table, manifest),
    }
    if copy_detector is not None and copy_detector.threshold is not None:
        train_emb, gen_emb = found["embeddings"]["dar"]
        numbers["dar"] = copy_statistics(gen_emb, train_emb, copy_detector.threshold)
    if deepssim is not None:   # DeepSSIM's copy rule: the nearest training image is a Duplicate (> 0.85)
        best = found["neighbors"]["deepssim"][0][:, 0].numpy()
        numbers["deepssim"] = {"threshold": deepssim.threshold, "n_generated": int(len(best)),
                               "n_copies": int((best > deepssim.threshold).sum()),
                               "copy_fraction": float((best > deepssim.threshold).mean())}
    if manifest:
        numbers["planted"] = planted_recovery(prompts_out, train, manifest)
    if heldout is not None and len(heldout):
        numbers["score_vs_copies"], everything = all_prompts_vs_copies(loaded, table, train, heldout, manifest, opts,
                                                                       scan_images, progress)
        # the selection's generations, made again here, must be the scan's: a check of the saved images
        numbers["score_vs_copies"]["selection_max_abs_pixel_diff"] = int(np.abs(
            everything[rows].astype(np.int16) - generated.astype(np.int16)).max()) if rows else 0
    if "clip" in found["embeddings"]:
        train_emb, gen_emb = found["embeddings"]["clip"]
        tsne = tsne_coordinates(train_emb, gen_emb, opts.tsne_train, opts.seed)
        high = set(selection["top"])
        tsne["generated_high_score"] = [rows[j // n_g] in high for j in range(len(gen_emb))]
        numbers["tsne"] = tsne
    return ValidationResult(numbers, generated, train.images, {})


def planted_recovery(prompts_out: list[dict], train: TrainingImages, manifest: dict) -> dict:
    """For planted prompts: the share of generations whose nearest training image (pixel correlation)
    is the planted image (any of its copies, which share its path)."""
    sources = planted_sources([e["prompt"] for e in prompts_out], [e["group"] for e in prompts_out], manifest)
    per_prompt, hits_total, gens_total = [], 0, 0
    for j, paths in sources.items():
        entry = prompts_out[j]
        nn_idx = [row[0] for row in entry["neighbors"]["pixel_correlation"]["train_indices"]]
        hits = int(nearest_is_planted(nn_idx, train.image_paths, paths).sum())
        per_prompt.append({"prompt_index": entry["prompt_index"], "hits": hits, "generations": len(nn_idx)})
        hits_total, gens_total = hits_total + hits, gens_total + len(nn_idx)
    return {"per_prompt": per_prompt, "nearest_is_planted_fraction": hits_total / gens_total if gens_total else None,
            "n_planted_prompts": len(per_prompt)}


def validate_checkpoint(checkpoint: str, scores: str, *, copy_detector: str | None = None,
                        opts: ValidationOptions = ValidationOptions(), use_clip: bool = True, device: str = "cpu",
                        scan_images: str | None = None, force: bool = False, progress: bool = True,
                        deepssim: str | None = None) -> ValidationResult:
    """Validate a finished scan of a training run (what tools/validate_memorization does).

    The scan must come from this run's model (its weight fingerprint is checked before any work), and the
    model must have a trained null condition (the scan's guided generations are made again), unless
    `force`, which the numbers then record. The copy detector is `copy_detector`, else <run>/copy_detector
    when present (DeepSSIM likewise: `deepssim`, else <run>/deepssim); the planted manifest and the
    distinct training images are the run's own. A fast scan (--mode fast) is validated on its confirmed
    prompts, the only ones with full-trajectory scores. The exposed training images of the flagged
    prompts are added (engine.audit.exposure).
    """
    table = read_scores(scores)
    loaded = load_model(checkpoint, device=device)
    if scan_metadata(table)["scan"].get("model") != model_fingerprint(loaded):
        raise ValueError(f"{scores}: was scanned with another model than {checkpoint}")
    record = require_null_condition(loaded, "validation (it makes the scan's guided generations again)", force)
    if "confirmed" in table.column_names:
        table = table.filter(pa.array(table.column("confirmed").to_pylist(), pa.bool_()))
    detector_dir = copy_detector or os.path.join(checkpoint, "copy_detector")
    detector = load_copy_detector(detector_dir, device=device) if copy_detector or os.path.isdir(detector_dir) else None
    deepssim_dir = deepssim or os.path.join(checkpoint, "deepssim")
    ds = load_deepssim(deepssim_dir, device=device) if deepssim or os.path.isdir(deepssim_dir) else None
    train = split_images(checkpoint, "train", progress=progress)
    try:
        heldout = split_images(checkpoint, "val", progress=progress).images
    except ValueError as e:      # no held-out images: no copy threshold, so no score-vs-copies or exposure numbers
        heldout, no_heldout = None, e
    result = validate(loaded, table, train, manifest=read_manifest(checkpoint), copy_detector=detector, opts=opts,
                      use_clip=use_clip, heldout=heldout, scan_images=scan_images, progress=progress, deepssim=ds)
    result.numbers["null_condition"] = record
    if heldout is None:
        result.numbers["exposure_skipped"] = f"no held-out images to calibrate the copy threshold on ({no_heldout})"
        return result
    chosen = exposure_prompts(table, opts, (result.numbers.get("score_vs_copies") or {}).get("flagged"))
    result.numbers["exposure"] = exposure_of_scan(loaded, table, train, heldout, patient_ids(read_splits(checkpoint)),
                                                  opts, chosen, progress)
    return result


def exposure_prompts(table: pa.Table, opts: ValidationOptions, calibrated: dict | None = None) -> tuple[list[int], str]:
    """The prompts whose generations the exposure table counts, and how they were chosen: the scan's
    flagged prompts; for a scan without a threshold, the prompts that the calibration half's threshold
    flags in the evaluation half (`calibrated`: engine.audit.score_vs_copies.flagged_precision, the set
    whose precision the report states); else the top-scoring prompts, said so."""
    flagged = [i for i, f in enumerate(table.column("flagged").to_pylist()) if f]
    if flagged:
        return flagged, f"the {len(flagged)} prompts flagged by the scan's threshold"
    if (calibrated or {}).get("flagged_rows"):
        rows = calibrated["flagged_rows"]
        return rows, (f"the {len(rows)} evaluation-half prompts above the calibration half's threshold "
                      f"{calibrated['threshold']:.4g} (the scan has no threshold of its own)")
    top = select_prompts(table, opts)["top"]
    return top, f"the {len(top)} top-scoring prompts (the scan has no threshold, so none is flagged)"


def exposure_of_scan(loaded, table: pa.Table, train: TrainingImages, heldout_u8: np.ndarray,
                     patients: dict[str, str], opts: ValidationOptions, prompts_chosen: tuple[list[int], str],
                     progress: bool = True) -> dict:
    """The training images reproduced by the generations of the `chosen` prompts (exposure_prompts), with
    the pixel-space copy threshold calibrated on held-out images."""
    chosen, which = prompts_chosen
    threshold = pixel_copy_threshold(train.images, heldout_u8)
    images, _ = regenerate(loaded, table, chosen, opts, progress)
    prompts = [table.column("prompt")[i].as_py() for i in chosen]
    rows = exposed_training_images(prompts, images, TrainingNeighbours(train.images, train.image_paths), threshold,
                                   patients)
    meta = {"threshold": threshold, "n_flagged_prompts": len(chosen), "prompts_used": which,
            "generations": int(images.shape[1]), "n_patients": len({r["patient_id"] for r in rows}),
            "threshold_from": f"Dar's rule on pixels: 95th percentile over training images of their best "
                              f"correlation to the {len(heldout_u8)} held-out (val) images"}
    return {"meta": meta, "rows": rows}
