"""CLIP image embeddings (open_clip) of 1-channel X-rays, for nearest-training-image search and t-SNE.

The model is any open_clip architecture name with a pretrained tag ("ViT-B-32", "laion2b_s34b_b79k"),
a local weights file (pretrained="/path/to/weights.pt" or .safetensors), or a hub name such as
"hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" for users with network. Nothing is
downloaded unless such a name is asked for. pretrained=None gives random initialisation: the numbers
then only exercise the pipeline, and reports say so.

TINY_MODEL ("memdiff-tiny") is a 2-layer ViT built without any weights for tests and the CPU demo.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.images import image_tensor
from engine.model.network_files import file_sha1

log = logging.getLogger(__name__)

TINY_MODEL = "memdiff-tiny"


@dataclass(frozen=True)
class ClipSpec:
    model_name: str = "ViT-B-32"
    pretrained: str | None = None          # tag, local file, or None (random init)
    image_size: int | None = None          # force the tower's input size (e.g. 64 for fast CPU runs)

    @property
    def is_random(self) -> bool:
        return self.pretrained is None

    def cache_key(self) -> str:
        """Names the weights exactly: a local file contributes its size and mtime-free content hash."""
        weights = self.pretrained or "random-init"
        if self.pretrained and os.path.isfile(self.pretrained):
            weights = "file:" + file_sha1(self.pretrained)
        return f"clip:{self.model_name}:{weights}:{self.image_size}"


def _tiny_clip() -> torch.nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text)


class ClipEmbedder:
    """Unit-norm CLIP image embeddings of [N, S, S] uint8 or [N, 1, S, S] [-1, 1] images."""

    def __init__(self, spec: ClipSpec = ClipSpec(), device: str = "cpu", seed: int = 0) -> None:
        import open_clip
        self.spec, self.device = spec, torch.device(device)
        # Random initialisation must be reproducible so cached embeddings stay valid across runs.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if spec.model_name == TINY_MODEL:
                if spec.pretrained is not None:
                    raise ValueError(f"clip: {TINY_MODEL} has no pretrained weights (got {spec.pretrained!r})")
                model = _tiny_clip()
                mean, std, size = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32
            else:
                kwargs = {"force_image_size": spec.image_size} if spec.image_size else {}
                if spec.pretrained and not os.path.isfile(spec.pretrained) and os.sep in spec.pretrained:
                    raise ValueError(f"clip: weights file {spec.pretrained!r} does not exist")
                model = open_clip.create_model(spec.model_name, pretrained=spec.pretrained, **kwargs)
                cfg = open_clip.get_model_preprocess_cfg(model)
                mean, std, size = cfg["mean"], cfg["std"], cfg["size"]
                size = size[0] if isinstance(size, (tuple, list)) else size
        if spec.is_random:
            log.warning("CLIP %s is randomly initialised: its similarities are not semantically meaningful",
                        spec.model_name)
        self.model = model.to(self.device).eval()
        self.size = int(spec.image_size or size)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            x = images.float() / 255.0
        else:
            x = (images.float() + 1) / 2
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = x.to(self.device)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std   # grey -> RGB by repetition

    @torch.no_grad()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):   # batch by batch: a memory-mapped set is not read whole
            e = self.model.encode_image(self._prepare(image_tensor(images[i:i + batch_size]))).float()
            out.append(F.normalize(e, dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
