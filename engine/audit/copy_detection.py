"""Dar et al.'s self-supervised copy-detection embedding for medical images (methods.md §2).

A ResNet-50 whose first convolution takes 1 channel and whose last layer maps 2048 -> 128, trained
with NT-Xent (temperature 0.07): an image's positive is an augmented copy of itself (rotation of up to
±5 degrees and a left-right flip, each with p = 0.5); every other image of the batch and its copy are
negatives. Adam 1e-4 with cosine decay; the checkpoint with the best validation loss is kept.
Similarity is the Pearson correlation of the raw 128-d embeddings. The copy threshold is the 95th
percentile, over training images, of each one's highest correlation to any validation image.

The backbone is configurable ("resnet50" as in the paper, "resnet18", or "tiny" for tests and the CPU
demo). Saved as safetensors weights + a JSON sidecar with the config and the threshold; never pickled.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data_pipeline.images import to_model_range
from engine.audit.nearest_neighbors import topk_neighbors
from engine.audit.similarity import pearson_normalize
from engine.model.network_files import build_network, load_network, network_config, save_network

BACKBONES = ("resnet50", "resnet18", "tiny")
NAME = "copy_detector"   # files: copy_detector.safetensors + copy_detector.json (engine.model.network_files)


@dataclass(frozen=True)
class CopyDetectorConfig:
    backbone: str = "resnet50"
    embed_dim: int = 128
    epochs: int = 200
    batch_size: int = 64
    lr: float = 1e-4
    temperature: float = 0.07
    rotation_deg: float = 5.0
    rotation_p: float = 0.5
    flip_p: float = 0.5
    threshold_percentile: float = 95.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"copy detector backbone: expected one of {BACKBONES}, got {self.backbone!r}")
        for key in ("embed_dim", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"copy detector {key}: expected >= 1, got {getattr(self, key)}")
        if self.batch_size < 2:
            raise ValueError("copy detector batch_size: NT-Xent needs at least 2 images per batch")


def build_embedder(backbone: str, embed_dim: int = 128) -> nn.Module:
    """[B, 1, S, S] in [-1, 1] -> [B, embed_dim] raw embedding."""
    if backbone in ("resnet50", "resnet18"):
        import torchvision
        net = getattr(torchvision.models, backbone)(weights=None)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Linear(net.fc.in_features, embed_dim)   # 2048 -> 128 for ResNet-50
        return net
    if backbone == "tiny":
        def block(i, o):
            return [nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), *block(64, 64),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, embed_dim))
    raise ValueError(f"copy detector backbone: expected one of {BACKBONES}, got {backbone!r}")


def augment_positive(images: torch.Tensor, cfg: CopyDetectorConfig, generator: torch.Generator) -> torch.Tensor:
    """The positive view: per image, a rotation in [-deg, deg] with p and a left-right flip with p."""
    b = images.shape[0]
    rotate = torch.rand(b, generator=generator) < cfg.rotation_p
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(cfg.rotation_deg) * rotate
    flip = torch.rand(b, generator=generator) < cfg.flip_p
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(b)], 1), torch.stack([sin, cos, torch.zeros(b)], 1)], 1)
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where(flip.to(images.device).view(b, 1, 1, 1), out.flip(-1), out)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each of the 2B views must pick its partner among the other 2B - 1 views."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    b = z1.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, target)


def _as_model_input(images: np.ndarray | torch.Tensor, device) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        return to_model_range(x, channel_dim=x.dim() == 3).to(device)
    return (x.unsqueeze(1) if x.dim() == 3 else x).float().to(device)


class CopyDetector:
    def __init__(self, model: nn.Module, cfg: CopyDetectorConfig, threshold: float | None, info: dict | None = None):
        self.model, self.cfg, self.threshold, self.info = model.eval(), cfg, threshold, dict(info or {})

    @torch.no_grad()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Raw embeddings [N, embed_dim] (compare them with Pearson correlation)."""
        device = next(self.model.parameters()).device
        self.model.eval()
        out = [self.model(_as_model_input(images[i:i + batch_size], device)).float().cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy()

    def weight_hash(self) -> str:
        import hashlib
        h = hashlib.sha1()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, out_dir: str) -> None:
        save_network(out_dir, NAME, self.model, {"config": asdict(self.cfg), "threshold": self.threshold, **self.info})


