"""Which prompt tokens trigger memorization: Wen et al.'s token significance (methods.md §1).

    SS_i = (1/T) * sum_t || d L_t / d e_i ||^2,   L_t = || eps(x_t, e_p) - eps(x_t, e_null) ||_2

e_i is the prompt encoder's output at token position i (a row of `model.encode(tokens)[0]`), and
x_t runs along the ordinary guided trajectory, x_{t-1} from eps_u + w * (eps_c - eps_u) with the
network called on the stacked batch [cond; uncond] (cond first, as engine.diffusion.sampling does). Wen's
reference code stacks the two slots the other way round and so walks the trajectory of
eps_c + w * (eps_u - eps_c); tests/test_mitigation_inference.py checks that we do not.

Every row of the batch is one (prompt, generation) pair. No layer of the U-Net mixes rows
(GroupNorm/LayerNorm and attention are per sample), so the gradient of sum_b L_b with respect to
the stacked context gives every row its own gradient in one backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from data_pipeline.vocab import NULL_ID, PAD_ID, Vocabulary
from engine.audit.prompt_lists import PromptList, encode_prompts
from engine.diffusion.finite import model_source, require_finite
from engine.diffusion.guidance import conditional_noise_magnitude, null_tokens_like
from engine.diffusion.sampling import step_coefficients, timestep_sequence
from engine.diffusion.schedule import NoiseSchedule
from engine.diffusion.seeds import prompt_noise, prompt_seeds
from engine.model.null_condition import require_null_condition
from kernels.guided_step import guided_step


@dataclass
class SignificanceResult:
    scores: torch.Tensor          # [P, L] SS per token position, mean over generations (0 at padding)
    scores_per_generation: torch.Tensor  # [P, G, L]
    norms_raw: torch.Tensor       # [S, P, G] L_t along the trajectory (Wen's conditional-noise norm)
    timesteps: torch.Tensor       # [S]
    tokens: torch.Tensor          # [P, L]
    trajectory: torch.Tensor | None = None  # [S, P*G, C, H, W] x_t at each step, if asked for
    images: torch.Tensor | None = None      # [P*G, C, H, W] the final samples

    def ranked_positions(self, prompt: int) -> list[int]:
        """Positions of the prompt's real tokens (not PAD/NULL), most significant first."""
        ids = self.tokens[prompt]
        real = [i for i in range(ids.numel()) if int(ids[i]) not in (PAD_ID, NULL_ID)]
        return sorted(real, key=lambda i: -float(self.scores[prompt, i]))


def token_significance(model, tokens: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule, *,
                       generations: int = 1, steps: int = 50, guidance: float = 7.5,
                       parameterization: str = "eps", clip_x0: bool = True, batch_size: int = 16,
                       keep_trajectory: bool = False, progress: bool = False) -> SignificanceResult:
    """Token significance of `tokens` [P, L] with `noise` [P*G, C, H, W] (prompt-major: row p*G + g).

    Runs in the dtype of `noise` (float64 for exactness tests), along the deterministic DDIM
    trajectory (eta = 0): significance is defined on one trajectory per seed.
    """
    n_prompts, max_len = tokens.shape
    if noise.shape[0] != n_prompts * generations:
        raise ValueError(f"token_significance: noise has {noise.shape[0]} rows, expected prompts x generations = "
                         f"{n_prompts} x {generations}")
    device = noise.device
    rows_tokens = tokens.to(device).repeat_interleave(generations, dim=0)
    timesteps = timestep_sequence(schedule, steps)
    n_rows = rows_tokens.shape[0]
    ss = torch.zeros(n_rows, max_len, dtype=torch.float64)
    norms = torch.zeros(len(timesteps), n_rows, dtype=torch.float64)
    traj = [] if keep_trajectory else None
    finals = []
    chunks = list(range(0, n_rows, batch_size))
    bar = tqdm(total=len(chunks) * len(timesteps), desc="token significance", disable=not progress)
    for r0 in chunks:
        tok = rows_tokens[r0:r0 + batch_size]
        with torch.no_grad():
            context, mask = model.encode(tok)
            null_context, null_mask = model.encode(null_tokens_like(tok))
        context = context.to(noise.dtype).detach()
        null_context = null_context.to(noise.dtype)
        x = noise[r0:r0 + batch_size].clone()
        chunk_traj = []
        for i, t in enumerate(timesteps.tolist()):
            t_prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
            coefs = step_coefficients(schedule, t, t_prev, 0.0)
            if keep_trajectory:
                chunk_traj.append(x.detach().cpu())
            e = context.clone().requires_grad_(True)
            with torch.enable_grad():
                norm, _, pred = conditional_noise_magnitude(model, x, t, (e, mask), (null_context, null_mask),
                                                            schedule, parameterization)
                (grad,) = torch.autograd.grad(norm.sum(), e)
            ss[r0:r0 + len(tok)] += grad.detach().double().pow(2).sum(-1).cpu()
            norms[i, r0:r0 + len(tok)] = norm.detach().double().cpu()
            # The guided step from the [cond; uncond] prediction, exactly as engine.diffusion.sampling.sample.
            x, _, _ = guided_step(pred.detach().to(x.dtype), x, None, guidance=guidance, clip_x0=clip_x0, **coefs)
            bar.update(1)
        finals.append(x.detach().clamp(-1, 1).cpu())
        if keep_trajectory:
            traj.append(torch.stack(chunk_traj))
    bar.close()
    ss /= len(timesteps)
    per_gen = ss.reshape(n_prompts, generations, max_len)
    return SignificanceResult(
        scores=per_gen.mean(1), scores_per_generation=per_gen,
        norms_raw=norms.reshape(len(timesteps), n_prompts, generations), timesteps=timesteps,
        tokens=tokens.cpu(), trajectory=torch.cat(traj, dim=1) if keep_trajectory else None,
        images=torch.cat(finals))


