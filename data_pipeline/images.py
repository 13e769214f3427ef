"""The image convention: uint8 [.., S, S] on disk and in caches, float [-1, 1] [.., 1, S, S] in the engine.

One owner for the scaling both ways (x = u8 / 127.5 - 1; u8 = round((clamp(x) + 1) * 127.5)) and
for PNG files, so every loader, sampler, audit and report reads and writes the same pixels.
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from .atomic_files import atomic_path


def image_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """An image batch as a tensor, sharing memory where torch can: a read-only array (a memory-mapped cache)
    is copied, because torch cannot wrap non-writable memory (it warns and the tensor would be unsafe)."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = np.array(images)
    return torch.as_tensor(images)


def to_model_range(images_u8: np.ndarray | torch.Tensor, channel_dim: bool = True) -> torch.Tensor:
    """uint8 [..., S, S] -> float32 [..., 1, S, S] in [-1, 1] (no channel axis added with channel_dim=False)."""
    x = image_tensor(images_u8).to(torch.float32) / 127.5 - 1.0
    return x.unsqueeze(-3) if channel_dim else x


def to_uint8(images: torch.Tensor, channel_dim: bool = True) -> np.ndarray:
    """float [..., 1, S, S] in [-1, 1] -> uint8 [..., S, S] on the CPU (values outside are clamped)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return (x.squeeze(-3) if channel_dim else x).numpy()


def png_bytes(image_u8: np.ndarray) -> bytes:
    """A uint8 grayscale [S, S] image as PNG bytes (for inlining in HTML)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image_u8, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: str | os.PathLike, image_u8: np.ndarray) -> None:
    """Write a uint8 grayscale [S, S] image as a PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image_u8, np.uint8)).save(tmp, format="PNG")


def read_png(path: str | os.PathLike) -> np.ndarray:
    """A PNG (any mode) as uint8 grayscale [S, S]."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)
