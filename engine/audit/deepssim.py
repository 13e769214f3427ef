"""DeepSSIM (methods.md §3): an embedding whose cosine similarity is the SSIM of the un-augmented pair.

Training pairs (a, b) are drawn from a run's training images; each side gets its own random
augmentation (left-right flip, rotation, contrast gamma) and the network is trained with an MSE loss
so that cos(emb(aug1(a)), emb(aug2(b))) = SSIM(a, b). The augmentations are what SSIM itself is not
robust to, so the learned score keeps SSIM's scale while ignoring a flip, a small rotation or a
contrast change between a generation and the training image it copies.

SSIM of two random images is mostly low, which would leave the top of the scale untrained; a batch
therefore mixes three kinds of pair (shares in `pair_mix`): b = a (target 1), b = a blend
lam * a + (1 - lam) * c with another image c and lam ~ U(0, 1) (targets spread over the middle), and
b = another image. The targets are always the exact SSIM of the un-augmented pair, whatever the kind.

Scale (the paper's): Different <= 0.6 < Similar <= 0.85 < Duplicate. A generation is a copy of its
nearest training image when their DeepSSIM score exceeds 0.85 (the Duplicate class).

The backbone is the copy detector's (engine.audit.copy_detection.build_embedder: "resnet50",
"resnet18", or "tiny" for tests and the CPU demo) with a unit-norm output, from random weights or a
local weights file (`backbone_weights`, as for the copy detector). Saved as
deepssim.safetensors + deepssim.json (engine.model.network_files); never pickled.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data_pipeline.augment import rotate
from data_pipeline.images import image_tensor, to_model_range
from engine.audit.copy_detection import BACKBONES, build_embedder, load_backbone_weights
from engine.audit.similarity import ssim_paired
from engine.model.network_files import load_network, save_network, state_dict_sha1

NAME = "deepssim"          # files: deepssim.safetensors + deepssim.json
DIFFERENT_AT_MOST = 0.6    # score <= 0.6: Different
DUPLICATE_ABOVE = 0.85     # score > 0.85: Duplicate (the copy rule); in between: Similar
CLASSES = ("different", "similar", "duplicate")


@dataclass(frozen=True)
class DeepSSIMConfig:
    backbone: str = "resnet50"
    embed_dim: int = 128
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-4
    flip_p: float = 0.5
    rotation_deg: float = 10.0      # each side rotated by U(-deg, deg)
    gamma_max: float = 1.5          # contrast gamma log-uniform in [1/gamma_max, gamma_max]
    pair_mix: tuple[float, float, float] = (0.25, 0.5, 0.25)   # shares of identical, blended, other pairs
    val_pairs: int = 512            # fixed validation pairs (checkpoint selection by their loss)
    seed: int = 0
    backbone_weights: str | None = None   # local file to start from (copy_detection.load_backbone_weights)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"deepssim backbone: expected one of {BACKBONES}, got {self.backbone!r}")
        for key in ("embed_dim", "epochs", "batch_size", "val_pairs"):
            if getattr(self, key) < 1:
                raise ValueError(f"deepssim {key}: expected >= 1, got {getattr(self, key)}")
        if not 0 <= self.flip_p <= 1 or self.rotation_deg < 0 or self.gamma_max < 1:
            raise ValueError("deepssim augmentation: flip_p in [0, 1], rotation_deg >= 0, gamma_max >= 1")
        mix = tuple(float(v) for v in self.pair_mix)
        if len(mix) != 3 or min(mix) < 0 or not math.isclose(sum(mix), 1.0, abs_tol=1e-6):
            raise ValueError(f"deepssim pair_mix: three shares >= 0 summing to 1, got {self.pair_mix}")
        object.__setattr__(self, "pair_mix", mix)


def classify(scores: np.ndarray, different_at_most: float = DIFFERENT_AT_MOST,
             duplicate_above: float = DUPLICATE_ABOVE) -> np.ndarray:
    """Class index per score: 0 Different (<= lower), 1 Similar, 2 Duplicate (> upper)."""
    s = np.asarray(scores, np.float64)
    return np.where(s > duplicate_above, 2, np.where(s > different_at_most, 1, 0))


def augment_view(images: torch.Tensor, cfg: DeepSSIMConfig, generator: torch.Generator) -> torch.Tensor:
    """One random view of [B, 1, S, S] images in [-1, 1]: flip, rotation, contrast gamma, each per image."""
    b = images.shape[0]
    flip = torch.rand(b, generator=generator) < cfg.flip_p
    angle = (torch.rand(b, generator=generator) * 2 - 1) * cfg.rotation_deg
    gamma = torch.exp((torch.rand(b, generator=generator) * 2 - 1) * math.log(cfg.gamma_max))
    x = (images + 1) / 2
    x = torch.where(flip.to(x.device).view(b, 1, 1, 1), x.flip(-1), x)
    x = rotate(x, angle).clamp(0, 1)
    x = x.clamp_min(1e-6) ** gamma.to(x.device, x.dtype).view(b, 1, 1, 1)
    return x * 2 - 1


def draw_pairs(images: torch.Tensor, index: torch.Tensor, cfg: DeepSSIMConfig, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, SSIM(a, b)) for anchors images[index]: b is a itself, a blend of a with another image,
    or another image, in the shares of cfg.pair_mix. Images [N, 1, S, S] in [-1, 1]."""
    n, b = images.shape[0], index.shape[0]
    other = (index + torch.randint(1, max(n, 2), (b,), generator=generator)) % n   # never the anchor itself
    u = torch.rand(b, generator=generator)
    lam = torch.rand(b, generator=generator)
    same_share, blend_share = cfg.pair_mix[0], cfg.pair_mix[1]
    lam = torch.where(u < same_share, 1.0, torch.where(u < same_share + blend_share, lam, 0.0))
    a = images[index]
    lam = lam.to(a.device, a.dtype).view(b, 1, 1, 1)
    partner = lam * a + (1 - lam) * images[other]
    return a, partner, ssim_paired(a[:, 0], partner[:, 0]).to(a.device)


