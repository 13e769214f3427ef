"""memdiff side by side with what users would pick instead, each pair interleaved in one process.

    python bench/peers.py --quick          # under 5 minutes on 2 idle cores
    python bench/peers.py                  # more rounds, more prompts
    python bench/peers.py --checkpoint demo_output/runs/cfg   # scan AUCs on a trained demo run
    make bench-peers                       # installs the bench extra (diffusers) first

Prints four lines first (ratio = memdiff throughput / peer throughput: above 1 memdiff is faster),
then the details:

    train_step vs diffusers: memdiff/diffusers = R.RRx
        memdiff's training step (bench/train_step.py, mirroring the trainer) against diffusers'
        text-to-image example step on a UNet2DConditionModel of the same widths, depth, attention
        resolutions and prompt-encoder size; same batch, resolution, AdamW, CFG drop.
    dp_step vs opacus: memdiff/opacus = R.RRx
        one DP-SGD step (per-sample clip, noise, AdamW) of memdiff's DPSGD (default norm method)
        against Opacus' GradSampleModule + DPOptimizer (hooks); also Opacus ghost clipping,
        Opacus functorch, memdiff's torch.func path and the non-private step.
    scan vs wen_loop: memdiff/wen_loop = R.RRx
        prompts/s of memdiff's fastest scan mode (first-step score, `--steps 1`, prompts batched)
        against Wen et al.'s per-prompt 50-step DDIM loop, with both AUCs (planted vs control
        prompts) and their bootstrap intervals from the same run.
    loader vs training: memdiff/consumption = R.RRx
        images/s memdiff's loader delivers against images/s the training step consumes.

Every comparison runs both sides in the same process with the same torch thread count, in rounds
whose order rotates; figures are medians over rounds. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.measure import auc, bootstrap_aucs, interleaved, interval, machine, median, spread  # noqa: E402
from bench.planted_model import (  # noqa: E402
    PlantedModel,
    demo_unet_config,
    planted_data,
    planted_model_from_run,
    train_planted_model,
)
from bench.train_step import MemdiffTrainStep  # noqa: E402
from data_pipeline.vocab import Vocabulary  # noqa: E402
from engine.diffusion.schedule import NoiseSchedule  # noqa: E402
from engine.model.unet import ConditionalUNet, count_parameters  # noqa: E402

PROMPTS = ["frontal AP chest x-ray, female, 60s: pleural effusion, support devices",
           "frontal PA chest x-ray, male, 30s", "frontal AP chest x-ray, male, 70s: cardiomegaly, edema",
           "frontal PA chest x-ray, female, 40s: no finding"]


def say(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fixed_batch(batch: int, image_size: int, vocab: Vocabulary, seed: int = 0, device: str | torch.device = "cpu"):
    """(x0 in [-1, 1] [B,1,S,S], prompt tokens [B,L], null tokens [B,L]) on `device`."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, 1, image_size, image_size, generator=g) * 2 - 1
    tokens = vocab.encode_batch([PROMPTS[i % len(PROMPTS)] for i in range(batch)])
    return x0.to(device), tokens.to(device), vocab.null_tokens(batch).to(device)


