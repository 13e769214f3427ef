"""What a memorization detector is, and what it is given.

A detector turns P prompts into P scores, higher meaning "more likely memorized". Detectors differ in
what they need, and that decides where they may be used:

- `needs_null_condition`: evaluates the null (unconditional) prompt. Meaningless on a model trained
  with conditioning.p_uncond = 0 (engine.model.null_condition guards it).
- `needs_generations`: scores finished images (a full sampling run per generation), given in
  `PromptBatch.generations`; the others are `denoising_free` (a few forwards on pure noise).
- `needs_training_images`: compares generations with the training set (`train=`).
- `fitted`: combines several terms with weights fitted on a calibration set (`params=`), which the
  caller must then never evaluate on.

Every detector uses the scan's seed convention (engine.audit.wen_detector): prompt p starts its G
generations from one [G, C, H, W] draw of seed seeds[p], so detectors given the same prompts and seeds
see the same initial noise, and a generation-based score refers to the very images a scan would make.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.audit.wen_detector import DetectorSettings
from engine.diffusion.guidance import null_tokens_like
from engine.diffusion.seeds import prompt_noise


@dataclass
class PromptBatch:
    tokens: torch.Tensor                           # [P, L] prompt token ids
    seeds: list[int]                               # [P] one seed per prompt (scan convention)
    generations: torch.Tensor | None = None        # [P, G, C, H, W] in [-1, 1], from these seeds
    trajectory_norms: torch.Tensor | None = None   # [P, G, S] Wen's rms magnitudes recorded while generating

    def __post_init__(self) -> None:
        if len(self.seeds) != self.tokens.shape[0]:
            raise ValueError(f"prompt batch: {self.tokens.shape[0]} prompts but {len(self.seeds)} seeds")


class Detector:
    name: str = ""
    summary: str = ""                  # one line: what is measured, and whose method it is
    needs_null_condition: bool = False
    needs_generations: bool = False
    needs_training_images: bool = False
    fitted: bool = False
    min_generations: int = 1

    @property
    def denoising_free(self) -> bool:
        return not self.needs_generations

    def forwards_per_prompt(self, settings: DetectorSettings) -> int:
        """Network evaluations (images through the U-Net) per prompt, cond and uncond counted apart."""
        raise NotImplementedError

    def score(self, loaded, batch: PromptBatch, settings: DetectorSettings, *, train=None,
              params: dict | None = None) -> np.ndarray:
        """Scores [P] (float64), higher = more likely memorized."""
        raise NotImplementedError

    def check_settings(self, settings: DetectorSettings) -> None:
        if settings.generations < self.min_generations:
            raise ValueError(f"detector {self.name}: needs at least {self.min_generations} generations per "
                             f"prompt, got {settings.generations}")

    def describe(self) -> dict:
        return {"detector": self.name, "summary": self.summary, "needs_null_condition": self.needs_null_condition,
                "needs_generations": self.needs_generations, "needs_training_images": self.needs_training_images,
                "denoising_free": self.denoising_free, "fitted": self.fitted}


class FittedDetector(Detector):
    """A detector whose score combines K terms with weights fitted on a calibration set."""
    fitted = True

    def features(self, loaded, batch: PromptBatch, settings: DetectorSettings) -> np.ndarray:
        """The terms [P, K] before combination."""
        raise NotImplementedError

    def fit(self, features: np.ndarray, labels: np.ndarray) -> dict:
        """Weights from calibration features [N, K] and labels [N] (1 = memorized), JSON-able."""
        raise NotImplementedError

    def combine(self, features: np.ndarray, params: dict) -> np.ndarray:
        raise NotImplementedError

    def score(self, loaded, batch: PromptBatch, settings: DetectorSettings, *, train=None,
              params: dict | None = None) -> np.ndarray:
        if params is None:
            raise ValueError(f"detector {self.name}: its weights must be fitted on a calibration set first")
        return self.combine(self.features(loaded, batch, settings), params)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def image_shape(loaded) -> tuple[int, int, int]:
    cfg = loaded.unet_config
    return (cfg.in_channels, cfg.image_size, cfg.image_size)


def initial_noise(loaded, seeds: list[int], generations: int) -> torch.Tensor:
    """Pure-noise inputs [P * G, C, H, W] (prompt-major) of the scan convention, on the model's device."""
    return prompt_noise(seeds, generations, image_shape(loaded), model_device(loaded.model))


def encode_per_generation(model, tokens: torch.Tensor, generations: int, with_null: bool = True):
    """(cond, null) contexts for every generation row (prompt-major, like `initial_noise`), each prompt
    encoded ONCE and repeated (the encoder is deterministic), and the null prompt encoded once; null is
    None without `with_null`."""
    context, mask = model.encode(tokens)
    cond = (context.repeat_interleave(generations, 0), mask.repeat_interleave(generations, 0))
    if not with_null:
        return cond, None
    null_context, null_mask = model.encode(null_tokens_like(tokens[:1]))
    rows = cond[0].shape[0]
    return cond, (null_context.expand(rows, -1, -1), null_mask.expand(rows, -1))


def autocast_for(settings: DetectorSettings, device: torch.device):
    """bf16 autocast on CUDA when the settings ask for it (magnitudes are reduced in fp32 anyway)."""
    from contextlib import nullcontext
    if settings.bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def per_prompt_mean(values: torch.Tensor, prompts: int) -> np.ndarray:
    """Mean over each prompt's generations of [P * G] values (prompt-major) -> [P] float64."""
    return values.double().reshape(prompts, -1).mean(1).cpu().numpy()
