"""Collapse of a prompt's generations onto one image (Carlini et al. 2023; methods.md section 4).

A memorized prompt produces (nearly) the same image from every seed. Carlini et al. generate many
images per prompt, link pairs whose tiled L2 distance is small and flag prompts with a large clique; with
the G generations of a scan, the continuous version is the mean tiled distance over the G (G - 1) / 2
pairs, and the score is its negative (higher = more collapsed). No null branch and no training data:
it applies to every model.

Tiled distance (Carlini et al.): the image is cut into a 4 x 4 grid of tiles, and the distance of two
images is the LARGEST over tiles of the tile's rms difference, so two images count as near only when
every part of them agrees (a shared background cannot make them near).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from engine.audit.detectors.base import Detector, PromptBatch
from engine.audit.detectors.generations import generation_forwards, require_generations
from engine.audit.wen_detector import DetectorSettings

TILES_PER_SIDE = 4


def tiled_distance(a: torch.Tensor, b: torch.Tensor, tiles: int = TILES_PER_SIDE) -> torch.Tensor:
    """Max over a tiles x tiles grid of the per-tile rms difference: [N, C, H, W] x [N, C, H, W] -> [N].

    Tile edges are at round(k * H / tiles), so sizes not divisible by `tiles` are still covered exactly."""
    if a.shape != b.shape:
        raise ValueError(f"tiled distance: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    h, w = a.shape[-2:]
    if min(h, w) < tiles:
        raise ValueError(f"tiled distance: images of {h}x{w} px cannot be cut into {tiles}x{tiles} tiles")
    rows = [round(k * h / tiles) for k in range(tiles + 1)]
    cols = [round(k * w / tiles) for k in range(tiles + 1)]
    sq = (a.double() - b.double()) ** 2
    per_tile = [sq[..., rows[r]:rows[r + 1], cols[c]:cols[c + 1]].flatten(1).mean(1)
                for r in range(tiles) for c in range(tiles)]
    return torch.stack(per_tile, 1).max(1).values.sqrt()


class GenerationSpread(Detector):
    name = "generation_spread"
    summary = "Carlini et al.: minus the mean tiled L2 distance (4x4 tiles, max over tiles) between a prompt's generations"
    needs_generations = True
    min_generations = 2

    def forwards_per_prompt(self, settings: DetectorSettings) -> int:
        return generation_forwards(settings)

    def score(self, loaded, batch: PromptBatch, settings: DetectorSettings, *, train=None,
              params: dict | None = None) -> np.ndarray:
        gens = require_generations(self, batch)
        p, g = gens.shape[:2]
        i, j = (list(side) for side in zip(*itertools.combinations(range(g), 2)))
        distance = tiled_distance(gens[:, i].flatten(0, 1), gens[:, j].flatten(0, 1))
        return -distance.reshape(p, -1).mean(1).numpy()

