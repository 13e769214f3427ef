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
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.atomic_files import write_json, write_text
from data_pipeline.dataset import prepare_dataset
from data_pipeline.images import to_uint8
from engine.diffusion.generate import generate
from engine.diffusion.schedule import NoiseSchedule
from engine.model.export import export_model
from engine.model.unet import ConditionalUNet, UNetConfig, count_parameters
from engine.training.checkpointing import latest_tag, load_checkpoint, save_checkpoint
from engine.training.cluster_env import process_group_env
from engine.training.config import TrainConfig, resolved_json
from engine.training.ema import EMA
from engine.training.run_logger import RunLogger
from engine.training.steps import DPStep, make_step
from kernels.backend import use_triton

# The sections a resumed run must share with the run it continues (others, e.g. training.steps, may change).
FIXED_ON_RESUME = ("model", "diffusion", "data", "conditioning",
                   "dp")  # dp: the accountant assumes one (sigma, q) for the whole run


class TrainingError(RuntimeError):
    """A run that cannot start or must stop; the message is one line for the user."""


class NonFiniteLoss(TrainingError):
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
        self._setup_distributed()
        tag = self._setup_run_dir(resume)
        self._setup_data()
        self._setup_engine()
        self._resume(tag, stop_at)
        self.schedule = NoiseSchedule.from_config(cfg.diffusion)
        self.step_type = make_step(cfg, self.engine, self.train_split, self.schedule, rank=self.rank,
                                   world=self.world, start_step=self.start_step, device=self.device)
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

    def _setup_run_dir(self, resume: bool) -> str | None:
        self.run_dir = Path(self.cfg.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        tag = _check_run_dir(self.cfg, self.run_dir, resume)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "config.json", resolved_json(self.cfg))
        dist.barrier()
        return tag

    def _setup_data(self) -> None:
        """Rank 0 reads / generates / caches first, the others then hit its cache."""
        if self.is_main:
            self.prepared = prepare_dataset(self.cfg.data, str(self.run_dir), progress=self.cfg.logging.progress)
        dist.barrier()
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
        self.start_step = 0
        if tag is not None:
            state = load_checkpoint(self.engine, self.ckpt_dir, tag, self.ema, self.rank)
            self.start_step = int(state["step"])
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

    # ------------------------------------------------------------------------- the loop

    def run_loop(self) -> dict:
        try:
            while self.step < self.stop:
                self.run_step()
                self._after_step()
        except NonFiniteLoss:
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

    def _after_step(self) -> None:
        step, every = self.step, self.cfg.training
        at_end = step == self.stop
        do_log = step % every.log_every == 0 or at_end
        do_ckpt = at_end or (every.checkpoint_every and step % every.checkpoint_every == 0)
        do_sample = step == self.total or (every.sample_every and step % every.sample_every == 0)
        if not (do_log or do_ckpt or do_sample):
            return
        self.log_window()
        if do_sample:
            self.write_samples()
        if do_ckpt:
            self.save()
        self.window = _Window()

    def log_window(self) -> None:
        """Mean loss (over all ranks), rates and the step type's fields -> metrics.jsonl; stops on a
        non-finite loss."""
        losses, window, step = torch.stack(self.window.losses), self.window, self.step
        finite = torch.isfinite(losses)
        # One collective per window: the summed loss, its count and the non-finite count.
        stats = torch.stack([torch.where(finite, losses, 0).sum(), finite.sum().float(),
                             (~finite).sum().float()]).to(self.device)
        dist.all_reduce(stats)
        if stats[2] > 0:
            local = (~finite).nonzero()
            accum = self.cfg.deepspeed.gradient_accumulation_steps
            where = (f"step {step - window.steps + int(local[0, 0]) // accum + 1}" if len(local)
                     else f"steps {step - window.steps + 1}..{step} (on another rank)")
            raise NonFiniteLoss(f"non-finite loss at {where}; training stopped, last good checkpoint: "
                                f"{self.ckpt_dir / (latest_tag(self.ckpt_dir) or 'none')}")
        elapsed = time.perf_counter() - window.start
        global_batch = self.step_type.global_batch
        images_per_s = window.steps * global_batch / max(elapsed, 1e-9)
        mean_loss = float(stats[0] / stats[1])
        self.logger.log(step, {"loss": mean_loss, "lr": float(self.engine.get_lr()[0]),
                               "grad_norm": self.step_type.grad_norm(), "images_per_s": images_per_s,
                               "images_per_s_per_rank": images_per_s / self.world,
                               "epoch": step * global_batch / len(self.train_split), "time_s": time.time(),
                               **self.step_type.log_fields()})
        self.logger.advance(0, loss=mean_loss, img_s=images_per_s)

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
        state = {"micro_step": step * accum, "world_size": self.world}
        save_checkpoint(self.engine, self.ckpt_dir, step, self.ema, state, cfg.training.keep_checkpoints, self.rank)
        if self.is_main:
            export_model(self.run_dir / "export", self._ema_model(), cfg.diffusion, self.vocab,
                         metadata={"step": step, "p_uncond": cfg.conditioning.p_uncond, "run": str(self.run_dir)})
            self.logger.loss_curve(f"{self.run_dir.name} (p_uncond={cfg.conditioning.p_uncond:g})")
        dist.barrier()

    def _finish(self) -> dict:
        """The summary (paths, final step; privacy spent under DP, also written to privacy.json)."""
        run_dir, ckpt_dir = self.run_dir, self.ckpt_dir
        summary = {"run_dir": str(run_dir), "step": self.step, "export": str(run_dir / "export"),
                   "checkpoint": str(ckpt_dir / (latest_tag(ckpt_dir) or "")) if ckpt_dir.is_dir() else None}
        if isinstance(self.step_type, DPStep):
            privacy = summary["privacy"] = self.step_type.privacy()
            if self.is_main:
                write_json(run_dir / "privacy.json", privacy, indent=2)
                self.say(f"privacy: (epsilon {privacy['epsilon']:.3g}, delta {self.cfg.dp.delta:g}) after "
                         f"{privacy['steps']} DP-SGD steps -> {run_dir / 'privacy.json'}")
        if self.step > self.start_step:
            self.say(f"done: step {self.step}/{self.total}. export {run_dir / 'export'}, metrics "
                     f"{run_dir / 'metrics.jsonl'}, loss curve {run_dir / 'loss_curve.png'}, samples "
                     f"{run_dir / 'samples'}")
        return summary


def train(cfg: TrainConfig, *, resume: bool = False, stop_at: int | None = None) -> dict:
    """Run (or continue) the training described by `cfg`. Returns a summary (rank 0: paths, final step)."""
    return TrainLoop(cfg, resume=resume, stop_at=stop_at).run_loop()
