"""memdiff's training micro-step as one callable, for the benchmarks (no DeepSpeed, no data loader).

The loss is the trainer's own (`engine.training.diffusion_loss.micro_batch_loss`: step seed ->
(t, CFG drop) -> fused noising -> forward -> fused loss); DeepSpeed's engine is replaced by the plain
module and a torch optimizer. Its gradient clipping, LR scheduler and the EMA update that follow
the step in the trainer are left out (on both sides of every comparison that uses this step).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from engine.diffusion.schedule import NoiseSchedule
from engine.training.diffusion_loss import micro_batch_loss, step_seed


class MemdiffTrainStep:
    """One call = one optimizer step on a fixed batch (x0 [B,1,S,S] in [-1,1], tokens [B,L]).

    `compute_dtype` bfloat16 runs the network under torch.autocast (the trainer casts x_t to the
    DeepSpeed bf16 engine's dtype instead; on CUDA both run the convolutions and matmuls in bf16).
    `channels_last` is the trainer's `training.channels_last`: the model converted here, x_t by the loss.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: NoiseSchedule,
                 x0: torch.Tensor, tokens: torch.Tensor, null_tokens: torch.Tensor, *, p_uncond: float = 0.5,
                 seed: int = 0, parameterization: str = "eps", min_snr_gamma: float | None = None,
                 compute_dtype: torch.dtype = torch.float32, forward=None, channels_last: bool = False) -> None:
        if channels_last:
            model = model.to(memory_format=torch.channels_last)   # in place, as the trainer does
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.channels_last = channels_last
        self.forward = forward if forward is not None else model
        self.x0, self.tokens = x0, tokens   # null_tokens: kept for callers; the loss draws its own null prompt
        self.p_uncond, self.seed, self.param, self.gamma = p_uncond, seed, parameterization, min_snr_gamma
        self.compute_dtype = compute_dtype
        self.micro_step = 0
        self.last_loss: torch.Tensor | None = None

    def _network(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        amp = (torch.autocast(x_t.device.type, dtype=self.compute_dtype) if self.compute_dtype != torch.float32
               else nullcontext())
        with amp:
            return self.forward(x_t, t, tokens).float()

    def __call__(self, x0: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> None:
        """One step on the fixed batch, or on (x0, tokens) when given (a loader's batch)."""
        x0 = self.x0 if x0 is None else x0
        tokens = self.tokens if tokens is None else tokens
        seed = step_seed(self.seed, self.micro_step, 0)
        self.micro_step += 1
        out = micro_batch_loss(self._network, x0, tokens, self.schedule, seed=seed, parameterization=self.param,
                               min_snr_gamma=self.gamma, p_uncond=self.p_uncond, channels_last=self.channels_last)
        loss = out.per_sample.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.detach()
