"""The training loop: DeepSpeed (any ZeRO stage, 1..N ranks) around the conditional U-Net.

One optimizer step = `gradient_accumulation_steps` micro-batches per rank. Each micro-batch:
    x0, tokens <- data_pipeline loader (a pure function of (seed, micro step, rank))
    seed       <- (config seed, micro step, rank): drives t, the CFG drop and the kernels' noise
    tokens     <- null prompt with probability p_uncond (classifier-free guidance training)
    x_t        =  kernels.noising.noised_input(x0, sqrt_ab[t], sqrt_1mab[t], seed)
    loss       =  mean_b kernels.noising.noise_prediction_loss(model(x_t, t, tokens), x0, ..., seed)
Because every random draw is a function of the step and the rank, a run resumed from a checkpoint
continues bit for bit as if it had never stopped (fp32, CPU).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.atomic_files import write_json, write_text
from data_pipeline.dataset import prepare_dataset
from data_pipeline.images import to_uint8
from data_pipeline.loaders import make_loader
from engine.diffusion.generate import generate
from engine.diffusion.schedule import NoiseSchedule, loss_weights
from engine.model.export import export_model
from engine.model.unet import ConditionalUNet, UNetConfig, count_parameters
from engine.training.checkpointing import latest_tag, load_checkpoint, save_checkpoint
from engine.training.cluster_env import process_group_env
from engine.training.config import TrainConfig, resolved_json
from engine.training.dp_sgd import DPTraining
from engine.training.ema import EMA
from engine.training.run_logger import RunLogger
from engine.training.screening import ScreeningMonitor, screened_mean
from kernels.backend import use_triton
from kernels.noising import noise_prediction_loss, noised_input

# The sections a resumed run must share with the run it continues (others, e.g. training.steps, may change).
FIXED_ON_RESUME = ("model", "diffusion", "data", "conditioning",
                   "dp")  # dp: the accountant assumes one (sigma, q) for the whole run


class TrainingError(RuntimeError):
    """A run that cannot start or must stop; the message is one line for the user."""


class NonFiniteLoss(TrainingError):
    pass


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """A 63-bit seed for one micro-batch of one rank (t, CFG drop, dropout and the kernels' noise)."""
    state = np.random.SeedSequence([seed, micro_step, rank]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str) -> tuple[int, int, int]:
    """Join the launcher's process group (deepspeed, torchrun, srun), or make a one-rank group for
    plain `python engine/train.py`."""
    import deepspeed
    if not dist.is_initialized():
        os.environ.update(process_group_env(dict(os.environ)))
        if os.environ.get("WORLD_SIZE") == "1":   # a one-rank group may take any free port
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def _diff_sections(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first key (dotted) whose value differs between two config trees, or None."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        where = f"{prefix}.{key}" if prefix else key
        if isinstance(a, dict) and isinstance(b, dict):
            found = _diff_sections(a, b, where)
            if found:
                return found
        elif a != b:
            return f"{where} ({json.dumps(a)} in the run, {json.dumps(b)} now)"
    return None


def _check_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool) -> str | None:
    """The checkpoint tag to resume from (None = fresh start); refuses to mix two different runs."""
    ckpt_dir = run_dir / "checkpoints"
    tag = latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
    if tag is not None and not resume:
        raise TrainingError(f"{run_dir}: already holds checkpoints (latest {tag}); pass --resume auto to continue "
                            f"it or choose another output_dir")
    saved = run_dir / "config.json"
    if tag is not None and saved.is_file():
        old, new = json.loads(saved.read_text()), json.loads(resolved_json(cfg))
        for section in FIXED_ON_RESUME:
            diff = _diff_sections({section: old.get(section)}, {section: new.get(section)})
            if diff:
                raise TrainingError(f"{run_dir}: cannot resume, the config changed at {diff}")
    return tag


def _fit_model_to_vocab(cfg: TrainConfig, vocab, say) -> UNetConfig:
    """Extra tokens (planted, patient) grow the vocabulary: widen the embedding tables to fit."""
    mcfg = cfg.model
    vocab_size, max_tokens = max(mcfg.vocab_size, len(vocab)), max(mcfg.max_tokens, vocab.max_len)
    if (vocab_size, max_tokens) != (mcfg.vocab_size, mcfg.max_tokens):
        say(f"model: vocab_size {mcfg.vocab_size} -> {vocab_size}, max_tokens {mcfg.max_tokens} -> {max_tokens} "
            f"(the vocabulary has {len(vocab)} tokens of length {vocab.max_len})")
        mcfg = dataclasses.replace(mcfg, vocab_size=vocab_size, max_tokens=max_tokens)
    return mcfg


def _sample_prompts(cfg: TrainConfig, prepared) -> tuple[list[str], torch.Tensor]:
    """The first distinct prompts of the sample split (train if that split is empty)."""
    split = prepared.splits.get(cfg.logging.sample_split)
    if split is None or len(split) == 0:
        split = prepared.splits["train"]
    chosen, rows = [], []
    for i, prompt in enumerate(split.prompts):
        if prompt not in chosen:
            chosen.append(prompt)
            rows.append(i)
        if len(chosen) == cfg.logging.sample_prompts:
            break
    return chosen, split.tokens[rows]


def train(cfg: TrainConfig, *, resume: bool = False, stop_at: int | None = None) -> dict:
    """Run (or continue) the training described by `cfg`. Returns a summary (rank 0: paths, final step)."""
    import deepspeed
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world, local_rank = init_distributed(device)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    is_main = rank == 0
    say = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)

    run_dir = Path(cfg.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    tag = _check_run_dir(cfg, run_dir, resume)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.json", resolved_json(cfg))
    dist.barrier()

    # Data: rank 0 reads / generates / caches first, the others then hit its cache.
    if is_main:
        prepared = prepare_dataset(cfg.data, str(run_dir), progress=cfg.logging.progress)
    dist.barrier()
    if not is_main:
        prepared = prepare_dataset(cfg.data, str(run_dir), progress=False)
    vocab, train_split = prepared.vocab, prepared.splits["train"]
    if len(train_split) == 0:
        raise TrainingError(f"data: the train split is empty ({cfg.data.root})")

    mcfg = _fit_model_to_vocab(cfg, vocab, say)
    torch.manual_seed(cfg.training.seed)  # identical initial weights on every rank
    model = ConditionalUNet(mcfg)
    if cfg.training.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ds_config = cfg.deepspeed.to_deepspeed()
    if device == "cpu":
        # torch.optim.AdamW instead of DeepSpeed's JIT-compiled fused CPU Adam: nothing to build.
        ds_config["optimizer"]["params"]["torch_adam"] = True
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    compute_dtype = torch.bfloat16 if cfg.deepspeed.bf16.enabled else torch.float32
    ema = EMA(engine.module, cfg.training.ema_decay, cfg.training.ema_warmup, keep=is_main)

    start_step = 0
    if tag is not None:
        state = load_checkpoint(engine, ckpt_dir, tag, ema, rank)
        start_step = int(state["step"])
        say(f"resumed from {ckpt_dir / tag} at step {start_step}")
    total = cfg.training.steps
    stop = min(total, stop_at) if stop_at is not None else total
    if start_step >= total:
        say(f"{run_dir}: already trained for {start_step} >= training.steps = {total} steps; nothing to do")

    use_compile = cfg.compile.enabled if cfg.compile.enabled is not None else device == "cuda"
    use_compile = use_compile and not (cfg.dp is not None and cfg.dp.enabled)  # DP's norm hooks
    if use_compile and start_step < stop:
        engine.compile(backend=cfg.compile.backend, compile_kwargs={"mode": cfg.compile.mode})

    micro, accum = cfg.deepspeed.train_micro_batch_size_per_gpu, cfg.deepspeed.gradient_accumulation_steps
    global_batch = micro * accum * world
    loader = make_loader(train_split, micro, seed=cfg.training.seed, rank=rank, world_size=world,
                         start_step=start_step * accum, augment=cfg.augment, backend=cfg.training.loader,
                         device=str(dev))
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    param = cfg.diffusion.parameterization
    null = vocab.null_tokens(micro).to(dev)
    # --- DP-SGD (Poisson batches, own backward) and training-time screening ---
    dp_training = None
    if cfg.dp is not None and cfg.dp.enabled:
        dp_training = DPTraining(cfg.dp, engine.module, train_split, schedule, parameterization=param,
                                 min_snr_gamma=cfg.diffusion.min_snr_gamma, p_uncond=cfg.conditioning.p_uncond,
                                 seed=cfg.training.seed, rank=rank, world_size=world, start_step=start_step,
                                 total_steps=total, augment=cfg.augment, device=dev)
        global_batch = dp_training.resolved.expected_batch_size
        say(dp_training.describe())
    screening = (ScreeningMonitor(cfg.screening, schedule, param)
                 if cfg.screening is not None and cfg.screening.enabled else None)

    prompts, prompt_tokens = _sample_prompts(cfg, prepared)
    guidance = list(cfg.logging.sample_guidance) if cfg.conditioning.p_uncond > 0 else [1.0]
    if is_main:
        write_json(run_dir / "sample_prompts.json",
                   {"prompts": prompts, "seeds": list(cfg.logging.sample_seeds), "guidance": guidance}, indent=2)
    logger = RunLogger(run_dir, enabled=is_main, total_steps=total, start_step=start_step,
                       tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress)
    title = f"{run_dir.name} (p_uncond={cfg.conditioning.p_uncond:g})"
    say(f"{run_dir}: {count_parameters(model) / 1e6:.2f}M parameters, {len(train_split)} training images, "
        f"{world} rank(s) on {device}, ZeRO stage {cfg.deepspeed.zero_optimization.stage}, global batch "
        f"{global_batch}, steps {start_step} -> {stop}, noising/loss kernels: "
        f"{'Triton' if use_triton(torch.empty(0, device=dev)) else 'PyTorch reference'}")

    eval_model = ConditionalUNet(mcfg).to(dev).eval() if is_main else None

    def ema_model() -> ConditionalUNet:
        return ema.copy_to(eval_model)

    def write_samples(step: int) -> None:
        if is_main:
            panels, model_ema = [], ema_model()   # one EMA copy for every guidance panel
            for w in guidance:
                images = generate(model_ema, schedule, prompt_tokens, cfg.logging.sample_seeds, guidance=w,
                                  steps=cfg.logging.sample_steps, sampler=cfg.logging.sample_sampler,
                                  parameterization=param, device=dev)
                panels.append((f"w = {w:g}", to_uint8(images)))
            path = logger.sample_grid(step, panels, prompts)
            logger.write(f"step {step}: samples -> {path}")
        dist.barrier()

    def checkpoint(step: int) -> None:
        save_checkpoint(engine, ckpt_dir, step, ema, {"micro_step": step * accum, "world_size": world},
                        cfg.training.keep_checkpoints, rank)
        if is_main:
            export_model(run_dir / "export", ema_model(), cfg.diffusion, vocab,
                         metadata={"step": step, "p_uncond": cfg.conditioning.p_uncond, "run": str(run_dir)})
            logger.loss_curve(title)
        dist.barrier()

    manual_grad_norm = cfg.deepspeed.zero_optimization.stage == 0 and not cfg.deepspeed.bf16.enabled
    last_grad_norm = float("nan")
    window_losses: list[torch.Tensor] = []
    window_start, window_steps = time.perf_counter(), 0
    step = start_step
    try:
        while step < stop:
            engine.train()
            if dp_training is not None:  # one Poisson batch, DP-SGD backward
                window_losses.append(dp_training.backward(step))
                engine.step()
            for k in range(accum if dp_training is None else 0):
                micro_step = step * accum + k
                x0, tokens, _ = next(loader)
                seed = step_seed(cfg.training.seed, micro_step, rank)
                gen = torch.Generator().manual_seed(seed)
                t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=gen).to(dev)
                drop = (torch.rand(x0.shape[0], generator=gen) < cfg.conditioning.p_uncond).to(dev)
                tokens = torch.where(drop[:, None], null[: x0.shape[0]], tokens)
                torch.manual_seed(seed)  # dropout, if any, replays identically on resume
                sqrt_ab, sqrt_1mab = schedule.sqrt_ab(t), schedule.sqrt_1mab(t)
                x_t = noised_input(x0, sqrt_ab, sqrt_1mab, seed).to(compute_dtype)
                if cfg.training.channels_last:
                    x_t = x_t.contiguous(memory_format=torch.channels_last)
                pred = engine(x_t, t, tokens)
                weights = loss_weights(t, schedule, param, cfg.diffusion.min_snr_gamma)
                per_sample = noise_prediction_loss(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, param)
                loss = per_sample.mean()
                if screening is not None:  # Wen's training-time screening
                    keep, any_kept = screening.keep(engine.module, x_t, t, tokens, pred_cond=pred)
                    if not any_kept and accum == 1:  # nothing left on any rank: skip the step
                        screening.skipped_steps += 1
                        window_losses.append(loss.detach().float())
                        continue
                    loss = screened_mean(per_sample, keep)
                engine.backward(loss)
                if k == accum - 1 and manual_grad_norm and (step + 1) % cfg.training.log_every == 0:
                    # ZeRO 0 in fp32 does not record the norm; grads are all-reduced by now.
                    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
                    last_grad_norm = float(torch.stack(grads).norm()) if grads else float("nan")
                engine.step()
                window_losses.append(loss.detach().float())
            ema.update(engine.module, step)
            step += 1
            window_steps += 1
            logger.advance()

            at_end = step == stop
            do_log = step % cfg.training.log_every == 0 or at_end
            do_ckpt = at_end or (cfg.training.checkpoint_every and step % cfg.training.checkpoint_every == 0)
            do_sample = (step == total) or (cfg.training.sample_every and step % cfg.training.sample_every == 0)
            if not (do_log or do_ckpt or do_sample):
                continue
            # One collective per window: the summed loss, its count and the non-finite count.
            losses = torch.stack(window_losses)
            finite = torch.isfinite(losses)
            stats = torch.stack([torch.where(finite, losses, 0).sum(), finite.sum().float(),
                                 (~finite).sum().float()]).to(dev)
            dist.all_reduce(stats)
            if stats[2] > 0:
                local = (~finite).nonzero()
                where = (f"step {step - window_steps + int(local[0, 0]) // accum + 1}" if len(local)
                         else f"steps {step - window_steps + 1}..{step} (on another rank)")
                raise NonFiniteLoss(f"non-finite loss at {where}; training stopped, last good checkpoint: "
                                    f"{ckpt_dir / (latest_tag(ckpt_dir) or 'none')}")
            elapsed = time.perf_counter() - window_start
            images_per_s = window_steps * global_batch / max(elapsed, 1e-9)
            grad_norm = last_grad_norm if manual_grad_norm else engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            mean_loss = float(stats[0] / stats[1])
            logger.log(step, {"loss": mean_loss, "lr": float(engine.get_lr()[0]), "grad_norm": grad_norm,
                              "images_per_s": images_per_s, "images_per_s_per_rank": images_per_s / world,
                              "epoch": step * global_batch / len(train_split),
                              "time_s": time.time(),
                              **(dp_training.log_fields() if dp_training is not None else {}),
                              **(screening.log_fields() if screening is not None else {})})
            logger.advance(0, loss=mean_loss, img_s=images_per_s)
            if do_sample:
                write_samples(step)
            if do_ckpt:
                checkpoint(step)
            window_losses, window_steps, window_start = [], 0, time.perf_counter()
    except NonFiniteLoss:
        logger.close()
        raise
    logger.close()
    summary = {"run_dir": str(run_dir), "step": step, "export": str(run_dir / "export"),
               "checkpoint": str(ckpt_dir / (latest_tag(ckpt_dir) or "")) if ckpt_dir.is_dir() else None}
    if dp_training is not None:  # the privacy spent, in the summary and the run dir
        summary["privacy"] = dp_training.summary()
        if is_main:
            write_json(run_dir / "privacy.json", summary["privacy"], indent=2)
            say(f"privacy: (epsilon {summary['privacy']['epsilon']:.3g}, delta {cfg.dp.delta:g}) after "
                f"{summary['privacy']['steps']} DP-SGD steps -> {run_dir / 'privacy.json'}")
    if is_main and step > start_step:
        print(f"done: step {step}/{total}. export {run_dir / 'export'}, metrics {run_dir / 'metrics.jsonl'}, "
              f"loss curve {run_dir / 'loss_curve.png'}, samples {run_dir / 'samples'}", flush=True)
    return summary
