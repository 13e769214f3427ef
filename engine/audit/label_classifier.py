"""Label conformance: does a generation show the findings its prompt asked for?

A small multi-label CNN is trained on a run's real training images to predict each finding named
in the prompts (positive = named, negative = not named, "uncertain" = left out of loss and scores).
Conformance of a set of conditioned generations is then the per-finding ROC AUC of the
classifier's score against the prompt's labels, macro-averaged over findings with enough positives
and negatives; the same number on real held-out images is the ceiling the classifier itself
allows. A mitigation that lowers memorization by ignoring the prompt shows up here as a drop.

Saved like the copy detector: safetensors weights + JSON sidecar (labels, config, validation
AUCs); never pickled.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from data_pipeline.images import to_model_range
from data_pipeline.prompts import parse_prompt
from engine.audit.roc import roc_metrics
from engine.model.network_files import build_network, load_network, network_config, save_network

NAME = "label_classifier"   # files: label_classifier.safetensors + .json (engine.model.network_files)


@dataclass(frozen=True)
class LabelClassifierConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 32
    min_count: int = 5          # a finding needs this many positives AND negatives to be a label / be scored
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "width", "min_count"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"label classifier {name}: expected a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"label classifier lr: expected > 0, got {self.lr!r}")
        if self.width % 8:
            raise ValueError(f"label classifier width: expected a multiple of 8 (its GroupNorm has 8 groups), "
                             f"got {self.width}")


def prompt_labels(prompts: list[str], labels: list[str]) -> np.ndarray:
    """[N, L] float targets: 1 named, 0 not named, NaN uncertain (ignored)."""
    out = np.zeros((len(prompts), len(labels)), np.float32)
    col = {name: j for j, name in enumerate(labels)}
    for i, prompt in enumerate(prompts):
        parts = parse_prompt(prompt)
        for name in parts.findings:
            if name in col:
                out[i, col[name]] = 1.0
        for name in parts.uncertain:
            if name in col:
                out[i, col[name]] = np.nan
    return out


def choose_labels(prompts: list[str], min_count: int) -> list[str]:
    """Findings named in at least `min_count` prompts and absent from at least `min_count`."""
    counts: dict[str, int] = {}
    for prompt in prompts:
        for name in parse_prompt(prompt).findings:
            counts[name] = counts.get(name, 0) + 1
    return sorted(n for n, c in counts.items() if c >= min_count and len(prompts) - c >= min_count)


def build_classifier(n_labels: int, width: int) -> nn.Module:
    """[B, 1, S, S] in [-1, 1] -> [B, n_labels] logits; four stride-2 conv blocks and a linear head."""
    def block(i, o):
        return [nn.Conv2d(i, o, 3, stride=2, padding=1), nn.GroupNorm(8, o), nn.SiLU()]
    w = width
    return nn.Sequential(*block(1, w), *block(w, 2 * w), *block(2 * w, 2 * w), *block(2 * w, 2 * w),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, n_labels))


def _as_input(images: np.ndarray, device) -> torch.Tensor:
    return to_model_range(np.asarray(images, np.uint8)).to(device)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    known = ~torch.isnan(targets)
    return F.binary_cross_entropy_with_logits(logits[known], targets[known]) if known.any() else logits.sum() * 0


def per_label_auc(scores: np.ndarray, targets: np.ndarray, labels: list[str], min_count: int) -> dict:
    """ROC AUC per label where >= min_count positives and negatives are known; macro mean over those."""
    per = {}
    for j, name in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        pos, neg = scores[known & (targets[:, j] == 1), j], scores[known & (targets[:, j] == 0), j]
        if len(pos) >= min_count and len(neg) >= min_count:
            per[name] = {"auc": roc_metrics(pos, neg).auc, "n_positive": int(len(pos)), "n_negative": int(len(neg))}
    return {"macro_auc": float(np.mean([v["auc"] for v in per.values()])) if per else None,
            "n_labels_scored": len(per), "per_label": per}


class LabelClassifier:
    def __init__(self, model: nn.Module, labels: list[str], cfg: LabelClassifierConfig, info: dict | None = None):
        self.model, self.labels, self.cfg, self.info = model.eval(), list(labels), cfg, dict(info or {})

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Probabilities [N, L] for uint8 [N, S, S] images."""
        device = next(self.model.parameters()).device
        self.model.eval()
        out = [torch.sigmoid(self.model(_as_input(images[i:i + batch_size], device))).float().cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.labels)), np.float32)

    def conformance(self, images: np.ndarray, prompts: list[str]) -> dict:
        """Per-label and macro AUC of the classifier on `images` against their prompts' labels."""
        if len(images) != len(prompts):
            raise ValueError(f"label conformance: {len(images)} images but {len(prompts)} prompts")
        return per_label_auc(self.predict(images), prompt_labels(prompts, self.labels), self.labels,
                             self.cfg.min_count)

    def save(self, out_dir: str) -> None:
        save_network(out_dir, NAME, self.model, {"labels": self.labels, "config": asdict(self.cfg), **self.info})


