"""Detectors that compare a prompt's generations with the training set (methods.md section 4).

- `nearest_training_similarity`: the generation's highest pixel Pearson correlation to any training
  image, averaged over the prompt's G generations. The direct measurement of copying, and the model-free
  ground truth the planted audit uses; needs the training images (an auditor holding the data has them).
- `nn_ratio` (Gu et al.): ||x - NN1|| / ||x - NN2||, the L2 distance to the nearest training image over
  the distance to the second nearest, in pixels ([-1, 1]); a copy sits much closer to one training image
  than to any other (Gu et al. call a sample memorized below 1/3). The score is minus the mean ratio
  over the G generations. 0/0 (a generation equal to two identical training images) counts as 0, a copy.
  Limitation: near duplicates stored as separate training images (a patient's follow-up scans) are
  both close, so a copy of one of them has a ratio near 1 and is missed.

Both need no null branch and apply to every model. The training images are the run's DISTINCT images
(engine.audit.run_data.split_images keeps planted exact copies, which share a path, once), so "the second
nearest" is another image, not another copy row of the same one.
"""
from __future__ import annotations

import numpy as np
import torch

from data_pipeline.images import to_model_range
from engine.audit.detectors.base import Detector, PromptBatch
from engine.audit.detectors.generations import generation_forwards, require_generations
from engine.audit.nearest_neighbors import topk_neighbors
from engine.audit.similarity import pearson_normalize
from engine.audit.wen_detector import DetectorSettings


def negative_squared_distance(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """-||q - k||^2 for every query and key row, [Q, D] x [K, D] -> [Q, K] (float64, so near-equal
    distances keep their order)."""
    q, k = queries.double(), keys.double()
    return -((q * q).sum(1)[:, None] - 2 * q @ k.T + (k * k).sum(1)[None]).clamp_min(0)


class TrainingNeighbours:
    """The distinct training images, ready for nearest-neighbour search by pixel correlation and by L2."""

    def __init__(self, images_u8: np.ndarray, paths: list[str]) -> None:
        if len(images_u8) != len(paths):
            raise ValueError(f"training neighbours: {len(images_u8)} images but {len(paths)} paths")
        if len(images_u8) < 2:
            raise ValueError("training neighbours: need at least 2 training images")
        self.images_u8 = np.array(images_u8)            # a copy: caches are read-only memory maps
        self.paths = list(paths)
        self.pixels = to_model_range(self.images_u8, channel_dim=False).flatten(1)      # [N, S*S] in [-1, 1]
        self.correlation_keys = pearson_normalize(self.pixels)

    def check(self, generations: torch.Tensor) -> None:
        if tuple(generations.shape[-2:]) != tuple(self.images_u8.shape[-2:]) or generations.shape[-3] != 1:
            raise ValueError(f"training neighbours: generations are {tuple(generations.shape[-3:])}, training "
                             f"images 1 x {tuple(self.images_u8.shape[-2:])}")

    def nearest_by_correlation(self, images: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(correlations [Q, k], training indices [Q, k]) of images [Q, 1, S, S] in [-1, 1]."""
        self.check(images)
        return topk_neighbors(pearson_normalize(images.flatten(1)), self.correlation_keys, k)

    def nearest_by_distance(self, images: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2 distances [Q, k], training indices [Q, k]), nearest first, of images [Q, 1, S, S]."""
        self.check(images)
        values, index = topk_neighbors(images.flatten(1).double(), self.pixels.double(), k,
                                       similarity=negative_squared_distance)
        return (-values.double()).clamp_min(0).sqrt(), index


def require_training(detector: Detector, train: TrainingNeighbours | None) -> TrainingNeighbours:
    """The training images a nearest-neighbour detector compares with, or a one-line error."""
    if train is None:
        raise ValueError(f"detector {detector.name}: needs the training images (train=TrainingNeighbours)")
    return train


class NearestTrainingSimilarity(Detector):
    name = "nearest_training_similarity"
    summary = "highest pixel Pearson correlation of each generation to any training image, mean over generations"
    needs_generations = True
    needs_training_images = True

    def forwards_per_prompt(self, settings: DetectorSettings) -> int:
        return generation_forwards(settings)

    def score(self, loaded, batch: PromptBatch, settings: DetectorSettings, *, train: TrainingNeighbours | None = None,
              params: dict | None = None) -> np.ndarray:
        gens, train = require_generations(self, batch), require_training(self, train)
        values, _ = train.nearest_by_correlation(gens.flatten(0, 1), 1)
        return values[:, 0].double().reshape(gens.shape[0], -1).mean(1).numpy()


class NearestNeighbourRatio(Detector):
    name = "nn_ratio"
    summary = "Gu et al.: minus the mean over generations of ||x - NN1|| / ||x - NN2|| (pixel L2 to the training set)"
    needs_generations = True
    needs_training_images = True

    def forwards_per_prompt(self, settings: DetectorSettings) -> int:
        return generation_forwards(settings)

    def score(self, loaded, batch: PromptBatch, settings: DetectorSettings, *, train: TrainingNeighbours | None = None,
              params: dict | None = None) -> np.ndarray:
        gens, train = require_generations(self, batch), require_training(self, train)
        distances, _ = train.nearest_by_distance(gens.flatten(0, 1), 2)
        d1, d2 = distances[:, 0], distances[:, 1]
        ratio = torch.where(d2 > 0, d1 / d2.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(d1))
        return -ratio.reshape(gens.shape[0], -1).mean(1).numpy()