def load_copy_detector(path: str, device: str = "cpu") -> CopyDetector:
    """Load from a directory holding copy_detector.safetensors and copy_detector.json."""
    state, meta = load_network(path, NAME, "tools/train_copy_detector")
    where = os.path.join(path, f"{NAME}.json")
    cfg = network_config(CopyDetectorConfig, meta.pop("config", None), where)
    model = build_network(lambda: build_embedder(cfg.backbone, cfg.embed_dim), state,
                          os.path.join(path, f"{NAME}.safetensors"), where)
    threshold = meta.pop("threshold", None)
    if threshold is not None and not (isinstance(threshold, (int, float)) and -1.0 <= threshold <= 1.0):
        # a correlation: NaN would run the whole audit, flag nothing and then fail to write its JSON
        raise ValueError(f"{where}: threshold: expected a correlation in [-1, 1] or null, got {str(threshold)[:40]}")
    return CopyDetector(model.to(device), cfg, threshold, meta)


def max_correlation(queries: np.ndarray, keys: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For every query embedding, its highest Pearson correlation to any key embedding (chunked)."""
    values, _ = topk_neighbors(pearson_normalize(torch.as_tensor(queries)), pearson_normalize(torch.as_tensor(keys)),
                               k=1, key_chunk=chunk)
    return values[:, 0].numpy()


def dar_threshold(train_emb: np.ndarray, val_emb: np.ndarray, percentile: float = 95.0) -> float:
    """The percentile, over training images, of their highest correlation to any validation image."""
    return float(np.percentile(max_correlation(train_emb, val_emb), percentile))


def copy_statistics(generated_emb: np.ndarray, train_emb: np.ndarray, threshold: float) -> dict:
    """Dar's counts: generated images that are copies, training images that some generation copies."""
    gen_best = max_correlation(generated_emb, train_emb)
    train_best = max_correlation(train_emb, generated_emb)
    copies, memorized = gen_best > threshold, train_best > threshold
    return {
        "threshold": float(threshold),
        "n_generated": int(len(gen_best)), "n_train": int(len(train_best)),
        "n_copies": int(copies.sum()), "copy_fraction": float(copies.mean()) if len(copies) else 0.0,
        "n_memorized_train": int(memorized.sum()),
        "memorized_train_fraction": float(memorized.mean()) if len(memorized) else 0.0,
        "generated_max_correlation": gen_best.tolist(),
    }


def _epoch_loss(model, images: torch.Tensor, cfg: CopyDetectorConfig, generator: torch.Generator,
                optimizer=None, scheduler=None, order: torch.Tensor | None = None) -> float:
    n, total, count = images.shape[0], 0.0, 0
    order = order if order is not None else torch.arange(n)
    for i in range(0, n, cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        if len(idx) < 2:
            continue  # NT-Xent needs a negative
        x = images[idx]
        loss = nt_xent_loss(model(x), model(augment_positive(x, cfg, generator)), cfg.temperature)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        total, count = total + float(loss.detach()) * len(idx), count + len(idx)
    return total / max(count, 1)


def train_copy_detector(train_images: np.ndarray, val_images: np.ndarray, cfg: CopyDetectorConfig,
                        device: str = "cpu", progress: bool = True) -> CopyDetector:
    """Train on uint8 [N, S, S] training images, select by validation loss, set the Dar threshold."""
    if len(train_images) < 2 or len(val_images) < 2:
        raise ValueError(f"copy detector: need >= 2 training and validation images, got "
                         f"{len(train_images)} and {len(val_images)}")
    torch.manual_seed(cfg.seed)
    model = build_embedder(cfg.backbone, cfg.embed_dim).to(device)
    train_x, val_x = _as_model_input(train_images, device), _as_model_input(val_images, device)
    steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_loss, best_state, best_epoch, history = math.inf, None, -1, []
    bar = tqdm(range(cfg.epochs), desc="copy detector", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        train_loss = _epoch_loss(model, train_x, cfg, gen, optimizer, scheduler,
                                 order=torch.randperm(len(train_x), generator=gen))
        model.eval()
        with torch.no_grad():  # fixed augmentation seed: validation losses are comparable across epochs
            val_loss = _epoch_loss(model, val_x, cfg, torch.Generator().manual_seed(cfg.seed + 1))
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", best=best_epoch)
    model.load_state_dict(best_state)
    detector = CopyDetector(model, cfg, None, {"best_epoch": best_epoch, "best_val_loss": best_loss,
                                                "history": history, "n_train": int(len(train_images)),
                                                "n_val": int(len(val_images))})
    detector.threshold = dar_threshold(detector.embed(train_images), detector.embed(val_images),
                                       cfg.threshold_percentile)
    return detector