def load_label_classifier(path: str, device: str = "cpu") -> LabelClassifier:
    state, meta = load_network(path, NAME, "tools/train_label_classifier")
    where = os.path.join(path, f"{NAME}.json")
    cfg = network_config(LabelClassifierConfig, meta.pop("config", None), where)
    labels = meta.pop("labels", None)
    if not isinstance(labels, list) or not labels or not all(isinstance(v, str) for v in labels):
        raise ValueError(f"{where}: labels: expected a non-empty list of finding names")
    model = build_network(lambda: build_classifier(len(labels), cfg.width), state,
                          os.path.join(path, f"{NAME}.safetensors"), where)
    return LabelClassifier(model.to(device), labels, cfg, meta)


def train_label_classifier(train_images: np.ndarray, train_prompts: list[str], val_images: np.ndarray,
                           val_prompts: list[str], cfg: LabelClassifierConfig = LabelClassifierConfig(),
                           device: str = "cpu", progress: bool = True) -> LabelClassifier:
    """Train on real images with their prompts' labels; keep the epoch with the best validation loss."""
    labels = choose_labels(train_prompts, cfg.min_count)
    if not labels:
        raise ValueError(f"label classifier: no finding is named in >= {cfg.min_count} training prompts "
                         f"and absent from >= {cfg.min_count}")
    if len(val_images) < 2:
        raise ValueError(f"label classifier: need >= 2 validation images, got {len(val_images)}")
    torch.manual_seed(cfg.seed)
    model = build_classifier(len(labels), cfg.width).to(device)
    x, y = _as_input(train_images, device), torch.from_numpy(prompt_labels(train_prompts, labels)).to(device)
    vx, vy = _as_input(val_images, device), torch.from_numpy(prompt_labels(val_prompts, labels)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(x) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, best_epoch, history = math.inf, None, -1, []
    bar = tqdm(range(cfg.epochs), desc="label classifier", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            # Small random shifts: the generations are never pixel-aligned with the real images.
            shift = [int(v) for v in torch.randint(-2, 3, (2,), generator=gen)]
            loss = masked_bce(model(torch.roll(x[idx], shifts=shift, dims=(2, 3))), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(masked_bce(model(vx), vy))
        history.append({"epoch": epoch, "val_loss": val_loss})
        if val_loss < best:
            best, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(val=f"{val_loss:.3f}", best=best_epoch)
    model.load_state_dict(best_state)
    clf = LabelClassifier(model, labels, cfg, {"best_epoch": best_epoch, "best_val_loss": best, "history": history,
                                                "n_train": int(len(x)), "n_val": int(len(vx))})
    clf.info["validation"] = clf.conformance(val_images, val_prompts)
    return clf