def _unit_embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(model(x).float(), dim=1)


def pair_loss(model: nn.Module, a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, cfg: DeepSSIMConfig,
              generator: torch.Generator) -> torch.Tensor:
    """MSE between cos(emb(aug1(a)), emb(aug2(b))) and the SSIM of the un-augmented pair."""
    za = _unit_embed(model, augment_view(a, cfg, generator))
    zb = _unit_embed(model, augment_view(b, cfg, generator))
    return F.mse_loss((za * zb).sum(dim=1), target.float())


def _as_model_input(images: np.ndarray | torch.Tensor, device) -> torch.Tensor:
    x = image_tensor(images)
    if x.dtype == torch.uint8:
        return to_model_range(x, channel_dim=x.dim() == 3).to(device)
    return (x.unsqueeze(1) if x.dim() == 3 else x).float().to(device)


class DeepSSIM:
    """Unit-norm embeddings whose dot product estimates SSIM; `score` of two sets, `classify` of scores."""

    def __init__(self, model: nn.Module, cfg: DeepSSIMConfig, info: dict | None = None):
        self.model, self.cfg, self.info = model.eval(), cfg, dict(info or {})
        self.threshold = DUPLICATE_ABOVE    # the copy rule: score > 0.85 (Duplicate)

    @torch.no_grad()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """[N, embed_dim] unit-norm embeddings of uint8 [N, S, S] or [-1, 1] [N, 1, S, S] images."""
        device = next(self.model.parameters()).device
        self.model.eval()
        out = [_unit_embed(self.model, _as_model_input(images[i:i + batch_size], device)).cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.cfg.embed_dim), np.float32)

    def weight_hash(self) -> str:
        return state_dict_sha1(self.model)[:16]

    def save(self, out_dir: str) -> None:
        cfg = {**asdict(self.cfg), "pair_mix": list(self.cfg.pair_mix)}
        save_network(out_dir, NAME, self.model, {"config": cfg, "different_at_most": DIFFERENT_AT_MOST,
                                                 "duplicate_above": DUPLICATE_ABOVE, **self.info})


def load_deepssim(path: str, device: str = "cpu") -> DeepSSIM:
    """Load from a directory holding deepssim.safetensors and deepssim.json."""
    state, meta = load_network(path, NAME, "tools/train_deepssim")
    try:
        d = meta.pop("config")
        cfg = DeepSSIMConfig(**{**d, "pair_mix": tuple(d["pair_mix"])})
    except (TypeError, KeyError) as e:
        raise ValueError(f"{path}/{NAME}.json: bad config ({e})") from None
    model = build_embedder(cfg.backbone, cfg.embed_dim)
    model.load_state_dict(state)
    meta.pop("different_at_most", None)
    meta.pop("duplicate_above", None)
    return DeepSSIM(model.to(device), cfg, meta)


def _validation_pairs(images: torch.Tensor, cfg: DeepSSIMConfig) -> tuple[torch.Tensor, ...]:
    """Fixed pairs and augmentation seed, so validation losses are comparable across epochs."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    index = torch.randint(0, images.shape[0], (cfg.val_pairs,), generator=gen)
    return draw_pairs(images, index, cfg, gen)


def train_deepssim(train_images: np.ndarray, val_images: np.ndarray, cfg: DeepSSIMConfig, device: str = "cpu",
                   progress: bool = True) -> DeepSSIM:
    """Train on uint8 [N, S, S] training images; keep the epoch with the lowest validation MSE."""
    if len(train_images) < 2 or len(val_images) < 2:
        raise ValueError(f"deepssim: need >= 2 training and validation images, got "
                         f"{len(train_images)} and {len(val_images)}")
    torch.manual_seed(cfg.seed)
    model = build_embedder(cfg.backbone, cfg.embed_dim)
    start = load_backbone_weights(model, cfg.backbone_weights) if cfg.backbone_weights else None
    model = model.to(device)
    train_x, val_x = _as_model_input(train_images, device), _as_model_input(val_images, device)
    val_a, val_b, val_t = _validation_pairs(val_x, cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_loss, best_state, best_epoch, history = math.inf, None, -1, []
    bar = tqdm(range(cfg.epochs), desc="deepssim", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        order, total = torch.randperm(len(train_x), generator=gen), 0.0
        for i in range(0, len(order), cfg.batch_size):
            a, b, target = draw_pairs(train_x, order[i:i + cfg.batch_size], cfg, gen)
            if a.shape[0] < 2:
                continue   # BatchNorm needs two samples
            loss = pair_loss(model, a, b, target, cfg, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * a.shape[0]
        scheduler.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(pair_loss(model, val_a, val_b, val_t, cfg, torch.Generator().manual_seed(cfg.seed + 2)))
        history.append({"epoch": epoch, "train_mse": total / len(order), "val_mse": val_loss})
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(train=f"{total / len(order):.4f}", val=f"{val_loss:.4f}", best=best_epoch)
    model.load_state_dict(best_state)
    return DeepSSIM(model, cfg, {"best_epoch": best_epoch, "best_val_mse": best_loss, "history": history,
                                 "n_train": int(len(train_images)), "n_val": int(len(val_images)),
                                 "backbone_start": start})
