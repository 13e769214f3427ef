"""Why do some deterministic DDIM generations end as pixel noise? Sampler variants on a trained model.

    python bench/ddim_investigation.py --checkpoint RUN [--prompts 48 --generations 4 --out ddim.json]

On the same prompts and seeds as the scanner (prompt i of a seeded sample of the run's distinct
training prompts, planted prompts always in, seed = i, G generations from one draw), every variant
is run and its generations judged by engine.audit.noise_generations: "noise" (neighbour-pixel
coherence below the least coherent training image's at SNR 1) and "noisy" (at SNR 4). Variants, one change at a time from the scan's sampler
(memdiff DDIM: timesteps linspace 999 -> 0, x0 clipped to [-1, 1] with the network's eps kept for the
direction term, last step to alpha = 1, w = 7.5):
- timestep spacing: "trailing" (999, 999 - T/N, ..., T/N - 1) and "leading" (diffusers' default:
  0, T/N, ..., T - T/N, never starting from t = 999);
- clipping: eps re-derived from the clipped x0 (guided-diffusion's DDIM, and memdiff's before this
  investigation), no clipping;
- guidance w = 1, 3; steps 50, 100;
- DDPM ancestral (eta = 1) from the same initial noise.
Per variant: noise share with a Wilson interval, median coherence, and the pixel-correlation of each
generation to its nearest training image. For the scan's sampler also per step: the share of x0
pixels clipped and the coherence of x0, for trajectories that end as noise vs those that do not.
diffusers is not needed (the cross-check with it is tests/test_ddim_diffusers.py).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from data_pipeline.atomic_files import atomic_path, write_json
from data_pipeline.images import to_model_range, to_uint8
from engine.audit.noise_generations import NOISY_SNR, coherence, noise_share, noise_threshold
from engine.audit.planted_truth import prompt_groups
from engine.audit.run_data import read_manifest, split_images, split_prompts
from engine.audit.similarity import pearson_normalize
from engine.diffusion.guidance import null_tokens_like, predict_cond_uncond
from engine.diffusion.sampling import sample, step_coefficients
from engine.diffusion.seeds import seeded_noise
from engine.model.export import load_model
from kernels.guided_step import guided_step


def spacing(kind: str, T: int, n: int) -> list[int]:
    if kind == "linspace":
        return np.linspace(T - 1, 0, n).round().astype(int).tolist()
    if kind == "trailing":
        return (np.round(np.arange(T, 0, -T / n)).astype(int) - 1).tolist()
    if kind == "leading":
        return (np.arange(0, n) * (T // n))[::-1].tolist()
    raise ValueError(kind)


@torch.no_grad()
def ddim(loaded, tokens, noise, timesteps: list[int], guidance: float, clip: str, trace: bool = False):
    """memdiff's DDIM step over any timestep list; clip: 'keep_eps' (memdiff), 'rederive', 'none'."""
    model, schedule = loaded.model, loaded.schedule
    cond, null = model.encode(tokens), model.encode(null_tokens_like(tokens))
    x, per_step = noise.clone(), []
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        c = step_coefficients(schedule, t, t_prev, 0.0)
        pred = predict_cond_uncond(model, x, t, cond, null, schedule, loaded.diffusion_config.parameterization)
        if clip == "rederive":   # guided-diffusion: eps re-derived from the clipped x0
            e_c, e_u = pred.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
            x0 = ((x - c["sqrt_1mab_t"] * eps) / c["sqrt_ab_t"]).clamp(-1, 1)
            eps = (x - c["sqrt_ab_t"] * x0) / c["sqrt_1mab_t"]
            x_next = c["sqrt_ab_prev"] * x0 + c["sqrt_1mab_prev_dir"] * eps
        else:
            x_next, _, _ = guided_step(pred, x, None, guidance=guidance, clip_x0=clip == "keep_eps", **c)
        if trace:
            e_c, e_u = pred.chunk(2)
            x0_raw = (x - c["sqrt_1mab_t"] * (e_u + guidance * (e_c - e_u))) / c["sqrt_ab_t"]
            per_step.append({"t": t, "clipped_share": (x0_raw.abs() > 1).float().flatten(1).mean(1),
                             "x0_coherence": torch.from_numpy(coherence(x0_raw[:, 0].numpy())),
                             "x_std": x.flatten(1).std(1)})
        x = x_next
    return x.clamp(-1, 1), per_step


