"""Image grids and labelled panels for people to look at (sample grids, run comparisons)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], [..., 1, S, S] -> uint8 [..., S, S]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.squeeze(-3).numpy()


def tile(images: np.ndarray, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 [rows, cols, S, S] -> one uint8 image with `pad` pixels between tiles."""
    rows, cols, h, w = images.shape
    out = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad), pad_value, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            out[y:y + h, x:x + w] = images[r, c]
    return out


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 grayscale image atomically."""
    path = Path(path)
    tmp = _atomic_target(path)
    Image.fromarray(image, mode="L").save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt
    path = Path(path)
    tmp = _atomic_target(path)
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def panels_figure(panels: Sequence[tuple[str, np.ndarray]], row_labels: Sequence[str] = (), title: str = ""):
    """Side-by-side tiled grids (each uint8 [rows, cols, S, S]) with a title per panel.

    Row labels (prompts) are printed once, left of the first panel.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tiles = [tile(grid) for _, grid in panels]
    width = sum(t.shape[1] for t in tiles) / 60 + (4.5 if row_labels else 0.5)
    height = max(t.shape[0] for t in tiles) / 60 + 0.9
    fig, axes = plt.subplots(1, len(tiles), figsize=(max(width, 4), max(height, 2)), squeeze=False)
    for i, (ax, (name, grid), image) in enumerate(zip(axes[0], panels, tiles)):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        rows, _, h, _ = grid.shape
        if i == 0 and row_labels:
            ax.set_yticks([2 + r * (h + 2) + h / 2 for r in range(rows)])
            ax.set_yticklabels([_wrap(label) for label in row_labels], fontsize=6)
        else:
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10, y=1.04)
    return fig


def _wrap(text: str, width: int = 48) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:3])
