"""Wen et al.'s memorization detector (methods.md §1), batched over prompts x generations x {cond, uncond}.

For a prompt p the guided sampler is run from G seeded noises; at every step the sampler already
computes d = eps(x_t, e_p) - eps(x_t, e_null) from one [cond; uncond] forward, and records ||d||_2
("raw") and ||d||_2 / sqrt(C*H*W) ("rms"). Many prompts share each forward: the batch is
P prompts x G generations, doubled for cond/uncond by the sampler. The whole [P, G, S] record is kept,
so the mean score, the first-step score or any other slice are read off afterwards.

Seeds follow the reference (the scan convention of engine.diffusion.seeds): prompt i (its index in the
scanned list) uses seed base_seed + i, and its G generations are one draw of shape [G, C, H, W] from
that seed. With DDIM (eta = 0) the result of a prompt is therefore independent of which other prompts
share its batch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from engine.diffusion.sampling import SAMPLERS, sample
from engine.diffusion.schedule import NoiseSchedule
from engine.diffusion.seeds import prompt_noise, step_noise_generator


@dataclass(frozen=True)
class DetectorSettings:
    generations: int = 4
    steps: int = 50
    guidance: float = 7.5
    sampler: str = "ddim"
    base_seed: int = 0
    bf16: bool = False          # bf16 autocast for the network on CUDA; norms are reduced in fp32
    clip_x0: bool = True

    def __post_init__(self) -> None:
        if self.generations < 1:
            raise ValueError(f"generations: expected >= 1, got {self.generations}")
        if self.steps < 1:
            raise ValueError(f"steps: expected >= 1, got {self.steps}")
        if not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance) and self.guidance >= 0):
            # NaN would scan everything and then fail to match its own journal (NaN != NaN)
            raise ValueError(f"guidance: expected a finite number >= 0, got {self.guidance}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {self.sampler!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Detection:
    norms_raw: torch.Tensor           # [P, G, S] float32, CPU
    norms_rms: torch.Tensor           # [P, G, S]
    timesteps: torch.Tensor           # [S], noisiest first
    seeds: list[int]                  # [P]
    images: torch.Tensor | None       # [P, G, C, H, W] in [-1, 1] when kept


@torch.no_grad()
def detect(model, schedule: NoiseSchedule, tokens: torch.Tensor, seeds: list[int], settings: DetectorSettings,
           *, image_shape: tuple[int, int, int], parameterization: str = "eps",
           keep_images: bool = False) -> Detection:
    """Per-step conditional-noise magnitudes for P prompts (`tokens` [P, L]) in one batched sampling run.

    `image_shape` is (C, H, W) of the model. The network sees batches of 2 * P * G images.
    """
    n_prompts, g = tokens.shape[0], settings.generations
    if len(seeds) != n_prompts:
        raise ValueError(f"detect: {n_prompts} prompts but {len(seeds)} seeds")
    device = next(model.parameters()).device
    noise = prompt_noise(seeds, g, image_shape, device)                           # [P*G, C, H, W]
    batch_tokens = tokens.to(device).repeat_interleave(g, dim=0)                  # prompt-major, like noise
    generator = None
    if settings.sampler != "ddim":
        # Ancestral noise is drawn for the whole batch: such scores depend on the batch's composition.
        generator = step_noise_generator(seeds[0] if seeds else settings.base_seed, device)
    autocast = torch.bfloat16 if settings.bf16 and device.type == "cuda" else None
    out = sample(model, batch_tokens, noise, schedule, steps=settings.steps, guidance=settings.guidance,
                 sampler=settings.sampler, generator=generator, parameterization=parameterization,
                 record_norms=True, clip_x0=settings.clip_x0, autocast_dtype=autocast)
    steps = out.norms_raw.shape[0]
    per_prompt = lambda norms: norms.float().T.reshape(n_prompts, g, steps).contiguous()  # noqa: E731
    images = out.images.float().cpu().reshape(n_prompts, g, *image_shape) if keep_images else None
    return Detection(per_prompt(out.norms_raw), per_prompt(out.norms_rms), out.timesteps, list(seeds), images)


def mean_score(norms: torch.Tensor, step_range: tuple[int, int] | None = None) -> torch.Tensor:
    """Wen's d(p): mean over generations and the steps in [start, stop) of [..., G, S] magnitudes."""
    if step_range is not None:
        start, stop = step_range
        if not 0 <= start < stop <= norms.shape[-1]:
            raise ValueError(f"score steps: range {start}:{stop} is outside 0:{norms.shape[-1]}")
        norms = norms[..., start:stop]
    return norms.double().mean(dim=(-2, -1)).float()


def first_step_score(norms: torch.Tensor) -> torch.Tensor:
    """The cheap variant: mean over generations of the first (noisiest) step only."""
    return mean_score(norms, (0, 1))
