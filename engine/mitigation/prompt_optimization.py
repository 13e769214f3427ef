"""Wen et al.'s inference-time mitigation: nudge the prompt embedding until it stops "pulling".

For each prompt the encoder output e_p [L, D] is optimised with AdamW (lr 0.05, at most 10
iterations) to lower L = mean over the prompt's generations of ||eps(x_T, e_p) - eps(x_T, e_null)||_2
at the FIRST sampling step only, from the seeded initial noise x_T; a prompt stops as soon as its L
is at or under the target. All steps are then sampled with the optimised embedding
(`engine.diffusion.sampling.sample(..., context=...)`).

The target is given per element (RMS: L / sqrt(C*H*W)) so that one number transfers across image
sizes. Wen's reference uses L <= 3 on Stable Diffusion's 4x64x64 latents, i.e. 3 / 128 = 0.0234 per
element; that is the default here, and `tools/mitigate optimize-embedding` reports what it reached.

`optimized_generations` runs it per batch of prompts from the scan's seeds and records the per-step
norms along the optimised trajectory exactly as the scanner records them, so the before/after audit
(`audit_optimized_embedding`) reads baseline and mitigation the same way.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.images import to_uint8
from engine.audit.audit_inputs import AuditInputs
from engine.audit.generation_audit import Comparison, Generations, audit_series, scan_generations
from engine.audit.planted_truth import prompt_groups
from engine.audit.prompt_lists import PromptList, encode_prompts
from engine.audit.wen_detector import DetectorSettings
from engine.diffusion.guidance import conditional_noise_magnitude, null_tokens_like
from engine.diffusion.sampling import sample
from engine.diffusion.schedule import NoiseSchedule
from engine.diffusion.seeds import prompt_noise, prompt_seeds

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


# ---- sampled with the optimised embedding, and audited against the baseline -----------------------------

def optimized_generations(loaded, prompt_list: PromptList, settings: DetectorSettings, *, target_rms: float,
                          manifest: dict | None = None, groups: list[str] | None = None, lr: float = 0.05,
                          max_iterations: int = 10, batch_prompts: int = 16,
                          progress: bool = True) -> tuple[Generations, list[dict]]:
    """Generations with Wen's optimised embedding, same seeds as a scan of the same list; and per-prompt stats."""
    if settings.sampler != "ddim":
        raise ValueError("optimize embedding: use the deterministic DDIM sampler (the optimisation is per seed)")
    model, schedule, cfg = loaded.model, loaded.schedule, loaded.unet_config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    device = next(model.parameters()).device
    tokens = encode_prompts(loaded.vocab, prompt_list)
    groups = groups or prompt_groups(prompt_list.prompts, manifest) or ["ordinary"] * len(prompt_list.prompts)
    g = settings.generations
    all_seeds = prompt_seeds(range(len(prompt_list.prompts)), settings.base_seed)
    norms, images, stats = [], [], []
    param = loaded.diffusion_config.parameterization
    for b0 in tqdm(range(0, len(tokens), batch_prompts), desc="optimise+sample", disable=not progress):
        tok, seeds = tokens[b0:b0 + batch_prompts].to(device), all_seeds[b0:b0 + batch_prompts]
        noise = prompt_noise(seeds, g, shape, device)                  # as engine.audit.wen_detector.detect
        opt = optimize_prompt_embedding(model, tok, noise, schedule, generations=g, target_rms=target_rms, lr=lr,
                                        max_iterations=max_iterations, parameterization=param)
        out = sample(model, tok.repeat_interleave(g, 0), noise, schedule, steps=settings.steps,
                     guidance=settings.guidance, parameterization=param, clip_x0=settings.clip_x0,
                     context=opt.rows(g))
        norms.append(out.norms_rms.T.reshape(len(tok), g, -1).numpy())
        images.append(to_uint8(out.images).reshape(len(tok), g, *shape[1:]))
        scale = float(opt.elements) ** 0.5
        for j in range(len(tok)):
            stats.append({"prompt": prompt_list.prompts[b0 + j], "loss_before_rms": float(opt.loss_before[j]) / scale,
                          "loss_after_rms": float(opt.loss_after[j]) / scale, "iterations": int(opt.iterations[j]),
                          "target_rms": target_rms, "target_raw": opt.target_raw})
    gen = Generations(list(prompt_list.prompts), list(groups), all_seeds, np.concatenate(norms), np.concatenate(images))
    return gen, stats


def audit_optimized_embedding(loaded, inputs: AuditInputs, settings: DetectorSettings, out_dir: str, *,
                              target_rms: float = WEN_TARGET_RMS, lr: float = 0.05, max_iterations: int = 10,
                              threshold: float | None = None, target_fpr: float = 0.01, batch_prompts: int = 16,
                              progress: bool = True) -> Comparison:
    """The baseline scan (out_dir/baseline, resumable) against the same prompts and seeds sampled with
    the optimised embedding, judged by one threshold."""
    encode_prompts(loaded.vocab, inputs.prompts)                     # fail fast on unknown phrases
    base = scan_generations(loaded, inputs.prompts, settings, os.path.join(out_dir, "baseline"),
                            manifest=inputs.manifest, batch_prompts=batch_prompts, progress=progress,
                            description="scan baseline")
    after, stats = optimized_generations(loaded, inputs.prompts, settings, target_rms=target_rms,
                                         manifest=inputs.manifest, lr=lr, max_iterations=max_iterations,
                                         batch_prompts=batch_prompts, progress=progress)
    audits = audit_series([base, after], inputs.real, manifest=inputs.manifest, threshold=threshold,
                          target_fpr=target_fpr, train_cache={}, **inputs.models())
    iters = [s["iterations"] for s in stats]
    reached = sum(s["loss_after_rms"] <= target_rms for s in stats)
    note = (f"target {target_rms:.4g} per element; mean AdamW iterations {sum(iters) / len(iters):.2f}; "
            f"prompts reaching the target: {reached}/{len(stats)}")
    return Comparison("Prompt-embedding optimisation", ["baseline", "optimised embedding"], audits, [base, after],
                      inputs.real, {"optimisation": stats, "target_rms": target_rms, "lr": lr,
                                    "max_iterations": max_iterations}, [note])
