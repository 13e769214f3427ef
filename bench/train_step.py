"""memdiff's training micro-step as one callable, for the benchmarks (no DeepSpeed, no data loader).

MIRRORS engine/training/trainer.py `train()`'s micro-batch loop body (the `for k in range(accum ...)`
block) with accum = 1, no screening and no DP: step seed -> (t, CFG drop) from a CPU generator ->
kernels.noising.noised_input -> forward -> noise_prediction_loss (Min-SNR weights when configured)
-> backward -> optimizer step. DeepSpeed's engine is replaced by the plain module and a torch
optimizer; its gradient clipping, LR scheduler and the EMA update that follow the step in the
trainer are left out (on both sides of every comparison that uses this step).
The engine has no callable step function today; once the trainer exposes one, call it from here
instead of this copy.
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from engine.diffusion.schedule import NoiseSchedule, loss_weights
from kernels.noising import noise_prediction_loss, noised_input


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """MIRRORS engine.training.trainer.step_seed (the trainer module imports the DeepSpeed launcher's
    helpers, which the GPU machine does not have)."""
    state = np.random.SeedSequence([seed, micro_step, rank]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


class MemdiffTrainStep:
    """One call = one optimizer step on a fixed batch (x0 [B,1,S,S] in [-1,1], tokens [B,L]).

    `compute_dtype` bfloat16 runs the network under torch.autocast (the trainer casts x_t to the
    DeepSpeed bf16 engine's dtype instead; on CUDA both run the convolutions and matmuls in bf16).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: NoiseSchedule,
                 x0: torch.Tensor, tokens: torch.Tensor, null_tokens: torch.Tensor, *, p_uncond: float = 0.5,
                 seed: int = 0, parameterization: str = "eps", min_snr_gamma: float | None = None,
                 compute_dtype: torch.dtype = torch.float32, forward=None) -> None:
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.forward = forward if forward is not None else model
        self.x0, self.tokens, self.null = x0, tokens, null_tokens
        self.p_uncond, self.seed, self.param, self.gamma = p_uncond, seed, parameterization, min_snr_gamma
        self.compute_dtype = compute_dtype
        self.micro_step = 0
        self.last_loss: torch.Tensor | None = None

    def __call__(self, x0: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> None:
        """One step on the fixed batch, or on (x0, tokens) when given (a loader's batch)."""
        x0 = self.x0 if x0 is None else x0
        tokens = self.tokens if tokens is None else tokens
        dev, b = x0.device, x0.shape[0]
        seed = step_seed(self.seed, self.micro_step, 0)
        self.micro_step += 1
        gen = torch.Generator().manual_seed(seed)
        t = torch.randint(0, self.schedule.num_timesteps, (b,), generator=gen).to(dev)
        drop = (torch.rand(b, generator=gen) < self.p_uncond).to(dev)
        tokens = torch.where(drop[:, None], self.null[:b], tokens)
        torch.manual_seed(seed)  # dropout, if any, replays identically on resume
        sqrt_ab, sqrt_1mab = self.schedule.sqrt_ab(t), self.schedule.sqrt_1mab(t)
        x_t = noised_input(x0, sqrt_ab, sqrt_1mab, seed)
        amp = (torch.autocast(dev.type, dtype=self.compute_dtype) if self.compute_dtype != torch.float32
               else nullcontext())
        with amp:
            pred = self.forward(x_t, t, tokens)
        weights = loss_weights(t, self.schedule, self.param, self.gamma)
        loss = noise_prediction_loss(pred.float(), x0, sqrt_ab, sqrt_1mab, seed, weights, self.param).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.detach()
