"""The training loss of the conditional diffusion model, for both kinds of optimizer step.

Per example: t ~ U[0, T), eps ~ N(0, I), the prompt replaced by the null prompt with probability
p_uncond (classifier-free guidance training), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and

    loss = w(t) * mean over C*H*W of (model(x_t, t, prompt) - target)^2,   target = eps or v,

with w the Min-SNR weights (`engine.diffusion.schedule.loss_weights`; 1 when off). The prompt drop
(`drop_prompts`) and the weights are shared; the two steps differ in where the randomness comes
from and who computes the squared error, each for a reason:

  * `micro_batch_loss` (the standard and screened steps): one seed per (micro step, rank)
    (`step_seed`) draws t and the drop, and eps is drawn *inside* the fused noising/loss kernels
    (kernels.noising, Philox keyed by that seed), so eps never touches memory.
  * `make_dp_batch` + `diffusion_loss_fn` (DP-SGD): t, eps and the drop are drawn per example from
    (seed, step, example index), so sharding a Poisson batch over ranks does not change them, and
    the loss is plain autograd, which per-sample gradients (norm hooks, torch.func) differentiate.
    K > 1 noise draws per example are averaged into that example's loss.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from data_pipeline.keyed_random import keyed_seed
from engine.diffusion.guidance import null_tokens_like
from engine.diffusion.schedule import NoiseSchedule, loss_weights, per_sample_loss, q_sample, target_for
from kernels.noising import noise_prediction_loss, noised_input

DRAWS_TAG = 0xD1F   # keyed_random purpose tag of the per-example draws
Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def drop_prompts(tokens: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """The null prompt where `drop` [B] is true (classifier-free guidance training), else the prompt."""
    return torch.where(drop[:, None], null_tokens_like(tokens), tokens)


# ----------------------------------------------------------------------------- standard step

def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """A 63-bit seed for one micro-batch of one rank (t, CFG drop, dropout and the kernels' noise)."""
    state = np.random.SeedSequence([seed, micro_step, rank]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


class MicroBatchLoss(NamedTuple):
    per_sample: torch.Tensor   # [B] the loss of each sample (with grad)
    x_t: torch.Tensor          # the network input, t and the prompts it saw (screening reuses them)
    t: torch.Tensor
    tokens: torch.Tensor
    pred: torch.Tensor         # the network's output


def micro_batch_loss(model: nn.Module, x0: torch.Tensor, tokens: torch.Tensor, schedule: NoiseSchedule, *,
                     seed: int, parameterization: str, min_snr_gamma: float | None, p_uncond: float,
                     compute_dtype: torch.dtype = torch.float32, channels_last: bool = False) -> MicroBatchLoss:
    """The loss of one micro-batch, every random draw a function of `seed` (see `step_seed`)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=gen).to(x0.device)
    drop = (torch.rand(x0.shape[0], generator=gen) < p_uncond).to(x0.device)
    tokens = drop_prompts(tokens, drop)
    torch.manual_seed(seed)  # dropout, if any, replays identically on resume
    sqrt_ab, sqrt_1mab = schedule.sqrt_ab(t), schedule.sqrt_1mab(t)
    x_t = noised_input(x0, sqrt_ab, sqrt_1mab, seed).to(compute_dtype)
    if channels_last:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    pred = model(x_t, t, tokens)
    weights = loss_weights(t, schedule, parameterization, min_snr_gamma)
    per_sample = noise_prediction_loss(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization)
    return MicroBatchLoss(per_sample, x_t, t, tokens, pred)


# ----------------------------------------------------------------------------- DP-SGD step

def diffusion_inputs(index: torch.Tensor, image_shape: tuple[int, ...], num_timesteps: int, *, seed: int,
                     step: int, multiplicity: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t [b, K] int64, noise [b, K, *image_shape], u [b] uniform for the CFG drop) from
    (seed, step, example index): the same whichever rank or batch position the example lands on."""
    ts, noises, us = [], [], []
    for i in index.tolist():
        g = torch.Generator().manual_seed(keyed_seed(seed, step, i, DRAWS_TAG))
        us.append(torch.rand((), generator=g))
        ts.append(torch.randint(0, num_timesteps, (multiplicity,), generator=g))
        noises.append(torch.randn((multiplicity, *image_shape), generator=g))
    if not ts:
        return (torch.zeros(0, multiplicity, dtype=torch.long), torch.zeros(0, multiplicity, *image_shape),
                torch.zeros(0))
    return torch.stack(ts), torch.stack(noises), torch.stack(us)


def make_dp_batch(x0: torch.Tensor, tokens: torch.Tensor, index: torch.Tensor, schedule: NoiseSchedule, *,
                  seed: int, step: int, multiplicity: int = 1, p_uncond: float = 0.0) -> Batch:
    """The inputs of `diffusion_loss_fn` for this rank's examples (prompt drop decided per example)."""
    t, noise, u = diffusion_inputs(index, tuple(x0.shape[1:]), schedule.num_timesteps, seed=seed, step=step,
                                   multiplicity=multiplicity)
    if p_uncond > 0 and len(u):
        tokens = drop_prompts(tokens, (u < p_uncond).to(tokens.device))
    return {"x0": x0, "tokens": tokens, "t": t.to(x0.device), "noise": noise.to(x0.device, x0.dtype)}


def diffusion_loss_fn(schedule: NoiseSchedule, parameterization: str = "eps",
                      min_snr_gamma: float | None = None) -> LossFn:
    """loss_fn(model, batch) -> [b]: the training loss of each example, averaged over its K draws."""
    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        b, k = batch["t"].shape
        x0 = batch["x0"].repeat_interleave(k, dim=0)
        tokens = batch["tokens"].repeat_interleave(k, dim=0)
        t, noise = batch["t"].reshape(-1), batch["noise"].flatten(0, 1)
        x_t = q_sample(x0, t, noise, schedule)
        pred = model(x_t, t, tokens)
        target = target_for(x0, noise, t, schedule, parameterization)
        weights = loss_weights(t, schedule, parameterization, min_snr_gamma)
        return per_sample_loss(pred, target, weights).reshape(b, k).mean(dim=1)
    return loss_fn
