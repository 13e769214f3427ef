"""One optimizer step of training, in the three ways a run can take it; `make_step` picks one at set-up.

    StandardStep   `gradient_accumulation_steps` micro-batches from data_pipeline.loaders, each
                   engine.backward of the mean loss (engine.training.diffusion_loss.micro_batch_loss)
    ScreenedStep   the same, with the samples above the screening threshold left out of the loss
                   (Wen et al.'s training-time mitigation, engine.training.screening)
    DPStep         one Poisson batch (data_pipeline.poisson) through DP-SGD's clipped, noised
                   backward (engine.training.dp_sgd), with the privacy accountant

Every step type has
    forward_backward(step) -> [loss per micro-batch]   the passes of optimizer step `step`, and the
                            engine.step() calls that go with them (DeepSpeed counts micro-batches in
                            engine.step(), so one follows every backward; it updates at the last)
    grad_norm()            the global gradient norm to log after a log step
    log_fields()           extra metrics for metrics.jsonl
    describe()             a line for the start-up log, or None
    global_batch           images per optimizer step over all ranks (expected size for DP)
"""
from __future__ import annotations

import torch

from data_pipeline.dataset import SplitData
from data_pipeline.loaders import make_loader
from data_pipeline.poisson import poisson_batches
from engine.diffusion.schedule import NoiseSchedule
from engine.training.config import TrainConfig
from engine.training.diffusion_loss import (
    MicroBatchLoss,
    diffusion_loss_fn,
    make_dp_batch,
    micro_batch_loss,
    step_seed,
)
from engine.training.dp_sgd import DPSGD
from engine.training.privacy import PrivacyAccountant
from engine.training.screening import ScreeningMonitor, screened_mean


class StandardStep:
    def __init__(self, engine, loader, schedule: NoiseSchedule, cfg: TrainConfig, *, rank: int, world: int) -> None:
        ds = cfg.deepspeed
        self.engine, self.loader, self.schedule, self.rank = engine, loader, schedule, rank
        self.seed, self.log_every = cfg.training.seed, cfg.training.log_every
        self.accum = ds.gradient_accumulation_steps
        self.global_batch = ds.train_micro_batch_size_per_gpu * self.accum * world
        self.loss_options = dict(parameterization=cfg.diffusion.parameterization,
                                 min_snr_gamma=cfg.diffusion.min_snr_gamma, p_uncond=cfg.conditioning.p_uncond,
                                 compute_dtype=torch.bfloat16 if ds.bf16.enabled else torch.float32,
                                 channels_last=cfg.training.channels_last)
        # DeepSpeed records the global gradient norm except under ZeRO 0 in fp32: there we read it
        # off the (all-reduced) gradients before the update of a step that will be logged.
        self.manual_grad_norm = ds.zero_optimization.stage == 0 and not ds.bf16.enabled
        self.last_grad_norm = float("nan")

    def forward_backward(self, step: int) -> list[torch.Tensor]:
        losses = []
        for k in range(self.accum):
            out = self.micro_batch(step * self.accum + k)
            loss = self.loss_to_minimise(out)
            if loss is None:   # nothing to learn from on any rank: no backward, no optimizer step
                losses.append(out.per_sample.mean().detach().float())
                continue
            self.engine.backward(loss)
            if k == self.accum - 1 and self.manual_grad_norm and (step + 1) % self.log_every == 0:
                self.last_grad_norm = self._global_grad_norm()
            self.engine.step()
            losses.append(loss.detach().float())
        return losses

    def micro_batch(self, micro_step: int) -> MicroBatchLoss:
        x0, tokens, _ = next(self.loader)
        return micro_batch_loss(self.engine, x0, tokens, self.schedule,
                                seed=step_seed(self.seed, micro_step, self.rank), **self.loss_options)

    def loss_to_minimise(self, out: MicroBatchLoss) -> torch.Tensor | None:
        return out.per_sample.mean()

    def _global_grad_norm(self) -> float:
        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else float("nan")

    def grad_norm(self) -> float:
        norm = self.last_grad_norm if self.manual_grad_norm else self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def log_fields(self) -> dict[str, float]:
        return {}

    def describe(self) -> str | None:
        return None


