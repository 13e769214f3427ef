"""What a training run shows a person, written on rank 0 only.

    <run>/metrics.jsonl      one JSON object per logged step (loss, lr, grad_norm, images/s, ...)
    <run>/tensorboard/       the same scalars plus the sample grids
    <run>/loss_curve.png     loss against step (raw and smoothed)
    <run>/samples/step_XXXXXXXX.png   sample grids (prompts x seeds, one panel per guidance weight)
plus a tqdm progress bar with ETA on stderr.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from data_pipeline.atomic_files import write_text
from engine.reports.image_grid import panels_figure, save_figure
from engine.reports.loss_curves import METRICS, plot_loss_curves, read_metrics


class RunLogger:
    """Rank 0's metrics sinks. Other ranks construct it with enabled=False and every call is a no-op."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool, progress: bool) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.writer = None
        self.bar = None
        if not enabled:
            return
        self._truncate_after(start_step)
        self.metrics = open(self.run_dir / METRICS, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not progress,
                        dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint we resume from (they will be redone)."""
        rows = read_metrics(self.run_dir)
        kept = [r for r in rows if r.get("step", 0) <= step]
        if len(kept) != len(rows):
            write_text(self.run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in kept))

    def advance(self, steps: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def write(self, message: str) -> None:
        """A line that does not break the progress bar."""
        if self.enabled:
            tqdm.write(message)

    def loss_curve(self, title: str) -> Path | None:
        if not self.enabled:
            return None
        return plot_loss_curves({title: read_metrics(self.run_dir)}, self.run_dir / "loss_curve.png", title)

    def sample_grid(self, step: int, panels: list[tuple[str, np.ndarray]], prompts: Sequence[str]) -> Path | None:
        """panels: (title, uint8 [prompts, seeds, S, S]) per guidance weight."""
        if not self.enabled:
            return None
        fig = panels_figure(panels, prompts, title=f"step {step}")
        path = save_figure(fig, self.run_dir / "samples" / f"step_{step:08d}.png")
        if self.writer is not None:
            from engine.reports.image_grid import tile
            for name, grid in panels:
                self.writer.add_image(f"samples/{name}", tile(grid)[None], step)
        return path

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.metrics.close()
