"""Which similarity metric finds the copied training image? Measured against planted duplicates.

Every metric (pixel correlation, SSIM, CLIP, Dar's copy-detection embedding, DeepSSIM) searches ALL
distinct training images for each query, and is scored on two kinds of query:

1. Generations of planted prompts (the prompt was trained on C copies of one image, its source) and
   of their matched control prompts (same token frequency, C distinct images). Retrieval: recall@1
   and recall@5 of the planted source (or any of its near copies) among all training images, per
   kind of planted duplicate (exact / near, manifest v2; v1 manifests are all exact). Copy
   decision: the metric's rule says "copy of its nearest training image" when the nearest's
   similarity passes the metric's threshold. Truth is the prompt: a claim on a planted prompt's
   generation is right when the nearest image is its source; any claim on a control generation is
   wrong. The model does not copy every time, so recall has a ceiling below 1 that is the same for
   every metric: compare metrics on the same generations (paired differences), not with 1.
2. Known copies (a truth that needs no model): training images put through near-duplicate
   changes (engine.audit.pair_classes.near_duplicate) or a heavy re-framing (heavy_change) must
   retrieve themselves; held-out images (never trained on) put through the same near-duplicate
   changes are the negatives of the copy decision.

Thresholds: every metric gets Dar's calibration — the 95th percentile over training images of their
highest similarity to any validation image (no generation involved) — and, where the metric has
one, its own rule: Dar's stored threshold, DeepSSIM's Duplicate class (> 0.85), SSIM on DeepSSIM's
scale (> 0.85). CLIP's similarities with random weights (no weights are downloaded here) only
exercise the pipeline; the result says so.

Intervals: recall and copy-decision statistics resample prompts (a prompt's generations are not
independent); known-copy rates are Wilson intervals (one query per image).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from data_pipeline.images import to_model_range, to_uint8
from data_pipeline.prompts import parse_prompt
from engine.audit.intervals import (
    cluster_bootstrap_mean,
    cluster_bootstrap_statistic,
    paired_difference,
    proportion_interval,
)
from engine.audit.nearest_neighbors import topk_neighbors
from engine.audit.pair_classes import PairSpec, heavy_change, near_duplicate
from engine.audit.run_data import TrainingImages, read_splits
from engine.audit.similarity import PairSimilarity, cosine_normalize, dot_similarity, pearson_normalize, ssim_pairwise
from engine.diffusion.generate import generate

LEARNED = {"clip", "copy_detector", "deepssim"}    # metrics that need a trained network


@dataclass
class Metric:
    """A similarity as the benchmark uses it: features of uint8 images and a similarity of features."""
    name: str
    features: Callable[[np.ndarray], torch.Tensor]
    similarity: PairSimilarity = dot_similarity
    chunks: tuple[int, int] = (256, 4096)
    native_rule: tuple[str, float] | None = None     # (description, threshold) of the metric's own copy rule
    note: str = ""


def pixel_metric() -> Metric:
    return Metric("pixel_correlation", lambda u8: pearson_normalize(to_model_range(u8, False)),
                  note="Pearson correlation of raw pixels (no learned model)")


def ssim_metric() -> Metric:
    return Metric("ssim", lambda u8: to_model_range(u8, False), ssim_pairwise, (32, 256),
                  native_rule=("SSIM > 0.85 (DeepSSIM's Duplicate class)", 0.85),
                  note="SSIM, skimage's definition (7x7 window)")


def clip_metric(clip) -> Metric:
    random = clip.spec.is_random
    return Metric("clip", lambda u8: cosine_normalize(torch.from_numpy(clip.embed(u8))),
                  note=f"CLIP {clip.spec.model_name} cosine" + (" — RANDOM weights (none can be downloaded "
                                                                 "here): exercises the pipeline only" if random else
                                                                 f", weights {clip.spec.pretrained}"))


def copy_detector_metric(detector) -> Metric:
    rule = ("Dar: correlation > the detector's stored 95th-percentile threshold", float(detector.threshold)) \
        if detector.threshold is not None else None
    start = (detector.info.get("backbone_start") or {}).get("path") or "random weights"
    return Metric("copy_detector", lambda u8: pearson_normalize(torch.from_numpy(detector.embed(u8))),
                  native_rule=rule, note=f"Dar et al.'s embedding ({detector.cfg.backbone}, from {start}), "
                                         f"Pearson correlation")


def deepssim_metric(model) -> Metric:
    return Metric("deepssim", lambda u8: torch.from_numpy(model.embed(u8)),
                  native_rule=("DeepSSIM > 0.85 (Duplicate class)", float(model.threshold)),
                  note=f"DeepSSIM ({model.cfg.backbone}) cosine, trained to match SSIM")


@dataclass
class BenchmarkOptions:
    generations: int = 8
    steps: int = 50
    guidance: float = 7.5
    sampler: str = "ddim"
    seed: int = 0
    controls_per_token: int = 2
    known_copies: int = 200
    percentile: float = 95.0
    n_boot: int = 1000
    batch_size: int = 64
    pair_spec: PairSpec = field(default_factory=PairSpec)


@dataclass
class PlantedQueries:
    prompts: list[str]
    group: list[str]                  # "planted" / "control"
    kind: list[str | None]            # "exact" / "near" for planted prompts
    targets: list[set[int]]           # training-image indices that count as the source (planted only)


def planted_queries(run_dir: str, train: TrainingImages, manifest: dict, controls_per_token: int) -> PlantedQueries:
    """Planted prompts and up to `controls_per_token` prompts per control token, from the run's
    training split. A v2 manifest's near copies count as the source too (they are the same patient
    image, changed); v1 manifests have exact copies only."""
    index_of = {p: i for i, p in enumerate(train.image_paths)}
    planted = {e["token"]: e for e in manifest.get("planted", [])}
    controls = {c["token"] for c in manifest.get("controls", [])}
    out = PlantedQueries([], [], [], [])
    seen, per_control = set(), {}
    for record in read_splits(run_dir)["splits"]["train"]:
        prompt = record["prompt"]
        if prompt in seen:
            continue
        extra = parse_prompt(prompt).extra
        hit = next((planted[t] for t in extra if t in planted), None)
        if hit is not None:
            paths = {hit["image_path"], *hit.get("copy_paths", [])}
            out.prompts.append(prompt), out.group.append("planted"), out.kind.append(hit.get("kind", "exact"))
            out.targets.append({index_of[p] for p in paths if p in index_of})
            seen.add(prompt)
            continue
        token = next((t for t in extra if t in controls), None)
        if token is not None and per_control.get(token, 0) < controls_per_token:
            per_control[token] = per_control.get(token, 0) + 1
            out.prompts.append(prompt), out.group.append("control"), out.kind.append(None), out.targets.append(set())
            seen.add(prompt)
    if "planted" not in out.group:
        raise ValueError(f"{run_dir}: no planted prompt of the manifest is in the training split")
    return out


def _topk(metric: Metric, queries: np.ndarray, keys: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    v, i = topk_neighbors(metric.features(queries), keys, k, similarity=metric.similarity,
                          query_chunk=metric.chunks[0], key_chunk=metric.chunks[1])
    return v.numpy(), i.numpy()


def calibrated_threshold(metric: Metric, train_keys: torch.Tensor, heldout: np.ndarray, percentile: float) -> float:
    """Dar's rule for any metric: the percentile over training images of their highest similarity
    to any held-out (validation) image."""
    v, _ = topk_neighbors(train_keys, metric.features(heldout), 1, similarity=metric.similarity,
                          query_chunk=metric.chunks[0], key_chunk=metric.chunks[1])
    return float(np.percentile(v[:, 0].numpy(), percentile))


def decision_statistics(decided: np.ndarray, correct: np.ndarray, positive: np.ndarray, clusters: np.ndarray,
                        n_boot: int, seed: int) -> dict:
    """Precision, recall and F1 of copy claims: a claim is right when `correct` (its nearest image is
    the query's own source), `positive` marks queries that have a source."""
    def parts(i):
        tp = float(np.sum(decided[i] & correct[i] & positive[i]))
        claims, pos = float(np.sum(decided[i])), float(np.sum(positive[i]))
        p = tp / claims if claims else float("nan")
        r = tp / pos if pos else float("nan")
        return p, r, (2 * p * r / (p + r) if claims and pos and p + r > 0 else 0.0)
    out = {name: cluster_bootstrap_statistic(clusters, lambda i, j=j: parts(i)[j], n_boot, seed)
           for j, name in enumerate(("precision", "recall", "f1"))}
    out["n_claims"], out["n_positive"], out["n_negative"] = int(decided.sum()), int(positive.sum()), int((~positive).sum())
    return out


def _rules(metric: Metric, calibrated: float, percentile: float) -> dict[str, tuple[str, float]]:
    rules = {"calibrated": (f"nearest similarity > {percentile:g}th percentile of training-vs-validation maxima",
                            calibrated)}
    if metric.native_rule is not None:
        rules["native"] = metric.native_rule
    return rules


def _generate_queries(loaded, queries: PlantedQueries, opts: BenchmarkOptions, device) -> np.ndarray:
    tokens = loaded.vocab.encode_batch(queries.prompts)
    seeds = [opts.seed + n for n in range(opts.generations)]
    images = generate(loaded.model, loaded.schedule, tokens, seeds, guidance=opts.guidance, steps=opts.steps,
                      sampler=opts.sampler, parameterization=loaded.diffusion_config.parameterization,
                      batch_size=opts.batch_size, device=device)
    return to_uint8(images)                                                 # [P, G, S, S]


def _known_copy_queries(train: TrainingImages, heldout: np.ndarray, opts: BenchmarkOptions):
    rng = np.random.default_rng(opts.seed)
    chosen = np.sort(rng.choice(len(train.images), min(opts.known_copies, len(train.images)), replace=False))
    gen = torch.Generator().manual_seed(opts.seed)
    x01 = (to_model_range(train.images[chosen]) + 1) / 2
    near = to_uint8(near_duplicate(x01, opts.pair_spec, gen) * 2 - 1)
    heavy = to_uint8(heavy_change(x01, opts.pair_spec, gen) * 2 - 1)
    negatives = to_uint8(near_duplicate((to_model_range(heldout) + 1) / 2, opts.pair_spec, gen) * 2 - 1)
    return chosen, near, heavy, negatives


def _recall(hits: np.ndarray) -> dict:
    k = int(hits.sum())
    return {"rate": k / len(hits) if len(hits) else float("nan"), "ci95": list(proportion_interval(k, len(hits))),
            "n": int(len(hits)), "interval": "Wilson"}


def run_benchmark(loaded, run_dir: str, train: TrainingImages, validation: np.ndarray, heldout: np.ndarray,
                  manifest: dict, metrics: list[Metric], opts: BenchmarkOptions = BenchmarkOptions(),
                  device: str = "cpu", log: Callable[[str], None] = lambda s: None) -> dict:
    """The benchmark's numbers (JSON-able) plus `_images` for the page (popped before writing JSON)."""
    queries = planted_queries(run_dir, train, manifest, opts.controls_per_token)
    n_p, n_g = len(queries.prompts), opts.generations
    log(f"generating {n_p} prompts x {n_g} ({queries.group.count('planted')} planted, "
        f"{queries.group.count('control')} control), {opts.sampler} {opts.steps} steps, w = {opts.guidance:g}")
    generated = _generate_queries(loaded, queries, opts, device)
    flat = generated.reshape(n_p * n_g, *generated.shape[2:])
    planted_rows = np.array([g == "planted" for g in queries.group])
    clusters = np.repeat(np.arange(n_p), n_g)
    positive = np.repeat(planted_rows, n_g)
    chosen, near, heavy, negatives = _known_copy_queries(train, heldout, opts)
    # a planted source and its near copies (manifest v2) are one image: retrieving any of them is right
    group_of = {j: t for t in queries.targets for j in t}
    same_image = [group_of.get(int(j), {int(j)}) for j in chosen]
    numbers = {"run": run_dir, "options": {**asdict(opts), "pair_spec": asdict(opts.pair_spec)},
               "n_train_images": int(len(train.images)), "n_validation_images": int(len(validation)),
               "n_heldout_images": int(len(heldout)), "manifest_version": manifest.get("version", 1),
               "n_planted_prompts": int(planted_rows.sum()), "n_control_prompts": int((~planted_rows).sum()),
               "metrics": {}, "retrieval": {}, "copy_decisions": {}, "known_copies": {}}
    hits1_by_metric, top1 = {}, {}
    for metric in metrics:
        log(f"metric {metric.name}: training-image features, calibration, nearest neighbours")
        keys = metric.features(train.images)
        calibrated = calibrated_threshold(metric, keys, validation, opts.percentile)
        rules = _rules(metric, calibrated, opts.percentile)
        numbers["metrics"][metric.name] = {"note": metric.note, "learned": metric.name in LEARNED,
                                           "rules": {r: {"rule": d, "threshold": t} for r, (d, t) in rules.items()}}
        values, index = _topk(metric, flat, keys, 5)
        in_target = np.array([[j in queries.targets[q // n_g] for j in row] for q, row in enumerate(index)])
        hit1, hit5 = in_target[:, 0], in_target.any(1)
        top1[metric.name] = index[:, 0].reshape(n_p, n_g)
        retrieval = {}
        for kind in ("all", "exact", "near"):
            rows = planted_rows & (np.array([k == kind for k in queries.kind]) if kind != "all" else True)
            if rows.any():
                retrieval[kind] = {f"recall_at_{k}": cluster_bootstrap_mean(h.reshape(n_p, n_g)[rows], opts.n_boot,
                                                                            opts.seed)
                                   for k, h in ((1, hit1), (5, hit5))}
        numbers["retrieval"][metric.name] = retrieval
        hits1_by_metric[metric.name] = hit1.reshape(n_p, n_g)[planted_rows]
        numbers["copy_decisions"][metric.name] = {
            r: {"threshold": t, **decision_statistics(values[:, 0] > t, hit1, positive, clusters, opts.n_boot, opts.seed)}
            for r, (_, t) in rules.items()}
        numbers["known_copies"][metric.name] = _known_copy_numbers(metric, keys, chosen, same_image, near, heavy,
                                                                   negatives, rules, opts)
    numbers["paired_recall_at_1"], numbers["default_metric"] = choose_default_metric(hits1_by_metric, numbers, opts)
    numbers["_images"] = {"generated": generated, "planted_rows": planted_rows, "top1": top1,
                          "targets": [sorted(t) for t in queries.targets], "prompts": queries.prompts}
    return numbers


def _known_copy_numbers(metric: Metric, keys, chosen, same_image, near, heavy, negatives, rules, opts) -> dict:
    out = {}
    for name, q in (("near", near), ("heavy", heavy)):
        _, idx = _topk(metric, q, keys, 5)
        hits = np.array([[j in same for j in row] for row, same in zip(idx, same_image)])
        out[name] = {"recall_at_1": _recall(hits[:, 0]), "recall_at_5": _recall(hits.any(1))}
    v_pos, i_pos = _topk(metric, near, keys, 1)
    v_neg, _ = _topk(metric, negatives, keys, 1)
    values = np.concatenate([v_pos[:, 0], v_neg[:, 0]])
    correct = np.concatenate([[j in same for j, same in zip(i_pos[:, 0], same_image)], np.zeros(len(negatives), bool)])
    positive = np.concatenate([np.ones(len(near), bool), np.zeros(len(negatives), bool)])
    clusters = np.arange(len(values))
    out["copy_decisions"] = {r: {"threshold": t, **decision_statistics(values > t, correct, positive, clusters,
                                                                       opts.n_boot, opts.seed)}
                             for r, (_, t) in rules.items()}
    return out


def choose_default_metric(hits1: dict[str, np.ndarray], numbers: dict, opts: BenchmarkOptions) -> tuple[dict, dict]:
    """The neighbour metric a report should use, and why.

    Highest recall@1 of the planted source on planted generations. Metrics whose paired difference
    to it has a 95% interval that includes 0 are tied with it; among tied metrics the choice goes to
    the higher recall@1 on known near copies, then to a metric that needs no learned model.
    """
    rate = {m: float(h.mean()) for m, h in hits1.items()}
    best = max(rate, key=lambda m: rate[m])
    paired = {m: paired_difference(hits1[best], h, n_boot=opts.n_boot, seed=opts.seed) for m, h in hits1.items()}
    tied = [m for m in hits1 if m == best or (paired[m]["ci95"][0] <= 0 <= paired[m]["ci95"][1])]
    known = {m: numbers["known_copies"][m]["near"]["recall_at_1"]["rate"] for m in tied}
    chosen = max(tied, key=lambda m: (known[m], m not in LEARNED))
    reason = (f"recall@1 of the planted source on planted generations: {best} {rate[best]:.1%} is highest"
              + (f"; not distinguishable (paired 95% interval includes 0) from {', '.join(m for m in tied if m != best)}"
                 if len(tied) > 1 else "; every other metric is below it with a paired 95% interval that excludes 0")
              + (f"; among those, {chosen} has the highest recall@1 on known near copies ({known[chosen]:.1%})"
                 if chosen != best or len(tied) > 1 else ""))
    return ({"reference": best, "differences": paired, "n_planted_prompts": int(len(hits1[best]))},
            {"name": chosen, "reason": reason, "tied_with_best": tied})


def benchmark_checkpoint(checkpoint: str, out_dir: str, *, copy_detector: str | None = None,
                         deepssim: str | None = None, clip_spec=None, opts: BenchmarkOptions = BenchmarkOptions(),
                         device: str = "cpu", progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Load a run's model, training/validation/test images, manifest and the given metric networks;
    run the benchmark; write <out>/similarity_benchmark.json and <out>/index.html. Returns the numbers.

    Every input is checked before any generation starts."""
    import os

    from data_pipeline.atomic_files import write_json
    from engine.audit.clip_embedding import ClipEmbedder
    from engine.audit.copy_detection import load_copy_detector
    from engine.audit.deepssim import load_deepssim
    from engine.audit.run_data import read_manifest, split_images
    from engine.model.export import load_model
    from engine.reports.similarity_benchmark_page import write_page

    manifest = read_manifest(checkpoint)
    if manifest is None:
        raise ValueError(f"{checkpoint}: no planted_manifest.json (the benchmark needs planted duplicates: "
                         f"train with data.planted)")
    metrics = [pixel_metric(), ssim_metric()]
    if clip_spec is not None:
        metrics.append(clip_metric(ClipEmbedder(clip_spec, device)))
    if copy_detector:
        metrics.append(copy_detector_metric(load_copy_detector(copy_detector, device)))
    if deepssim:
        metrics.append(deepssim_metric(load_deepssim(deepssim, device)))
    loaded = load_model(checkpoint, device)
    train = split_images(checkpoint, "train", progress=progress)
    validation = split_images(checkpoint, "val", progress=progress).images
    heldout = split_images(checkpoint, "test", progress=progress).images
    size = loaded.unet_config.image_size
    if train.images.shape[1:] != (size, size):
        raise ValueError(f"{checkpoint}: training images are {train.images.shape[1:]}, the model makes {size}x{size}")
    numbers = run_benchmark(loaded, checkpoint, train, validation, heldout, manifest, metrics, opts, device, log)
    images = numbers.pop("_images")
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "similarity_benchmark.json"), numbers)
    write_page(os.path.join(out_dir, "index.html"), numbers, images, train.images)
    return numbers
