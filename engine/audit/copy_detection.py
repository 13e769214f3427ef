"""Dar et al.'s self-supervised copy-detection embedding for medical images (methods.md §2).

A ResNet-50 whose first convolution takes 1 channel and whose last layer maps 2048 -> 128, trained
with NT-Xent (temperature 0.07): an image's positive is an augmented copy of itself (rotation of up to
±5 degrees and a left-right flip, each with p = 0.5); every other image of the batch and its copy are
negatives. Each image is rescaled to [0, 1] by its own minimum and maximum before anything else, as
Dar et al. do. Adam 1e-4 with a cosine decay stepped once per epoch; the checkpoint with the best
validation loss is kept. Similarity is the Pearson correlation of the raw 128-d embeddings. The copy
threshold is the 95th percentile, over training images, of each one's highest correlation to any
validation image.

Dar et al. start from ImageNet weights. Nothing is downloaded here: `backbone_weights` is a local file
(safetensors, or a torch state dict read with weights_only=True) — torchvision's ImageNet ResNet-50,
or a chest X-ray ResNet — whose first convolution's RGB filters are summed into one grey channel (a
grey image repeated on R, G and B gives the same response) and whose classification head is
replaced. With ImageNet weights, `input_normalization="imagenet"` standardises the [0, 1] input by the
grey mean and std of ImageNet (0.449, 0.226) that those filters expect.

What it measures: whether two images are the same image up to the augmentations it was trained to
ignore (small rotations, flips), relative to how alike distinct training images are (the threshold
comes from training vs validation images). What it does not measure: whether a generation shows a
given patient's anatomy under other changes (contrast, crop, blending), nor anything about images
unlike its training set; its threshold accepts 5% of the nearest training-validation pairs by
construction, so its copy rate is not zero for a model that copies nothing.

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

from data_pipeline.images import image_tensor, to_model_range
from engine.audit.nearest_neighbors import topk_neighbors
from engine.audit.similarity import pearson_normalize
from engine.model.network_files import (
    build_network,
    file_sha1,
    load_network,
    network_config,
    save_network,
    state_dict_sha1,
)

BACKBONES = ("resnet50", "resnet18", "tiny")
INPUT_NORMALIZATIONS = ("none", "imagenet")
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = 0.449, 0.226   # means of ImageNet's per-channel mean and std
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
    input_scaling: str = "per_image_minmax"   # the one scaling (Dar's); recorded so older files are refused
    input_normalization: str = "none"
    backbone_weights: str | None = None       # local file the backbone started from (None: random init)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"copy detector backbone: expected one of {BACKBONES}, got {self.backbone!r}")
        if self.input_normalization not in INPUT_NORMALIZATIONS:
            raise ValueError(f"copy detector input_normalization: expected one of {INPUT_NORMALIZATIONS}, "
                             f"got {self.input_normalization!r}")
        if self.input_scaling != "per_image_minmax":
            raise ValueError(f"copy detector input_scaling: only 'per_image_minmax', got {self.input_scaling!r}")
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


def _head_prefix(model: nn.Module) -> str:
    """Name prefix of the last Linear layer (the projection head, replaced rather than loaded)."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return name + "."


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: .safetensors, or a torch file read with weights_only=True
    (no code in it is run). A {"state_dict": ...} or {"model": ...} wrapper and a "module." prefix
    are unwrapped."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: backbone weights file does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # noqa: BLE001 - any unreadable file gets the same one-line error
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(model: nn.Module, path: str) -> dict:
    """Copy every tensor of `model` except its head from the file at `path` (see read_state_dict).

    A file whose keys carry an extra prefix (e.g. "backbone.conv1.weight") is matched after removing
    it. A 3-channel first-layer filter is summed over its input channels to take one grey channel.
    Returns {"path", "sha1", "loaded", "head_initialised"}; any missing or mismatched tensor is an
    error naming the file and the key.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head = _head_prefix(model)
    wanted = [k for k in own if not k.startswith(head)]
    prefix = next((k[:-len(wanted[0])] for k in state if k.endswith(wanted[0])), None)
    if prefix is None:
        raise ValueError(f"{path}: no tensor named {wanted[0]!r} (is this a {type(model).__name__} backbone?)")
    new = {}
    for key in wanted:
        src = state.get(prefix + key)
        if src is None:
            raise ValueError(f"{path}: missing tensor {prefix + key!r}")
        if src.dim() == 4 and src.shape[1] == 3 and own[key].shape[1] == 1 and src.shape[0] == own[key].shape[0]:
            src = src.sum(dim=1, keepdim=True)      # RGB filters -> one grey channel, same response
        if src.shape != own[key].shape:
            raise ValueError(f"{path}: tensor {prefix + key!r} has shape {tuple(src.shape)}, "
                             f"the {type(model).__name__} backbone needs {tuple(own[key].shape)}")
        new[key] = src.to(own[key].dtype)
    model.load_state_dict({**own, **new})
    return {"path": os.path.abspath(path), "sha1": file_sha1(path), "loaded": len(new),
            "head_initialised": sorted(k for k in own if k.startswith(head))}


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


def prepare_input(images: np.ndarray | torch.Tensor, cfg: CopyDetectorConfig, device) -> torch.Tensor:
    """uint8 [N, S, S] or [-1, 1] [N, 1, S, S] -> network input [N, 1, S, S]: each image rescaled to
    [0, 1] by its own min and max (Dar et al.), then standardised for ImageNet weights if asked."""
    x = image_tensor(images)
    x = to_model_range(x, channel_dim=x.dim() == 3) if x.dtype == torch.uint8 else \
        (x.unsqueeze(1) if x.dim() == 3 else x).float()
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-6)          # a constant image maps to 0
    if cfg.input_normalization == "imagenet":
        x = (x - IMAGENET_GREY_MEAN) / IMAGENET_GREY_STD
    return x.to(device)


class CopyDetector:
    def __init__(self, model: nn.Module, cfg: CopyDetectorConfig, threshold: float | None, info: dict | None = None):
        self.model, self.cfg, self.threshold, self.info = model.eval(), cfg, threshold, dict(info or {})

    @torch.no_grad()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Raw embeddings [N, embed_dim] (compare them with Pearson correlation)."""
        device = next(self.model.parameters()).device
        self.model.eval()
        out = [self.model(prepare_input(images[i:i + batch_size], self.cfg, device)).float().cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy()

    def weight_hash(self) -> str:
        return state_dict_sha1(self.model)[:16]

    def save(self, out_dir: str) -> None:
        save_network(out_dir, NAME, self.model, {"config": asdict(self.cfg), "threshold": self.threshold, **self.info})


def load_copy_detector(path: str, device: str = "cpu") -> CopyDetector:
    """Load from a directory holding copy_detector.safetensors and copy_detector.json."""
    state, meta = load_network(path, NAME, "tools/train_copy_detector")
    where = os.path.join(path, f"{NAME}.json")
    if isinstance(meta.get("config"), dict) and "input_scaling" not in meta["config"]:   # a detector from before
        raise ValueError(f"{where}: trained without Dar's per-image [0, 1] rescaling, which embedding "
                         f"now applies; retrain it with tools/train_copy_detector")
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
                optimizer=None, order: torch.Tensor | None = None) -> float:
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
        total, count = total + float(loss.detach()) * len(idx), count + len(idx)
    return total / max(count, 1)


