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
    grad_norm()            the global gradient norm to log after a log step (None: not recorded)
    watched_norm()         the norm whose non-finite value means the run diverged (None: not recorded)
    log_fields()           extra metrics for metrics.jsonl
    checkpoint_state()     what a checkpoint must keep for an exact resume (the DP accountant)
    describe()             a line for the start-up log, or None
    global_batch           images per optimizer step over all ranks (expected size for DP)
"""
from __future__ import annotations

from typing import Callable

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
from engine.training.privacy import PrivacyAccountant, group_privacy
from engine.training.screening import ScreeningMonitor, screened_mean


class StandardStep:
    def __init__(self, engine, loader, schedule: NoiseSchedule, cfg: TrainConfig, *, rank: int, world: int,
                 logged: Callable[[int], bool]) -> None:
        """`logged(n)`: whether the trainer logs (and checks) after n optimizer steps."""
        ds = cfg.deepspeed
        self.engine, self.loader, self.schedule, self.rank = engine, loader, schedule, rank
        self.seed, self.logged = cfg.training.seed, logged
        self.accum = ds.gradient_accumulation_steps
        self.global_batch = ds.train_micro_batch_size_per_gpu * self.accum * world
        self.loss_options = dict(parameterization=cfg.diffusion.parameterization,
                                 min_snr_gamma=cfg.diffusion.min_snr_gamma, p_uncond=cfg.conditioning.p_uncond,
                                 compute_dtype=torch.bfloat16 if ds.bf16.enabled else torch.float32,
                                 channels_last=cfg.training.channels_last)
        # DeepSpeed records the global gradient norm except under ZeRO 0 in fp32: there we read it
        # off the (all-reduced) gradients before the update of a step that will be logged.
        self.manual_grad_norm = ds.zero_optimization.stage == 0 and not ds.bf16.enabled
        self.last_grad_norm: float | None = None

    def forward_backward(self, step: int) -> list[torch.Tensor]:
        losses = []
        for k in range(self.accum):
            out = self.micro_batch(step * self.accum + k)
            loss = self.loss_to_minimise(out)
            if loss is None:   # nothing to learn from on any rank: no backward, no optimizer step
                losses.append(out.per_sample.mean().detach().float())
                continue
            self.engine.backward(loss)
            if k == self.accum - 1 and self.manual_grad_norm and self.logged(step + 1):
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

    def grad_norm(self) -> float | None:
        norm = self.last_grad_norm if self.manual_grad_norm else self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def watched_norm(self) -> float | None:
        return self.grad_norm()

    def log_fields(self) -> dict[str, float]:
        return {}

    def checkpoint_state(self) -> dict:
        return {}

    def describe(self) -> str | None:
        return None


class ScreenedStep(StandardStep):
    def __init__(self, engine, loader, schedule: NoiseSchedule, cfg: TrainConfig, *, rank: int, world: int,
                 logged: Callable[[int], bool]) -> None:
        super().__init__(engine, loader, schedule, cfg, rank=rank, world=world, logged=logged)
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
                 world: int, start_step: int, device: torch.device, saved_privacy: dict | None = None,
                 planted_manifest: dict | None = None) -> None:
        """`saved_privacy`: the accountant state of the checkpoint this run resumes (required then):
        its sigma, q and history continue; sigma is never re-solved from the current training.steps."""
        self.engine, self.schedule, self.cfg = engine, schedule, cfg.dp
        self.seed, self.p_uncond = cfg.training.seed, cfg.conditioning.p_uncond
        self.split, self.planted_manifest = split, planted_manifest
        if start_step > 0:
            if saved_privacy is None:
                raise ValueError("dp: the checkpoint holds no privacy accountant state, so the privacy spent "
                                 "before it is unknown; this run cannot be continued under DP")
            self.accountant = PrivacyAccountant.from_state(saved_privacy)
            self.resolved = cfg.dp.resolve(len(split.images), cfg.training.steps,
                                           noise_multiplier=self.accountant.noise_multiplier)
            if (abs(self.resolved.sample_rate - self.accountant.sample_rate) > 1e-12 * self.resolved.sample_rate
                    or self.accountant.steps != start_step or self.accountant.delta != cfg.dp.delta
                    or self.accountant.accountant != cfg.dp.accountant):
                raise ValueError(f"dp: the checkpoint's accountant (q {self.accountant.sample_rate:.6g}, "
                                 f"{self.accountant.steps} steps) does not match this run (q "
                                 f"{self.resolved.sample_rate:.6g}, step {start_step})")
        else:
            self.resolved = cfg.dp.resolve(len(split.images), cfg.training.steps)
            self.accountant = PrivacyAccountant(self.resolved.noise_multiplier, self.resolved.sample_rate,
                                                cfg.dp.delta, cfg.dp.accountant)
        self.global_batch = self.resolved.expected_batch_size
        self.dp = DPSGD(engine.module, self.resolved, seed=self.seed)
        self.loss_fn = diffusion_loss_fn(schedule, cfg.diffusion.parameterization, cfg.diffusion.min_snr_gamma)
        self.batches = poisson_batches(split.images, split.tokens, self.resolved.sample_rate, seed=self.seed,
                                       rank=rank, world_size=world, start_step=start_step, augment=cfg.augment,
                                       device=device)
        self.resumed = start_step > 0
        self.last: dict[str, float] = {}

    def forward_backward(self, step: int) -> list[torch.Tensor]:
        x0, tokens, index = next(self.batches)
        batch = make_dp_batch(x0, tokens, index, self.schedule, seed=self.seed, step=step,
                              multiplicity=self.cfg.noise_multiplicity, p_uncond=self.p_uncond)
        self.last = self.dp.backward(self.loss_fn, batch, step)
        self.accountant.step()
        self.engine.step()
        return [torch.tensor(self.last["loss"])]

    def grad_norm(self) -> float | None:
        return None   # not recorded: the noisy gradient's norm says little (see dp/grad_norm_mean)

    def watched_norm(self) -> float | None:
        return self.last.get("dp/grad_norm_mean")   # per-sample norms before clipping

    @property
    def guarantee_void(self) -> bool:
        return self.cfg.reproducible_noise_voids_guarantee

    def log_fields(self) -> dict[str, float]:
        fields = {k: v for k, v in self.last.items() if k.startswith("dp/")}
        return {**fields, "dp/epsilon": self.accountant.epsilon(), "dp/delta": self.cfg.delta,
                "dp/guarantee_void": self.guarantee_void}

    def checkpoint_state(self) -> dict:
        return {"privacy": self.accountant.state_dict()}

    def describe(self) -> str:
        r, c = self.resolved, self.cfg
        how = ("kept from the checkpoint" if self.resumed else
               f"solved for target epsilon {c.target_epsilon:g} over {r.planned_steps} steps"
               if c.target_epsilon is not None else "given")
        noise = ("REPRODUCIBLE from training.seed: NO privacy guarantee (dp.reproducible_noise_voids_guarantee)"
                 if self.guarantee_void else "noise keyed by a secret from the OS")
        return (f"dp: sigma {r.noise_multiplier:.4g} ({how}), clip {c.clip_norm:g}, q {r.sample_rate:.4g} "
                f"(expected batch {r.expected_batch_size:.4g}), K {c.noise_multiplicity}, delta "
                f"{c.delta:g}, {c.accountant} accountant, norms by {self.dp.method}; {noise}")

    def privacy(self) -> dict:
        """The privacy spent so far (the accountant's summary), what it covers, and the group guarantee."""
        summary = self.accountant.summary()
        noise = ("reproducible from training.seed (dp.reproducible_noise_voids_guarantee: true): anyone with "
                 "config.json can recompute the noise, so (epsilon, delta) does NOT hold"
                 if self.guarantee_void else "keyed by a secret drawn from the operating system, never written")
        return {**summary, "guarantee_void": self.guarantee_void, "noise_seed": noise,
                "unit": "one record: one row of the train split (an image with its prompt)",
                "group_privacy": group_privacy(summary["epsilon"], summary["delta"],
                                               [r.image_path for r in self.split.records],
                                               [r.patient_id for r in self.split.records], self.planted_manifest)}


def make_step(cfg: TrainConfig, engine, split: SplitData, schedule: NoiseSchedule, *, rank: int, world: int,
              start_step: int, device: torch.device, logged: Callable[[int], bool],
              resume_state: dict | None = None, planted_manifest: dict | None = None
              ) -> StandardStep | ScreenedStep | DPStep:
    """The step type the config asks for, positioned at optimizer step `start_step` (`resume_state`:
    the trainer state of the checkpoint it resumes from)."""
    if cfg.dp is not None and cfg.dp.enabled:
        return DPStep(engine, split, schedule, cfg, rank=rank, world=world, start_step=start_step, device=device,
                      saved_privacy=(resume_state or {}).get("privacy"), planted_manifest=planted_manifest)
    accum = cfg.deepspeed.gradient_accumulation_steps
    loader = make_loader(split, cfg.deepspeed.train_micro_batch_size_per_gpu, seed=cfg.training.seed, rank=rank,
                         world_size=world, start_step=start_step * accum, augment=cfg.augment,
                         backend=cfg.training.loader, device=str(device))
    if cfg.screening is not None and cfg.screening.enabled:
        return ScreenedStep(engine, loader, schedule, cfg, rank=rank, world=world, logged=logged)
    return StandardStep(engine, loader, schedule, cfg, rank=rank, world=world, logged=logged)