# ---- per prompt, for people (tools/token_significance; the page: engine.reports.token_significance_page)

def token_scores(result: SignificanceResult, vocab: Vocabulary, prompt: int) -> list[dict]:
    """[{position, token, kind, score}] for the prompt's real tokens, in prompt order."""
    out = []
    for pos, tid in enumerate(result.tokens[prompt].tolist()):
        if tid in (PAD_ID, NULL_ID):
            continue
        out.append(dict(position=pos, token=vocab.tokens[tid], kind=vocab.token_kinds[tid],
                        score=float(result.scores[prompt, pos])))
    return out


def significance_document(loaded, prompt_list: PromptList, *, steps: int = 50, guidance: float = 7.5,
                          generations: int = 4, seed: int = 0, batch_size: int = 16, force: bool = False,
                          progress: bool = True) -> dict:
    """Token significance of every prompt of a list under an exported model (`loaded`), along the
    guided DDIM trajectory from the scan's seeds (prompt i: seed + i), as a JSON-able document:
    per prompt its tokens with their SS, the positions ranked most significant first, and the mean
    conditional-noise norm along the trajectory. L needs the null condition: a model trained with
    p_uncond 0 is refused unless `force` (engine.model.null_condition), recorded in the document."""
    record = require_null_condition(loaded, "token significance (L = ||eps_c - eps_u||)", force)
    tokens = encode_prompts(loaded.vocab, prompt_list)          # fails on a bad prompt before any work
    cfg = loaded.unet_config
    seeds = prompt_seeds(range(len(tokens)), seed)
    device = next(loaded.model.parameters()).device
    noise = prompt_noise(seeds, generations, (cfg.in_channels, cfg.image_size, cfg.image_size), device)
    res = token_significance(loaded.model, tokens, noise, loaded.schedule, generations=generations, steps=steps,
                             guidance=guidance, parameterization=loaded.diffusion_config.parameterization,
                             batch_size=batch_size, progress=progress)
    require_finite(res.norms_raw, f"{model_source(loaded.model)}: the conditional-noise magnitudes along the trajectory")
    require_finite(res.scores, f"{model_source(loaded.model)}: the token significance scores")
    elements = noise[0].numel()
    entries = [{"prompt": prompt, "seed": seeds[p], "tokens": token_scores(res, loaded.vocab, p),
                "ranked_positions": res.ranked_positions(p),
                "mean_norm_rms": float(res.norms_raw[:, p].mean()) / elements ** 0.5,
                "mean_norm_raw": float(res.norms_raw[:, p].mean())}
               for p, prompt in enumerate(prompt_list.prompts)]
    return {"checkpoint": str(loaded.path), "steps": steps, "guidance": guidance, "generations": generations,
            "base_seed": seed, "definition": "SS_i = mean_t ||grad_{e_i} ||eps_c - eps_u||_2||^2 (guided trajectory)",
            "null_condition": record, "prompts": entries}
