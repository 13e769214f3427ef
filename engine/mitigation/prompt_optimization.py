"""Wen et al.'s inference-time mitigation: nudge the prompt embedding until it stops "pulling".

For each prompt the encoder output e_p [L, D] is optimised with AdamW (lr 0.05, at most 10
iterations) to lower L = mean over the prompt's generations of ||eps(x_T, e_p) - eps(x_T, e_null)||_2
at the FIRST sampling step only, from the seeded initial noise x_T; a prompt stops as soon as its L
is at or under the target. All steps are then sampled with the optimised embedding
(`engine.diffusion.sampling.sample(..., context=...)`).

The target is given per element (RMS: L / sqrt(C*H*W)) so that one number transfers across image
sizes. Wen's reference uses L <= 3 on Stable Diffusion's 4x64x64 latents, i.e. 3 / 128 = 0.0234 per
element; that is the default here, and `tools/mitigate optimize-embedding` reports what it reached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.diffusion.guidance import conditional_noise_magnitude, null_tokens_like
from engine.diffusion.schedule import NoiseSchedule

WEN_TARGET_RMS = 3.0 / math.sqrt(4 * 64 * 64)


@dataclass
class OptimizedEmbedding:
    context: torch.Tensor        # [P, L, D] optimised encoder output (detached)
    mask: torch.Tensor           # [P, L] the prompt's own mask (unchanged)
    loss_before: torch.Tensor    # [P] L (raw) at the first step with the original embedding
    loss_after: torch.Tensor     # [P] L (raw) with the returned embedding
    iterations: torch.Tensor     # [P] AdamW steps taken (0 if already under target)
    target_raw: float
    target_rms: float
    elements: int                # C*H*W, the divisor between raw and RMS

    def rows(self, generations: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, mask) repeated for prompt-major generation rows, ready for sample(context=...)."""
        return (self.context.repeat_interleave(generations, 0), self.mask.repeat_interleave(generations, 0))


def optimize_prompt_embedding(model, tokens: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule, *,
                              generations: int = 1, target_rms: float = WEN_TARGET_RMS, lr: float = 0.05,
                              max_iterations: int = 10, parameterization: str = "eps") -> OptimizedEmbedding:
    """Optimise the context of `tokens` [P, L] against `noise` [P*G, C, H, W] (prompt-major rows)."""
    n_prompts = tokens.shape[0]
    if noise.shape[0] != n_prompts * generations:
        raise ValueError(f"optimize embedding: noise has {noise.shape[0]} rows, expected {n_prompts} x {generations}")
    if not 0 <= max_iterations <= 10_000 or lr <= 0 or target_rms < 0:
        raise ValueError("optimize embedding: need max_iterations >= 0, lr > 0, target_rms >= 0")
    elements = noise[0].numel()
    target_raw = target_rms * math.sqrt(elements)
    t_first = schedule.num_timesteps - 1            # the first step of every timestep_sequence
    with torch.no_grad():
        context, mask = model.encode(tokens.to(noise.device))
        null_context, null_mask = model.encode(null_tokens_like(tokens.to(noise.device)))
    rows = lambda v: v.repeat_interleave(generations, 0)  # noqa: E731
    null_rows, null_mask_rows, mask_rows = rows(null_context), rows(null_mask), rows(mask)
    # One parameter per prompt: a prompt that reached its target gets grad None and AdamW leaves it
    # alone (no momentum drift, no weight decay), while the others keep going in the same batch.
    params = [torch.nn.Parameter(c.detach().clone()) for c in context]
    opt = torch.optim.AdamW(params, lr=lr)
    active = torch.ones(n_prompts, dtype=torch.bool)
    iterations = torch.zeros(n_prompts, dtype=torch.long)
    before = None

    def losses() -> torch.Tensor:
        ctx = rows(torch.stack(list(params)))
        norm, _, _ = conditional_noise_magnitude(model, noise, t_first, (ctx, mask_rows), (null_rows, null_mask_rows),
                                                 schedule, parameterization)
        return norm.reshape(n_prompts, generations).mean(1)

    for _ in range(max_iterations + 1):
        with torch.enable_grad():
            loss = losses()
        if before is None:
            before = loss.detach().clone()
        active &= (loss.detach() > target_raw).cpu()
        if not active.any() or int(iterations.max()) >= max_iterations:
            break
        # Gradients for the embeddings only (autograd.grad leaves the model's .grad untouched).
        live = [p for p, a in zip(params, active.tolist()) if a]
        grads = torch.autograd.grad(loss[active.to(loss.device)].sum(), live)
        for p in params:
            p.grad = None
        for p, g in zip(live, grads):
            p.grad = g
        opt.step()
        iterations += active.long()
    after = loss.detach()
    return OptimizedEmbedding(context=torch.stack([p.detach() for p in params]), mask=mask, loss_before=before.cpu(),
                              loss_after=after.cpu(), iterations=iterations, target_raw=target_raw,
                              target_rms=target_rms, elements=elements)