class ScreenedStep(StandardStep):
    def __init__(self, engine, loader, schedule: NoiseSchedule, cfg: TrainConfig, *, rank: int, world: int) -> None:
        super().__init__(engine, loader, schedule, cfg, rank=rank, world=world)
        self.screening = ScreeningMonitor(cfg.screening, schedule, cfg.diffusion.parameterization)

    def loss_to_minimise(self, out: MicroBatchLoss) -> torch.Tensor | None:
        keep, any_kept = self.screening.keep(self.engine.module, out.x_t, out.t, out.tokens, pred_cond=out.pred)
        if not any_kept and self.accum == 1:
            # With accumulation every micro-batch must still reach engine.step() (DeepSpeed counts
            # them), so there an all-dropped micro-batch backpropagates a zero loss instead.
            self.screening.skipped_steps += 1
            return None
        return screened_mean(out.per_sample, keep)

    def log_fields(self) -> dict[str, float]:
        return self.screening.log_fields()


class DPStep:
    def __init__(self, engine, split: SplitData, schedule: NoiseSchedule, cfg: TrainConfig, *, rank: int,
                 world: int, start_step: int, device: torch.device) -> None:
        self.engine, self.schedule, self.cfg = engine, schedule, cfg.dp
        self.seed, self.p_uncond = cfg.training.seed, cfg.conditioning.p_uncond
        self.resolved = cfg.dp.resolve(len(split.images), cfg.training.steps)
        self.global_batch = self.resolved.expected_batch_size
        self.dp = DPSGD(engine.module, self.resolved, seed=self.seed)
        self.loss_fn = diffusion_loss_fn(schedule, cfg.diffusion.parameterization, cfg.diffusion.min_snr_gamma)
        self.accountant = PrivacyAccountant(self.resolved.noise_multiplier, self.resolved.sample_rate, cfg.dp.delta,
                                            cfg.dp.accountant, steps=start_step)
        self.batches = poisson_batches(split.images, split.tokens, self.resolved.sample_rate, seed=self.seed,
                                       rank=rank, world_size=world, start_step=start_step, augment=cfg.augment,
                                       device=device)
        self.last: dict[str, float] = {}

    def forward_backward(self, step: int) -> list[torch.Tensor]:
        x0, tokens, index = next(self.batches)
        batch = make_dp_batch(x0, tokens, index, self.schedule, seed=self.seed, step=step,
                              multiplicity=self.cfg.noise_multiplicity, p_uncond=self.p_uncond)
        self.last = self.dp.backward(self.loss_fn, batch, step)
        self.accountant.step()
        self.engine.step()
        return [torch.tensor(self.last["loss"])]

    def grad_norm(self) -> float:
        return float("nan")   # not recorded: the noisy gradient's norm says little (see dp/grad_norm_mean)

    def log_fields(self) -> dict[str, float]:
        fields = {k: v for k, v in self.last.items() if k.startswith("dp/")}
        return {**fields, "dp/epsilon": self.accountant.epsilon(), "dp/delta": self.cfg.delta}

    def describe(self) -> str:
        r, c = self.resolved, self.cfg
        how = f"target epsilon {c.target_epsilon:g}" if c.target_epsilon is not None else "given"
        return (f"dp: sigma {r.noise_multiplier:.4g} ({how}), clip {c.clip_norm:g}, q {r.sample_rate:.4g} "
                f"(expected batch {r.expected_batch_size:.4g}), K {c.noise_multiplicity}, delta "
                f"{c.delta:g}, {c.accountant} accountant, norms by {self.dp.method}")

    def privacy(self) -> dict:
        """The privacy spent so far (the accountant's summary)."""
        return self.accountant.summary()


def make_step(cfg: TrainConfig, engine, split: SplitData, schedule: NoiseSchedule, *, rank: int, world: int,
              start_step: int, device: torch.device) -> StandardStep | ScreenedStep | DPStep:
    """The step type the config asks for, positioned at optimizer step `start_step`."""
    if cfg.dp is not None and cfg.dp.enabled:
        return DPStep(engine, split, schedule, cfg, rank=rank, world=world, start_step=start_step, device=device)
    accum = cfg.deepspeed.gradient_accumulation_steps
    loader = make_loader(split, cfg.deepspeed.train_micro_batch_size_per_gpu, seed=cfg.training.seed, rank=rank,
                         world_size=world, start_step=start_step * accum, augment=cfg.augment,
                         backend=cfg.training.loader, device=str(device))
    if cfg.screening is not None and cfg.screening.enabled:
        return ScreenedStep(engine, loader, schedule, cfg, rank=rank, world=world)
    return StandardStep(engine, loader, schedule, cfg, rank=rank, world=world)