def flops_per_image(make_model, cfg) -> float:
    """Model FLOPs of one forward + backward per image (torch.utils.flop_counter, on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415
    with torch.device("meta"):
        net = make_model(cfg)
        x = torch.empty(2, cfg.in_channels, cfg.image_size, cfg.image_size)
        t = torch.zeros(2, dtype=torch.long)
        tokens = torch.ones(2, cfg.max_tokens, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        net(x, t, tokens).sum().backward()
    return counter.get_total_flops() / 2


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ----------------------------------------------------------------------------- training step

def train_step_cases(cfg, batch: int, device: str = "cpu", compute_dtype: torch.dtype = torch.float32,
                     lr: float = 1e-3, channels_last: bool = False) -> tuple[dict, list[str]]:
    """memdiff's and diffusers' training steps on models of one config: ({name: step}, description);
    with `channels_last` also memdiff with training.channels_last on (an opt-in, not the headline)."""
    from bench.peer_diffusers import DiffusersPair, DiffusersTrainStep  # noqa: PLC0415

    vocab = Vocabulary.default()
    x0, tokens, null = fixed_batch(batch, cfg.image_size, vocab, device=device)
    torch.manual_seed(0)
    memdiff_model = ConditionalUNet(cfg).to(device).train()
    torch.manual_seed(0)
    peer_model = DiffusersPair(cfg).to(device).train()
    fused = True if x0.is_cuda else None   # the fused AdamW on CUDA (DeepSpeed's FusedAdam in the trainer)
    memdiff = MemdiffTrainStep(memdiff_model, torch.optim.AdamW(memdiff_model.parameters(), lr=lr, fused=fused),
                               NoiseSchedule("linear", 1000), x0, tokens, null, p_uncond=0.5,
                               compute_dtype=compute_dtype)
    peer = DiffusersTrainStep(peer_model, torch.optim.AdamW(peer_model.parameters(), lr=lr, fused=fused), x0, tokens,
                              null, p_uncond=0.5, compute_dtype=compute_dtype)
    cases = {"memdiff": memdiff, "diffusers": peer}
    if channels_last:
        torch.manual_seed(0)
        cl_model = ConditionalUNet(cfg).to(device).train()
        cases["memdiff_channels_last"] = MemdiffTrainStep(
            cl_model, torch.optim.AdamW(cl_model.parameters(), lr=lr, fused=fused), NoiseSchedule("linear", 1000), x0,
            tokens, null, p_uncond=0.5, compute_dtype=compute_dtype, channels_last=True)
    info = [f"model: memdiff ConditionalUNet {count_parameters(memdiff_model) / 1e6:.3f}M parameters, diffusers "
            f"UNet2DConditionModel + TokenEncoder {count_parameters(peer_model) / 1e6:.3f}M "
            f"({count_parameters(peer_model.unet) / 1e6:.3f}M U-Net); batch {batch}, {cfg.image_size} px, "
            f"AdamW lr {lr:g}, p_uncond 0.5, eps-MSE, {str(compute_dtype).removeprefix('torch.')}, {x0.device}; "
            f"model FLOPs per image (forward + backward): memdiff {flops_per_image(ConditionalUNet, cfg) / 1e9:.3g} G, "
            f"diffusers {flops_per_image(DiffusersPair, cfg) / 1e9:.3g} G",
            f"noise: memdiff kernels.noising ({'Triton' if x0.is_cuda else 'Philox reference in PyTorch'}), "
            f"diffusers torch.randn_like; both: no EMA, no gradient clipping, no LR schedule (the trainer adds "
            f"those after the step)"]
    return cases, info


def compare_train_step(args) -> dict:
    cfg = demo_unet_config(image_size=args.image_size)
    cases, info = train_step_cases(cfg, args.batch, channels_last=args.channels_last)
    say(f"train_step: {info[0]}")
    times = interleaved(cases, args.rounds, args.calls, warmup=2, say=say)
    ratio = median(times["diffusers"]) / median(times["memdiff"])
    b = args.batch
    details = [info[0].replace("memdiff ConditionalUNet", "memdiff ConditionalUNet (configs/demo_cpu.json)"), info[1]]
    for name in cases:
        details.append(f"{name:10s} {spread(times[name])} per step = {b / median(times[name]):.0f} images/s, "
                       f"memdiff/{name} = {median(times[name]) / median(times['memdiff']):.2f}x")
    if "memdiff_channels_last" in cases:
        details.append("memdiff_channels_last: training.channels_last on (an opt-in; the headline is the demo "
                       "config's default, off)")
    return {"line": f"train_step vs diffusers: memdiff/diffusers = {ratio:.2f}x", "ratio": ratio, "times_s": times,
            "details": details}


# ----------------------------------------------------------------------------- DP-SGD step

def dp_step_cases(cfg, batch: int, device: str = "cpu", opacus_variants=("opacus_hooks", "opacus_ghost"),
                  sigma: float = 1.0, clip: float = 1.0, lr: float = 1e-3) -> tuple[dict, list[str]]:
    """One DP-SGD step per call for memdiff (default norm method, and torch.func), the non-private
    step on the same batch and loss, and the Opacus variants asked for."""
    from engine.training.diffusion_loss import diffusion_loss_fn, make_dp_batch
    from engine.training.dp_sgd import DPSGD, DPConfig  # noqa: PLC0415

    for message in (".*batching rule.*", ".*Secure RNG turned off.*", ".*[Ff]ull backward hook.*", ".*CPU autocast.*"):
        warnings.filterwarnings("ignore", message=message)
    x0, tokens, _ = fixed_batch(batch, cfg.image_size, Vocabulary.default(), seed=1, device=device)
    index = torch.arange(batch)   # stays on the CPU, as in DPTraining
    schedule = NoiseSchedule("linear", 1000)
    loss_fn = diffusion_loss_fn(schedule)

    def fresh_model() -> ConditionalUNet:
        torch.manual_seed(0)
        return ConditionalUNet(cfg).to(device).train()

    def memdiff_step(method: str):
        model = fresh_model()
        resolved = DPConfig(enabled=True, clip_norm=clip, noise_multiplier=sigma, expected_batch_size=batch,
                            norm_method=method).resolve(100 * batch, 1000)
        dp = DPSGD(model, resolved, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        counter = iter(range(10**9))

        def step() -> None:   # = engine.training.steps.DPStep.forward_backward(step) + the optimizer step
            s = next(counter)
            dp.backward(loss_fn, make_dp_batch(x0, tokens, index, schedule, seed=0, step=s, p_uncond=0.5), s)
            opt.step()
        step.dp = dp   # 'auto' decides at its first step: read after the run (auto_norm_choice)
        return step

    def nonprivate_step():
        model = fresh_model()
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        counter = iter(range(10**9))

        def step() -> None:
            batch_ = make_dp_batch(x0, tokens, index, schedule, seed=0, step=next(counter), p_uncond=0.5)
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch_).mean().backward()
            opt.step()
        return step

    cases = {"memdiff": memdiff_step("auto"), "memdiff_hooks": memdiff_step("ghost"),
             "memdiff_torch_func": memdiff_step("vmap"), "nonprivate": nonprivate_step()}
    if opacus_variants:
        from bench.peer_opacus import opacus_step  # noqa: PLC0415
        for variant in opacus_variants:
            cases[variant] = opacus_step(fresh_model(), variant, x0, tokens, schedule, noise_multiplier=sigma,
                                         clip_norm=clip, lr=lr, p_uncond=0.5)
    info = [f"batch {batch} (expected batch size {batch}), {cfg.image_size} px, {count_parameters(fresh_model()) / 1e6:.3f}M "
            f"parameters, fp32, sigma {sigma}, clip {clip}, AdamW lr {lr:g}, {x0.device}; memdiff = its default "
            f"dp.norm_method 'auto' (the faster of its two exact paths, timed at its first step), memdiff_hooks / "
            f"memdiff_torch_func = each path configured ('ghost' / 'vmap'); every step includes its batch's "
            f"t/eps/CFG draws (memdiff: make_dp_batch, per example)"]
    return cases, info


def auto_norm_choice(step) -> str:
    """What dp.norm_method 'auto' measured and chose in a memdiff DP case (after it ran)."""
    dp = step.dp
    if not dp.norm_seconds:
        return f"memdiff 'auto': not measured (path {dp.method})"
    sec = dp.norm_seconds
    return (f"memdiff 'auto' at its first step: clipped sum by the norm hooks {1e3 * sec['hooks']:.0f} ms, by "
            f"torch.func {1e3 * sec['torch_func']:.0f} ms -> {'norm hooks' if dp.hooks is not None else 'torch.func'}")


def compare_dp_step(args) -> dict:
    cfg = demo_unet_config(image_size=args.image_size)
    variants = ("opacus_hooks", "opacus_ghost") + (() if args.quick else ("opacus_functorch",))
    cases, info = dp_step_cases(cfg, args.dp_batch, opacus_variants=variants)
    say(f"dp_step: {', '.join(cases)}")
    times = interleaved(cases, args.dp_rounds, args.dp_calls, warmup=1, say=say)
    med = {k: median(v) for k, v in times.items()}
    ratio = med["opacus_hooks"] / med["memdiff"]
    details = list(info) + [auto_norm_choice(cases["memdiff"])]
    for name, v in times.items():
        details.append(f"{name:20s} {spread(v)}  x{med[name] / med['nonprivate']:.2f} of the non-private step, "
                       f"memdiff/{name} = {med[name] / med['memdiff']:.2f}x")
    if "opacus_functorch" not in times:
        details.append("opacus_functorch: not run in --quick (run without --quick)")
    return {"line": f"dp_step vs opacus: memdiff/opacus = {ratio:.2f}x", "ratio": ratio, "times_s": times,
            "details": details}


# ----------------------------------------------------------------------------- scan

def compare_scan(args, planted: PlantedModel) -> dict:
    from bench.wen_loop import ddim_scheduler, wen_loop_norms  # noqa: PLC0415
    from engine.audit.wen_detector import DetectorSettings, detect, first_step_score
    from engine.diffusion.seeds import prompt_seeds  # noqa: PLC0415

    groups = np.array(planted.groups)
    # every planted prompt, then a seeded sample of controls and of ordinary prompts, half the rest each
    rng = np.random.default_rng(0)
    chosen = np.flatnonzero(groups == "planted").tolist()
    room = max(0, args.scan_prompts - len(chosen))
    controls = rng.permutation(np.flatnonzero(groups == "control"))[:(room + 1) // 2].tolist()
    ordinary = rng.permutation(np.flatnonzero(groups == "ordinary"))[:room - len(controls)].tolist()
    chosen = sorted(chosen + controls + ordinary)
    tokens, groups = planted.tokens[chosen], groups[chosen]
    n = len(chosen)
    seeds = prompt_seeds(range(n), 0)
    cfg = planted.model.cfg
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    gens, wen_steps, w = 4, 50, 7.5
    fast = DetectorSettings(generations=gens, steps=1, guidance=w)
    scheduler = ddim_scheduler(planted.schedule.num_timesteps)
    chunks = np.array_split(np.arange(n), args.scan_rounds)
    results = {"fast": None, "loop": [None] * n}

    def memdiff_fast() -> None:
        norms = []
        for s in range(0, n, args.batch_prompts):
            det = detect(planted.model, planted.schedule, tokens[s:s + args.batch_prompts], seeds[s:s + args.batch_prompts],
                         fast, image_shape=shape)
            norms.append(det.norms_rms)
        results["fast"] = torch.cat(norms)

    round_no = iter(range(len(chunks)))
    loop_sizes = []

    def loop_chunk() -> None:
        idx = chunks[next(round_no)]
        norms = wen_loop_norms(planted.model, tokens[idx], [seeds[i] for i in idx], image_shape=shape,
                               generations=gens, steps=wen_steps, guidance=w, scheduler=scheduler)
        for j, i in enumerate(idx):
            results["loop"][i] = norms[j]
        loop_sizes.append(len(idx))

    say(f"scan: {n} prompts ({(groups == 'planted').sum()} planted, {(groups == 'control').sum()} control), "
        f"{gens} generations; memdiff first step batched {args.batch_prompts} prompts vs Wen loop {wen_steps} steps")
    memdiff_fast()   # warm-up (and its scores: the scan is deterministic)
    times = interleaved({"wen_loop": loop_chunk, "memdiff": memdiff_fast}, args.scan_rounds, 1, warmup=0, say=say)
    memdiff_rate = [n / t for t in times["memdiff"]]
    loop_rate = [size / t for size, t in zip(loop_sizes, times["wen_loop"])]   # round r scanned chunk r
    ratio = median(memdiff_rate) / median(loop_rate)

    fast_score = first_step_score(results["fast"]).numpy()
    loop_norms = torch.stack(results["loop"])
    loop_score = loop_norms.double().mean(dim=(1, 2)).numpy()
    loop_first = loop_norms[:, :, 0].double().mean(dim=1).numpy()
    scores = {"memdiff_first_step": fast_score, "wen_loop_mean": loop_score, "wen_loop_first_step": loop_first}
    details = [f"model: {planted.description}",
               f"{n} prompts: {(groups == 'planted').sum()} planted, {(groups == 'control').sum()} frequency-matched "
               f"controls, {(groups == 'ordinary').sum()} ordinary; {gens} generations, w = {w}, seeds 0..{n - 1}",
               f"memdiff  first-step score (detect --steps 1, {args.batch_prompts} prompts per batch): "
               f"{median(memdiff_rate):.2f} prompts/s [{min(memdiff_rate):.2f}-{max(memdiff_rate):.2f}]",
               f"wen_loop {wen_steps}-step DDIM per prompt (diffusers DDIMScheduler, batch {2 * gens}): "
               f"{median(loop_rate):.2f} prompts/s [{min(loop_rate):.2f}-{max(loop_rate):.2f}], "
               f"{len(chunks)} rounds of ~{n // len(chunks)} prompts"]
    auc_check = None
    for negatives in ("control", "ordinary"):
        pos, neg = groups == "planted", groups == negatives
        if not pos.any() or not neg.any():
            continue
        boot = bootstrap_aucs(scores, pos, neg, n_boot=args.bootstrap)
        est = {k: auc(s[pos], s[neg]) for k, s in scores.items()}
        ivals = {k: interval(v) for k, v in boot.items()}
        diff = interval(boot["memdiff_first_step"] - boot["wen_loop_mean"])
        details.append(f"AUC planted vs {negatives} (n+ {pos.sum()}, n- {neg.sum()}, 95% stratified bootstrap, "
                       f"{args.bootstrap} resamples):")
        for k in scores:
            details.append(f"    {k:22s} {est[k]:.3f} [{ivals[k][0]:.3f}, {ivals[k][1]:.3f}]")
        inside = ivals["wen_loop_mean"][0] <= est["memdiff_first_step"] <= ivals["wen_loop_mean"][1]
        details.append(f"    memdiff first-step AUC {'inside' if inside else 'OUTSIDE'} the loop's interval; paired "
                       f"difference memdiff - loop {est['memdiff_first_step'] - est['wen_loop_mean']:+.3f} "
                       f"[{diff[0]:+.3f}, {diff[1]:+.3f}]")
        if negatives == "control":
            auc_check = {"memdiff_first_step": est["memdiff_first_step"], "wen_loop_mean": est["wen_loop_mean"],
                         "wen_loop_interval": ivals["wen_loop_mean"], "inside": inside, "difference_interval": diff}
    note = ("scan AUCs: no planted/control prompts" if auc_check is None else
            f"scan AUCs (planted vs control prompts, n+ {int((groups == 'planted').sum())}, n- "
            f"{int((groups == 'control').sum())}): memdiff first-step {auc_check['memdiff_first_step']:.3f}, Wen loop "
            f"50-step mean {auc_check['wen_loop_mean']:.3f} [95% {auc_check['wen_loop_interval'][0]:.3f}, "
            f"{auc_check['wen_loop_interval'][1]:.3f}]: {'inside' if auc_check['inside'] else 'OUTSIDE'} the loop's "
            f"interval")
    return {"line": f"scan vs wen_loop: memdiff/wen_loop = {ratio:.2f}x", "ratio": ratio, "auc": auc_check,
            "note": note, "times_s": times, "details": details}


# ----------------------------------------------------------------------------- loader

def compare_loader(args, prepared_by_size: dict) -> dict:
    """At each cache resolution: memdiff's loaders against the training step on the demo U-Net
    built at that resolution. The headline is the demo's resolution (--image-size) with the torch
    DataLoader path and augmentation on (data_pipeline.augment.AugmentConfig defaults)."""
    from data_pipeline.augment import AugmentConfig  # noqa: PLC0415
    from data_pipeline.loaders import dali_available, make_loader  # noqa: PLC0415

    b = args.batch
    details, all_times, ratio = [], {}, None
    for size, prepared in prepared_by_size.items():
        split = prepared.splits["train"]
        cfg = demo_unet_config(len(prepared.vocab), image_size=size)
        torch.manual_seed(0)
        model = ConditionalUNet(cfg).train()
        x0, tokens, null = fixed_batch(b, size, prepared.vocab)
        train = MemdiffTrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                                 NoiseSchedule("linear", 1000), x0, tokens, null, p_uncond=0.5)
        loaders = {"torch_augment": make_loader(split, b, seed=0, backend="torch", augment=AugmentConfig()),
                   "torch_plain": make_loader(split, b, seed=0, backend="torch")}
        if dali_available()[0]:
            loaders["dali_cpu_augment"] = make_loader(split, b, seed=0, backend="dali", augment=AugmentConfig())
        cases = {name: (lambda it=it: next(it)) for name, it in loaders.items()}
        cases["training"] = train
        say(f"loader: {len(split)} images at {size} px, batch {b}: {', '.join(cases)}")
        rounds = args.rounds if size == args.image_size else max(2, args.rounds // 2)
        times = interleaved(cases, rounds, args.calls, warmup=2, say=say)
        rate = {k: b / median(v) for k, v in times.items()}
        if size == args.image_size:
            ratio = rate["torch_augment"] / rate["training"]
        details.append(f"{size} px: {len(split)} synthetic training images (uint8 cache), batch {b}; training = "
                       f"memdiff's step on the demo U-Net built at {size} px")
        for k, v in times.items():
            details.append(f"    {k:18s} {spread(v)} per batch = {rate[k]:.0f} images/s, "
                           f"x{rate[k] / rate['training']:.2f} of training consumption")
        all_times[size] = times
    if not dali_available()[0]:
        details.append(f"DALI: not measured ({dali_available()[1]})")
    details.append(f"headline: {args.image_size} px (the demo's), torch DataLoader path with augmentation on. The "
                   f"trainer reads its loader in the training process (DataLoader num_workers=0): loader time adds to "
                   f"the step unless it is hidden behind it")
    return {"line": f"loader vs training: memdiff/consumption = {ratio:.2f}x", "ratio": ratio, "times_s": all_times,
            "details": details}


# ----------------------------------------------------------------------------- main

def settings(args) -> argparse.Namespace:
    quick = args.quick
    defaults = dict(rounds=5 if quick else 9, calls=3 if quick else 5, dp_rounds=3 if quick else 7,
                    dp_calls=2 if quick else 3, scan_rounds=3 if quick else 5, scan_prompts=40 if quick else 120,
                    planted_steps=300 if quick else 1500, bootstrap=1000 if quick else 4000)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and prompts: under 5 minutes on 2 idle cores")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for every side (default 1)")
    p.add_argument("--only", default="train,dp,scan,loader", help="comma-separated subset of train,dp,scan,loader")
    p.add_argument("--checkpoint", default=None,
                   help="a trained memdiff run with planted duplicates (e.g. demo_output/runs/cfg) for the scan")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file (must not exist)")
    p.add_argument("--work-dir", default=None, help="where the synthetic data goes (default: a temporary dir, removed)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dp-batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-prompts", type=int, default=16, help="prompts per batch of memdiff's scan (its default)")
    p.add_argument("--channels-last", action="store_true",
                   help="train: also time memdiff with training.channels_last on (an opt-in; not the headline)")
    for name in ("rounds", "calls", "dp-rounds", "dp-calls", "scan-rounds", "scan-prompts", "planted-steps", "bootstrap"):
        p.add_argument(f"--{name}", type=int, default=None)
    args = settings(p.parse_args(argv))
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(only) - {"train", "dp", "scan", "loader"})
    if bad:
        p.error(f"--only: unknown section {bad[0]!r}")
    if args.json and os.path.exists(args.json):
        p.error(f"--json: {args.json} exists (not overwritten)")
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint: {args.checkpoint} is not a directory")
    if "train" in only or "scan" in only:
        try:
            import diffusers  # noqa: F401, PLC0415
        except ImportError:
            p.error("diffusers is not installed: pip install -e '.[bench]' (or make bench-peers)")
    torch.set_num_threads(args.threads)
    start, before = time.perf_counter(), machine()
    say(f"{before['cpu']}, {before['cores']} cores, load average {before['load_average_1_5_15']}, "
        f"{args.threads} torch thread(s), {'quick' if args.quick else 'full'} run")
    work = args.work_dir or tempfile.mkdtemp(prefix="memdiff_peers_")
    results: dict[str, dict] = {}
    try:
        if "train" in only:
            results["train"] = compare_train_step(args)
        if "dp" in only:
            results["dp"] = compare_dp_step(args)
        prepared = None
        if "scan" in only or "loader" in only:
            say("synthetic set with planted duplicates ...")
            # quick: a small set (many epochs in few steps); full: the demo's data section
            prepared = planted_data(work, images=170 if args.quick else 500, planted_k=10,
                                    copies=10 if args.quick else 20, image_size=args.image_size)
        if "scan" in only:
            if args.checkpoint:
                planted = planted_model_from_run(args.checkpoint)
            else:
                planted = train_planted_model(prepared, steps=args.planted_steps, batch=args.batch,
                                              lr=2e-3 if args.quick else 1e-3, say=say)
            results["scan"] = compare_scan(args, planted)
        if "loader" in only:
            by_size = {args.image_size: prepared}
            if args.image_size != 64:   # the resolution of configs/cfg.json and of bench_loaders' figures
                by_size[64] = planted_data(work, images=170 if args.quick else 500, planted_k=10,
                                           copies=10 if args.quick else 20, image_size=64)
            results["loader"] = compare_loader(args, by_size)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    after = machine()
    for key in ("train", "dp", "scan", "loader"):
        if key in results:
            print(results[key]["line"])
    print("(ratio = memdiff throughput / peer throughput, medians over interleaved rounds: above 1.00x memdiff is "
          "faster)")
    if "scan" in results:
        print(results["scan"]["note"])
    print(f"\nmachine: {before['cpu']}, {before['cores']} cores, torch {torch.__version__}, {args.threads} torch "
          f"thread(s); load average (1, 5, 15 min) {before['load_average_1_5_15']} at start, "
          f"{after['load_average_1_5_15']} at end; {before['date']}; {time.perf_counter() - start:.0f} s in all")
    for key, res in results.items():
        print(f"\n[{key}]")
        for line in res["details"]:
            print("  " + line)
    summary = {"machine_start": before, "machine_end": after, "threads": args.threads, "quick": args.quick,
               "seconds": time.perf_counter() - start, "torch": torch.__version__,
               "results": {k: {kk: vv for kk, vv in v.items()} for k, v in results.items()}}
    if args.json:
        with open(args.json, "x") as f:
            json.dump(summary, f, indent=1, default=float)
    return summary


if __name__ == "__main__":
    main()
