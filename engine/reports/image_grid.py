"""Image grids and labelled panels for people to look at (sample grids, run comparisons)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from data_pipeline.atomic_files import atomic_path
from engine.reports.figures import pyplot


def tile(images: np.ndarray, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 [rows, cols, S, S] -> one uint8 image with `pad` pixels between tiles."""
    rows, cols, h, w = images.shape
    out = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad), pad_value, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            out[y:y + h, x:x + w] = images[r, c]
    return out


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    pyplot().close(fig)
    return path


def panels_figure(panels: Sequence[tuple[str, np.ndarray]], row_labels: Sequence[str] = (), title: str = ""):
    """Side-by-side tiled grids (each uint8 [rows, cols, S, S]) with a title per panel.

    Row labels (prompts) are printed once, left of the first panel.
    """
    plt = pyplot()
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