def nearest_correlation(images_u8: np.ndarray, train_keys: torch.Tensor) -> np.ndarray:
    q = pearson_normalize(to_model_range(images_u8, False))
    return (q @ train_keys.T).max(1).values.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="the scan's steps (the demo scans with 20)")
    ap.add_argument("--out", default="ddim_investigation.json")
    ap.add_argument("--variants", default="all", help="semicolon-separated subset of the variant names")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    loaded = load_model(args.checkpoint)
    train = split_images(args.checkpoint, "train", progress=False)
    threshold, threshold_noisy = noise_threshold(train.images), noise_threshold(train.images, NOISY_SNR)
    train_keys = pearson_normalize(to_model_range(train.images, False))
    prompts = sorted(set(split_prompts(args.checkpoint, "train")))
    groups = prompt_groups(prompts, read_manifest(args.checkpoint)) or ["ordinary"] * len(prompts)
    rng = np.random.default_rng(0)
    planted = [i for i, g in enumerate(groups) if g == "planted"]
    others = [i for i in rng.permutation(len(prompts)).tolist() if groups[i] != "planted"]
    chosen = sorted(planted + others[:max(0, args.prompts - len(planted))])
    tokens = loaded.vocab.encode_batch([prompts[i] for i in chosen]).repeat_interleave(args.generations, 0)
    cfg = loaded.unet_config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    noise = seeded_noise(list(range(len(chosen))), (args.generations, *shape)).flatten(0, 1)
    is_planted = np.repeat([groups[i] == "planted" for i in chosen], args.generations)
    T, n = loaded.schedule.num_timesteps, args.steps

    variants = {
        "scan: ddim linspace, x0 clipped (eps kept), w=7.5": ("ddim", spacing("linspace", T, n), 7.5, "keep_eps"),
        "spacing trailing": ("ddim", spacing("trailing", T, n), 7.5, "keep_eps"),
        "spacing leading (diffusers default)": ("ddim", spacing("leading", T, n), 7.5, "keep_eps"),
        "eps re-derived from clipped x0 (guided-diffusion; memdiff before)": ("ddim", spacing("linspace", T, n), 7.5,
                                                                             "rederive"),
        "no x0 clipping": ("ddim", spacing("linspace", T, n), 7.5, "none"),
        "w = 3": ("ddim", spacing("linspace", T, n), 3.0, "keep_eps"),
        "w = 1": ("ddim", spacing("linspace", T, n), 1.0, "keep_eps"),
        f"steps {2 * n}": ("ddim", spacing("linspace", T, 2 * n), 7.5, "keep_eps"),
        f"steps {5 * n}": ("ddim", spacing("linspace", T, 5 * n), 7.5, "keep_eps"),
        "ddpm (eta = 1), w=7.5": ("ddpm", None, 7.5, None),
        "ddpm (eta = 1), w=3": ("ddpm", None, 3.0, None),
    }
    if args.variants != "all":
        keep = set(args.variants.split(";"))
        variants = {k: v for k, v in variants.items() if k in keep}
    results, images = {}, {}
    for name, (kind, ts, w, clip) in variants.items():
        start = time.time()
        trace = None
        if kind == "ddpm":
            gen = torch.Generator().manual_seed(0)
            out = sample(loaded.model, tokens, noise, loaded.schedule, steps=n, guidance=w, sampler="ddpm",
                         generator=gen, record_norms=False).images
        else:
            out, trace = ddim(loaded, tokens, noise, ts, w, clip, trace=True)
            if name.startswith("scan"):   # the variant loop is memdiff's sampler: check it against sample()
                ref = sample(loaded.model, tokens, noise, loaded.schedule, steps=n, guidance=w, record_norms=False)
                assert torch.allclose(ref.images, out, atol=1e-5), "variant loop differs from engine sample()"
        u8 = to_uint8(out)
        images[name] = u8
        share = noise_share(u8, threshold)
        nn = nearest_correlation(u8, train_keys)
        noisy = coherence(u8) < threshold
        noisy_share = noise_share(u8, threshold_noisy)
        results[name] = {"noise": share, "noisy": noisy_share, "noise_share_planted": float(noisy[is_planted].mean()),
                         "noise_share_other": float(noisy[~is_planted].mean()),
                         "nearest_train_correlation_median": float(np.median(nn)),
                         "nearest_train_correlation_median_not_noise": float(np.median(nn[~noisy])) if (~noisy).any()
                         else None, "seconds": time.time() - start}
        if trace and (name.startswith("scan") or clip == "rederive"):
            results[name]["per_step"] = [
                {"t": s["t"], "clipped_share_noise": float(s["clipped_share"][noisy].mean()) if noisy.any() else None,
                 "clipped_share_ok": float(s["clipped_share"][~noisy].mean()) if (~noisy).any() else None,
                 "x0_coherence_noise": float(s["x0_coherence"][noisy].median()) if noisy.any() else None,
                 "x0_coherence_ok": float(s["x0_coherence"][~noisy].median()) if (~noisy).any() else None,
                 "x_std_noise": float(s["x_std"][noisy].mean()) if noisy.any() else None,
                 "x_std_ok": float(s["x_std"][~noisy].mean()) if (~noisy).any() else None} for s in trace]
        print(f"{name:45s} noise {share['noise']:4d}/{share['n']} = {share['share']:.1%} "
              f"[{share['ci95'][0]:.1%}, {share['ci95'][1]:.1%}]  noisy {noisy_share['share']:.1%} "
              f"[{noisy_share['ci95'][0]:.1%}, {noisy_share['ci95'][1]:.1%}]  median coherence {share['coherence_median']:.3f}  "
              f"nearest-train corr {results[name]['nearest_train_correlation_median']:.3f}  "
              f"({results[name]['seconds']:.0f} s)", flush=True)
    scan = next(iter(images))
    if "ddpm (eta = 1), w=7.5" in images:   # same seed, DDIM vs DDPM: how alike are the two endings?
        a = pearson_normalize(to_model_range(images[scan], False))
        b = pearson_normalize(to_model_range(images["ddpm (eta = 1), w=7.5"], False))
        pair = (a * b).sum(1).numpy()
        noisy = coherence(images[scan]) < threshold
        results["ddim_vs_ddpm_same_seed_correlation"] = {
            "median_when_ddim_noise": float(np.median(pair[noisy])) if noisy.any() else None,
            "median_otherwise": float(np.median(pair[~noisy])) if (~noisy).any() else None}
    meta = {"checkpoint": args.checkpoint, "prompts": len(chosen), "planted_prompts": len(planted),
            "generations": args.generations, "steps": n, "noise_threshold": threshold, "noisy_threshold": threshold_noisy,
            "train_coherence_min": float(coherence(train.images).min()),
            "train_coherence_median": float(np.median(coherence(train.images))), "sqrt_T": math.sqrt(T)}
    write_json(args.out, {"meta": meta, "variants": results})
    with atomic_path(args.out.removesuffix(".json") + "_images.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k.replace(" ", "_"): v for k, v in images.items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