def train_copy_detector(train_images: np.ndarray, val_images: np.ndarray, cfg: CopyDetectorConfig,
                        device: str = "cpu", progress: bool = True) -> CopyDetector:
    """Train on uint8 [N, S, S] training images, select by validation loss, set the Dar threshold."""
    if len(train_images) < 2 or len(val_images) < 2:
        raise ValueError(f"copy detector: need >= 2 training and validation images, got "
                         f"{len(train_images)} and {len(val_images)}")
    torch.manual_seed(cfg.seed)
    model = build_embedder(cfg.backbone, cfg.embed_dim)
    start = load_backbone_weights(model, cfg.backbone_weights) if cfg.backbone_weights else None
    model = model.to(device)
    train_x, val_x = prepare_input(train_images, cfg, device), prepare_input(val_images, cfg, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # Dar et al.: cosine decay over epochs (one scheduler step per epoch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_loss, best_state, best_epoch, history = math.inf, None, -1, []
    bar = tqdm(range(cfg.epochs), desc="copy detector", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        train_loss = _epoch_loss(model, train_x, cfg, gen, optimizer, order=torch.randperm(len(train_x), generator=gen))
        scheduler.step()
        model.eval()
        with torch.no_grad():  # fixed augmentation seed: validation losses are comparable across epochs
            val_loss = _epoch_loss(model, val_x, cfg, torch.Generator().manual_seed(cfg.seed + 1))
        history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_loss": val_loss})
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", best=best_epoch)
    model.load_state_dict(best_state)
    detector = CopyDetector(model, cfg, None, {"best_epoch": best_epoch, "best_val_loss": best_loss,
                                                "history": history, "n_train": int(len(train_images)),
                                                "n_val": int(len(val_images)), "backbone_start": start})
    detector.threshold = dar_threshold(detector.embed(train_images), detector.embed(val_images),
                                       cfg.threshold_percentile)
    return detector
