"""Augmentations for mitigation experiments (torch reference; the DALI loader applies the same
per-sample parameters with DALI ops).

No horizontal flip by default: laterality matters on chest X-rays (the heart is on the left).
Parameters are drawn per sample from a torch.Generator, so a batch's augmentation is a function
of the generator's seed alone.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .config_schema import ConfigSection, constrained


def _probability(default: float):
    return constrained(default, "float in [0, 1]", lambda v: 0.0 <= v <= 1.0)


def _amount(default: float):
    return constrained(default, "float >= 0", lambda v: v >= 0)


@dataclasses.dataclass(frozen=True)
class AugmentConfig(ConfigSection):
    """The `augment` section of a training config."""
    SECTION = "augment"
    rotation_deg: float = _amount(5.0)     # max |angle| of a rotation
    rotation_p: float = _probability(0.5)
    noise_std: float = _amount(0.02)       # Gaussian noise std, in [0, 1] intensity units
    noise_p: float = _probability(0.5)
    contrast: float = _amount(0.1)         # contrast factor drawn from 1 +- contrast
    brightness: float = _amount(0.05)      # brightness shift drawn from +- brightness (in [0, 1] units)
    jitter_p: float = _probability(0.5)
    hflip_p: float = _probability(0.0)


@dataclasses.dataclass
class AugmentParams:
    angle_deg: torch.Tensor       # [B] counter-clockwise as displayed
    contrast: torch.Tensor        # [B]
    brightness: torch.Tensor      # [B]
    noise_std: torch.Tensor       # [B]
    hflip: torch.Tensor           # [B] bool


def draw_params(batch: int, cfg: AugmentConfig, generator: torch.Generator) -> AugmentParams:
    """Per-sample parameters; always draws the same numbers of values so streams stay aligned."""
    u = torch.rand(batch, 8, generator=generator, dtype=torch.float64)
    on = lambda col, p: u[:, col] < p   # noqa: E731
    angle = torch.where(on(0, cfg.rotation_p), (2 * u[:, 1] - 1) * cfg.rotation_deg, 0.0)
    jitter = on(2, cfg.jitter_p)
    contrast = torch.where(jitter, 1 + (2 * u[:, 3] - 1) * cfg.contrast, 1.0)
    brightness = torch.where(jitter, (2 * u[:, 4] - 1) * cfg.brightness, 0.0)
    noise = torch.where(on(5, cfg.noise_p), torch.full_like(u[:, 0], cfg.noise_std), 0.0)
    return AugmentParams(angle.float(), contrast.float(), brightness.float(), noise.float(), on(6, cfg.hflip_p))


def rotate(images01: torch.Tensor, angle_deg: torch.Tensor) -> torch.Tensor:
    """Rotate [B, C, H, W] images about their centre (bilinear, black fill outside)."""
    theta = angle_deg.to(images01.device, torch.float32) * (math.pi / 180)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    # affine_grid maps output coords to input coords; a counter-clockwise display rotation of the
    # image samples the input at the clockwise-rotated position (y axis points down).
    matrix = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(matrix, list(images01.shape), align_corners=False)
    return F.grid_sample(images01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def apply_params(images: torch.Tensor, params: AugmentParams, noise_generator: torch.Generator | None) -> torch.Tensor:
    """Apply drawn parameters to images in [-1, 1]: flip, rotation, contrast/brightness, noise."""
    x = (images + 1) / 2
    if params.hflip.any():
        x = torch.where(params.hflip.to(x.device)[:, None, None, None], x.flip(-1), x)
    if (params.angle_deg != 0).any():
        x = rotate(x, params.angle_deg)
    x = apply_jitter(x, params)
    x = add_noise(x, params, noise_generator)
    return x * 2 - 1


def apply_jitter(x01: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    c = params.contrast.to(x01.device)[:, None, None, None]
    b = params.brightness.to(x01.device)[:, None, None, None]
    return torch.clamp(0.5 + c * (x01 - 0.5) + b, 0.0, 1.0)


def add_noise(x01: torch.Tensor, params: AugmentParams, generator: torch.Generator | None) -> torch.Tensor:
    if not (params.noise_std > 0).any():
        return x01
    noise = torch.randn(x01.shape, generator=generator, dtype=torch.float32, device="cpu").to(x01.device)
    return torch.clamp(x01 + params.noise_std.to(x01.device)[:, None, None, None] * noise, 0.0, 1.0)


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch in [-1, 1], [B, 1, S, S]; deterministic given the generator's state."""
    params = draw_params(images.shape[0], cfg, generator)
    return apply_params(images, params, generator)
