"""The peers of memdiff's DP-SGD step: Opacus on the same U-Net, loss, batch and optimizer.

Each variant is one optimizer step of DP-SGD (per-sample gradient norms, clip to C, sum, Gaussian
noise N(0, sigma^2 C^2), divide by the expected batch size, AdamW) on a batch of B examples:

  opacus_hooks      GradSampleModule + DPOptimizer: per-sample gradients of every parameter from
                    forward/backward hooks, then clip and sum (Opacus' default, `grad_sample_mode="hooks"`)
  opacus_ghost      GradSampleModuleFastGradientClipping + DPOptimizerFastGradientClipping +
                    DPLossFastGradientClipping: ghost clipping (norms from activations and output
                    gradients, then a second, re-weighted backward)
  opacus_functorch  GradSampleModule(force_functorch=True): per-sample gradients by torch.func per layer

A user of Opacus writes the diffusion loss themselves: t, eps and the CFG drop from one generator,
x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, per-sample MSE against eps. memdiff's own step
(engine.training.diffusion_loss.make_dp_batch, engine.training.dp_sgd.DPSGD.backward, optimizer step) is built in bench/peers.py.
"""
from __future__ import annotations

import torch
from torch import nn

from data_pipeline.vocab import NULL_ID, PAD_ID
from engine.diffusion.schedule import NoiseSchedule


class PerSampleMSE(nn.Module):
    """MSE over C*H*W per sample ('none') or its batch mean ('mean'): Opacus' criteria carry `reduction`."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = (pred.float() - target.float()).square().flatten(1).mean(dim=1)
        return per_sample if self.reduction == "none" else per_sample.mean()


def _inputs(x0: torch.Tensor, tokens: torch.Tensor, schedule: NoiseSchedule, gen: torch.Generator, p_uncond: float):
    """x_t, t, tokens (CFG-dropped) and eps for one step, the way an Opacus user writes them."""
    b, dev = x0.shape[0], x0.device
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=gen, device=dev)
    eps = torch.randn(x0.shape, generator=gen, device=dev)
    drop = torch.rand(b, generator=gen, device=dev) < p_uncond
    null = torch.full_like(tokens, PAD_ID)
    null[:, 0] = NULL_ID
    tokens = torch.where(drop[:, None], null, tokens)
    ab = schedule.alphas_cumprod.to(dev)[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    return x_t, t, tokens, eps


def opacus_step(model: nn.Module, variant: str, x0: torch.Tensor, tokens: torch.Tensor, schedule: NoiseSchedule, *,
                noise_multiplier: float, clip_norm: float, lr: float, p_uncond: float, seed: int = 0):
    """A callable running one Opacus DP-SGD step per call for `variant` (see the module docstring)."""
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping  # noqa: PLC0415
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping  # noqa: PLC0415
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping  # noqa: PLC0415

    # Opacus' embedding norm rule views its indices flat: memdiff's position ids are an expanded
    # (stride-0) view, so hand that layer a contiguous copy (what a user would have to add).
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.register_forward_pre_hook(lambda m, inputs: (inputs[0].contiguous(),))
    b = x0.shape[0]
    gen = torch.Generator(device=x0.device).manual_seed(seed)
    noise_gen = torch.Generator(device=x0.device).manual_seed(seed + 1)
    base = torch.optim.AdamW(model.parameters(), lr=lr)
    dp_kwargs = dict(noise_multiplier=noise_multiplier, max_grad_norm=clip_norm, expected_batch_size=b,
                     loss_reduction="mean", generator=noise_gen)
    if variant == "opacus_ghost":
        gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=clip_norm, use_ghost_clipping=True,
                                                   loss_reduction="mean")
        opt = DPOptimizerFastGradientClipping(base, **dp_kwargs)
        criterion = DPLossFastGradientClipping(gsm, opt, PerSampleMSE("mean"), loss_reduction="mean")

        def step() -> None:
            x_t, t, tok, eps = _inputs(x0, tokens, schedule, gen, p_uncond)
            loss = criterion(gsm(x_t, t, tok), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    if variant not in ("opacus_hooks", "opacus_functorch"):
        raise ValueError(f"opacus variant {variant!r}")
    gsm = GradSampleModule(model, loss_reduction="mean", force_functorch=variant == "opacus_functorch")
    opt = DPOptimizer(base, **dp_kwargs)
    criterion = PerSampleMSE("mean")

    def step() -> None:
        x_t, t, tok, eps = _inputs(x0, tokens, schedule, gen, p_uncond)
        loss = criterion(gsm(x_t, t, tok), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step
