"""The training loop: DeepSpeed (any ZeRO stage, 1..N ranks) around the conditional U-Net.

Read top to bottom, as guided-diffusion's TrainLoop:

    TrainLoop(cfg)    set-up: process group, run directory, data, model + DeepSpeed engine + EMA,
                      resume from the latest checkpoint, the step type (engine.training.steps:
                      standard, screened or DP-SGD), logging and sample prompts
    run_loop()        until the stop step: run_step(), then on its cadences
                      log_window() -> metrics.jsonl, write_samples() -> samples/, save() -> checkpoints/ + export/
    run_step()        one optimizer step: the step type's forward_backward, then the EMA update

Every random draw is a function of (config seed, step, rank or example index), never of how the run
got there (engine.training.diffusion_loss), so a run resumed from a checkpoint continues bit for
bit as if it had never stopped (fp32, CPU).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.atomic_files import write_json
from data_pipeline.dataset import check_data_root, prepare_dataset
from data_pipeline.images import to_uint8
from engine.diffusion.generate import generate
from engine.diffusion.schedule import NoiseSchedule
from engine.model.export import export_model
from engine.model.unet import ConditionalUNet, UNetConfig, count_parameters
from engine.training.checkpointing import LATEST, load_checkpoint, save_checkpoint, step_of, tag_for
from engine.training.cluster_env import process_group_env
from engine.training.config import TrainConfig
from engine.training.ema import EMA
from engine.training.run_dir import check_run_dir, claim_run_dir
from engine.training.run_logger import RunLogger
from engine.training.steps import DPStep, make_step
from kernels.backend import use_triton

RUNNING_LEVEL_WINDOWS = 20   # the loss's running level: the median of the last this-many logged windows


class TrainingError(RuntimeError):
    """A run that cannot start or must stop; the message is one line for the user."""


class NonFiniteLoss(TrainingError):
    pass


class Diverged(TrainingError):
    pass


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


def _bytes_per_parameter(stage: int, world: int, bf16: bool) -> float:
    """Device memory per parameter on one rank for weights, gradients and AdamW's two moments (fp32
    master weights under bf16), as ZeRO partitions them; activations come on top."""
    weights, grads, optim = (2, 2, 12) if bf16 else (4, 4, 8)
    return {0: weights + grads + optim, 1: weights + grads + optim / world,
            2: weights + (grads + optim) / world, 3: (weights + grads + optim) / world}[stage]


def check_model_fits(cfg: TrainConfig, world: int, device: torch.device) -> None:
    """Before anything is read or allocated: the model's parameters counted on the meta device, and
    a one-line error when their training state alone exceeds the device's memory (a typo such as
    base_channels 16384 would otherwise be tried until the allocator gives up)."""
    with torch.device("meta"):
        n = count_parameters(ConditionalUNet(cfg.model))
    ds = cfg.deepspeed
    need = n * (_bytes_per_parameter(ds.zero_optimization.stage, world, ds.bf16.enabled) + 8)  # + EMA, eval copy
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"GPU {device}"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    if need > have:
        raise TrainingError(f"model: {n / 1e6:,.0f}M parameters need about {need / 2**30:,.0f} GiB per rank for "
                            f"weights, gradients, AdamW state and the EMA (ZeRO stage {ds.zero_optimization.stage}, "
                            f"{world} rank(s)), more than the {have / 2**30:,.0f} GiB of {where}; reduce "
                            f"model.base_channels, model.channel_mult or model.num_res_blocks")


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


@dataclasses.dataclass
class _Window:
    """What happened since the last log line: one loss per micro-batch, the optimizer steps, the time."""
    losses: list[torch.Tensor] = dataclasses.field(default_factory=list)
    steps: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)


class TrainLoop:
    """One run (or its continuation): set up in the constructor, trained by `run_loop`."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, stop_at: int | None = None) -> None:
        self.cfg = cfg
        check_data_root(cfg.data)          # a wrong folder is one line, before DeepSpeed starts or a run folder exists
        self._setup_distributed()
        check_model_fits(cfg, self.world, self.device)
        tag = self._setup_run_dir(resume)
        self._setup_data()
        self._setup_engine()
        self._resume(tag, stop_at)
        self.schedule = NoiseSchedule.from_config(cfg.diffusion)
        self.step_type = make_step(cfg, self.engine, self.train_split, self.schedule, rank=self.rank,
                                   world=self.world, start_step=self.start_step, device=self.device,
                                   logged=lambda n: any(self._cadence(n)), resume_state=self.resume_state,
                                   planted_manifest=self.prepared.manifest)
        if self.step_type.describe():
            self.say(self.step_type.describe())
        self._setup_outputs()

    # ------------------------------------------------------------------------- set-up

    def _setup_distributed(self) -> None:
        import deepspeed  # noqa: PLC0415 - seconds to import: after the config has been validated
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.utils.logger.setLevel(logging.WARNING)
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.rank, self.world, local_rank = init_distributed(self.device_type)
        if self.device_type == "cuda":
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        self.is_main = self.rank == 0

    def say(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def _rank0_first(self, fn, what: str):
        """`fn()` on rank 0 while the others wait; if it fails there they stop too, rather than wait
        forever in the next collective. Returns fn's result on rank 0, None on the others."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = exc
        failed = torch.tensor([error is not None], dtype=torch.int64, device=self.device)
        dist.broadcast(failed, src=0)
        if error is not None:
            raise error
        if failed.item():
            raise TrainingError(f"stopped: rank 0 failed while {what}")
        return result

    def _setup_run_dir(self, resume: bool) -> str | None:
        """Rank 0 checks output_dir is new, empty or our run (and picks the intact checkpoint to
        resume), then marks it ours; the others receive the checkpoint's step."""
        self.run_dir = Path(self.cfg.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

        def check_and_claim() -> int:
            tag = check_run_dir(self.cfg, self.run_dir, resume)
            claim_run_dir(self.cfg, self.run_dir)
            return -1 if tag is None else step_of(tag)

        step = torch.tensor([self._rank0_first(check_and_claim, "checking output_dir") or 0], device=self.device)
        dist.broadcast(step, src=0)
        return None if int(step) < 0 else tag_for(int(step))

    def _setup_data(self) -> None:
        """Rank 0 reads / generates / caches first, the others then hit its cache."""
        self.prepared = self._rank0_first(lambda: prepare_dataset(self.cfg.data, str(self.run_dir),
                                                                  progress=self.cfg.logging.progress),
                                          "reading the data")
        if not self.is_main:
            self.prepared = prepare_dataset(self.cfg.data, str(self.run_dir), progress=False)
        self.vocab, self.train_split = self.prepared.vocab, self.prepared.splits["train"]
        if len(self.train_split) == 0:
            raise TrainingError(f"data: the train split is empty ({self.cfg.data.root})")

    def _setup_engine(self) -> None:
        import deepspeed  # noqa: PLC0415
        cfg = self.cfg
        self.model_cfg = _fit_model_to_vocab(cfg, self.vocab, self.say)
        torch.manual_seed(cfg.training.seed)  # identical initial weights on every rank
        model = ConditionalUNet(self.model_cfg)
        if cfg.training.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.num_parameters = count_parameters(model)
        ds_config = cfg.deepspeed.to_deepspeed()
        if self.device_type == "cpu":
            # torch.optim.AdamW instead of DeepSpeed's JIT-compiled fused CPU Adam: nothing to build.
            ds_config["optimizer"]["params"]["torch_adam"] = True
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        self.ema = EMA(self.engine.module, cfg.training.ema_decay, cfg.training.ema_warmup, keep=self.is_main)

    def _resume(self, tag: str | None, stop_at: int | None) -> None:
        """Restore the checkpoint `tag` (if any), fix the steps this process runs (start -> stop) and
        compile the engine if any remain."""
        self.start_step, self.resume_state = 0, None
        if tag is not None:
            self.resume_state = load_checkpoint(self.engine, self.ckpt_dir, tag, self.ema, self.rank)
            self.start_step = int(self.resume_state["step"])
            self.say(f"resumed from {self.ckpt_dir / tag} at step {self.start_step}")
        self.total = self.cfg.training.steps
        self.stop = min(self.total, stop_at) if stop_at is not None else self.total
        if self.start_step >= self.total:
            self.say(f"{self.run_dir}: already trained for {self.start_step} >= training.steps = {self.total} "
                     f"steps; nothing to do")
        self.step = self.start_step
        compile_cfg = self.cfg.compile
        use_compile = compile_cfg.enabled if compile_cfg.enabled is not None else self.device_type == "cuda"
        use_compile = use_compile and not (self.cfg.dp is not None and self.cfg.dp.enabled)  # DP's norm hooks
        if use_compile and self.start_step < self.stop:
            self.engine.compile(backend=compile_cfg.backend, compile_kwargs={"mode": compile_cfg.mode})

    def _setup_outputs(self) -> None:
        """Sample prompts, the metrics logger, the start-up line and rank 0's EMA evaluation model."""
        cfg = self.cfg
        self.prompts, self.prompt_tokens = _sample_prompts(cfg, self.prepared)
        self.guidance = list(cfg.logging.sample_guidance) if cfg.conditioning.p_uncond > 0 else [1.0]
        if self.is_main:
            write_json(self.run_dir / "sample_prompts.json", {"prompts": self.prompts, "seeds": list(
                cfg.logging.sample_seeds), "guidance": self.guidance}, indent=2)
        self.logger = RunLogger(self.run_dir, enabled=self.is_main, total_steps=self.total,
                                start_step=self.start_step, tensorboard=cfg.logging.tensorboard,
                                progress=cfg.logging.progress)
        kernels = "Triton" if use_triton(torch.empty(0, device=self.device)) else "PyTorch reference"
        self.say(f"{self.run_dir}: {self.num_parameters / 1e6:.2f}M parameters, {len(self.train_split)} training "
                 f"images, {self.world} rank(s) on {self.device_type}, ZeRO stage "
                 f"{cfg.deepspeed.zero_optimization.stage}, global batch {self.step_type.global_batch}, steps "
                 f"{self.start_step} -> {self.stop}, noising/loss kernels: {kernels}")
        self.eval_model = ConditionalUNet(self.model_cfg).to(self.device).eval() if self.is_main else None
        self.window = _Window()
        self.recent_losses: list[float] = []   # logged window means: the loss's running level

    # ------------------------------------------------------------------------- the loop

    def run_loop(self) -> dict:
        try:
            while self.step < self.stop:
                self.run_step()
                self._after_step()
        except TrainingError:
            self.logger.close()
            raise
        self.logger.close()
        return self._finish()

    def run_step(self) -> None:
        self.engine.train()
        self.window.losses += self.step_type.forward_backward(self.step)
        self.ema.update(self.engine.module, self.step)
        self.step += 1
        self.window.steps += 1
        self.logger.advance()

    def _cadence(self, step: int) -> tuple[bool, bool, bool]:
        """(log, checkpoint, sample) after `step` optimizer steps. A checkpoint or samples always
        come with a log line, so the checks of log_window run before anything is saved."""
        every = self.cfg.training
        at_end = step == self.stop
        do_log = step % every.log_every == 0 or at_end
        do_ckpt = at_end or bool(every.checkpoint_every and step % every.checkpoint_every == 0)
        do_sample = step == self.total or bool(every.sample_every and step % every.sample_every == 0)
        return do_log, do_ckpt, do_sample

    def _after_step(self) -> None:
        do_log, do_ckpt, do_sample = self._cadence(self.step)
        every = self.cfg.training.export_every
        do_export = bool(every and self.step % every == 0)
        if not (do_log or do_ckpt or do_sample or do_export):
            return
        self.log_window(check_weights=do_ckpt or do_sample or do_export)
        if do_sample:
            self.write_samples()
        if do_ckpt:
            self.save()
        if do_export:
            self.export_snapshot()
        self.window = _Window()

    def _last_good(self) -> str:
        try:
            tag = (self.ckpt_dir / LATEST).read_text().strip()
        except OSError:
            tag = ""
        return f"{self.ckpt_dir / tag} (its model is in {self.run_dir / 'export'})" if tag else "none"

    def log_window(self, check_weights: bool = False) -> None:
        """Mean loss (over all ranks), rates and the step type's fields -> metrics.jsonl. Stops the
        run (before anything of this step is saved) on a non-finite loss, a non-finite gradient norm,
        a loss far above its running level, or (check_weights) a non-finite EMA."""
        losses, window, step = torch.stack(self.window.losses), self.window, self.step
        finite = torch.isfinite(losses)
        ema_bad = check_weights and self.is_main and not self.ema.all_finite()
        # One collective per window: the summed loss, its count, the non-finite count, rank 0's EMA check.
        stats = torch.stack([torch.where(finite, losses, 0).sum(), finite.sum().float(),
                             (~finite).sum().float(), torch.tensor(float(ema_bad))]).to(self.device)
        dist.all_reduce(stats)
        if stats[2] > 0:
            local = (~finite).nonzero()
            accum = self.cfg.deepspeed.gradient_accumulation_steps
            where = (f"step {step - window.steps + int(local[0, 0]) // accum + 1}" if len(local)
                     else f"steps {step - window.steps + 1}..{step} (on another rank)")
            raise NonFiniteLoss(f"non-finite loss at {where}; training stopped, last good checkpoint: "
                                f"{self._last_good()}")
        elapsed = time.perf_counter() - window.start
        global_batch = self.step_type.global_batch
        images_per_s = window.steps * global_batch / max(elapsed, 1e-9)
        mean_loss = float(stats[0] / stats[1])
        grad_norm = self.step_type.grad_norm()
        self.logger.log(step, {"loss": mean_loss, "lr": float(self.engine.get_lr()[0]),
                               "grad_norm": grad_norm if grad_norm is not None else float("nan"),
                               "images_per_s": images_per_s, "images_per_s_per_rank": images_per_s / self.world,
                               "epoch": step * global_batch / len(self.train_split), "time_s": time.time(),
                               "window_s": elapsed,
                               **self.step_type.log_fields()})
        self.logger.advance(0, loss=mean_loss, img_s=images_per_s)
        self._check_divergence(step, mean_loss, bool(stats[3] > 0))

    def _check_divergence(self, step: int, mean_loss: float, ema_bad: bool) -> None:
        """Same decision on every rank: every input is global (all-reduced loss, DeepSpeed's or the
        all-reduced gradients' norm, rank 0's EMA flag shared in the collective)."""
        norm, factor = self.step_type.watched_norm(), self.cfg.training.divergence_factor
        level = statistics.median(self.recent_losses) if self.recent_losses else None
        problem = None
        if norm is not None and not math.isfinite(norm):
            problem = f"non-finite gradient norm ({norm}) at step {step}"
        elif ema_bad:
            problem = f"non-finite weights at step {step}"
        elif factor is not None and level and mean_loss > factor * level:
            problem = (f"loss {mean_loss:.3g} at step {step} is {mean_loss / level:.3g}x its running level "
                       f"{level:.3g} (training.divergence_factor {factor:g})")
        if problem is not None:
            raise Diverged(f"training diverged: {problem}; stopped without saving it, last good checkpoint: "
                           f"{self._last_good()}")
        self.recent_losses = (self.recent_losses + [mean_loss])[-RUNNING_LEVEL_WINDOWS:]

    def _ema_model(self) -> ConditionalUNet:
        return self.ema.copy_to(self.eval_model)

    def write_samples(self) -> None:
        """Rank 0: a grid of the EMA model's samples (sample prompts x seeds, one panel per guidance weight)."""
        if self.is_main:
            log, panels, model = self.cfg.logging, [], self._ema_model()   # one EMA copy for every panel
            for w in self.guidance:
                images = generate(model, self.schedule, self.prompt_tokens, log.sample_seeds, guidance=w,
                                  steps=log.sample_steps, sampler=log.sample_sampler,
                                  parameterization=self.cfg.diffusion.parameterization, device=self.device)
                panels.append((f"w = {w:g}", to_uint8(images)))
            path = self.logger.sample_grid(self.step, panels, self.prompts)
            self.logger.write(f"step {self.step}: samples -> {path}")
        dist.barrier()

    def save(self) -> None:
        """Collective: the checkpoint of this step; rank 0 also exports the EMA model and the loss curve."""
        cfg, step = self.cfg, self.step
        accum = cfg.deepspeed.gradient_accumulation_steps
        state = {"micro_step": step * accum, "world_size": self.world, **self.step_type.checkpoint_state()}
        save_checkpoint(self.engine, self.ckpt_dir, step, self.ema, state, cfg.training.keep_checkpoints, self.rank)
        if self.is_main:
            export_model(self.run_dir / "export", self._ema_model(), cfg.diffusion, self.vocab,
                         metadata=self._export_metadata())
            self.logger.loss_curve(f"{self.run_dir.name} (p_uncond={cfg.conditioning.p_uncond:g})")
        dist.barrier()

    def _export_metadata(self) -> dict:
        metadata = {"step": self.step, "p_uncond": self.cfg.conditioning.p_uncond, "run": str(self.run_dir)}
        if isinstance(self.step_type, DPStep):
            privacy = self.step_type.privacy()
            metadata["privacy"] = {k: privacy[k] for k in ("epsilon", "delta", "steps", "guarantee_void",
                                                          "noise_seed", "unit")}
        return metadata

    def export_snapshot(self) -> None:
        """Rank 0: the EMA model of this step to <run>/exports/step_<N>/ (training.export_every)."""
        if self.is_main:
            out = self.run_dir / "exports" / f"step_{self.step}"
            export_model(out, self._ema_model(), self.cfg.diffusion, self.vocab, metadata=self._export_metadata())
            self.logger.write(f"step {self.step}: EMA model -> {out}")
        dist.barrier()

    def _finish(self) -> dict:
        """The summary (paths, final step; privacy spent under DP, also written to privacy.json)."""
        run_dir, ckpt_dir = self.run_dir, self.ckpt_dir
        latest = ckpt_dir / LATEST
        summary = {"run_dir": str(run_dir), "step": self.step, "export": str(run_dir / "export"),
                   "checkpoint": str(ckpt_dir / latest.read_text().strip()) if latest.is_file() else None}
        if isinstance(self.step_type, DPStep):
            privacy = summary["privacy"] = self.step_type.privacy()
            if self.is_main:
                write_json(run_dir / "privacy.json", privacy, indent=2)
                void = " -- NO GUARANTEE: the noise is reproducible from the config" if privacy["guarantee_void"] else ""
                self.say(f"privacy: (epsilon {privacy['epsilon']:.3g}, delta {self.cfg.dp.delta:g}) per record after "
                         f"{privacy['steps']} DP-SGD steps{void}; groups: "
                         f"{privacy['group_privacy']['largest_image_group']} copies of one image at most -> "
                         f"{run_dir / 'privacy.json'}")
        if self.step > self.start_step:
            self.say(f"done: step {self.step}/{self.total}. export {run_dir / 'export'}, metrics "
                     f"{run_dir / 'metrics.jsonl'}, loss curve {run_dir / 'loss_curve.png'}, samples "
                     f"{run_dir / 'samples'}")
        return summary


def train(cfg: TrainConfig, *, resume: bool = False, stop_at: int | None = None) -> dict:
    """Run (or continue) the training described by `cfg`. Returns a summary (rank 0: paths, final step)."""
    return TrainLoop(cfg, resume=resume, stop_at=stop_at).run_loop()
