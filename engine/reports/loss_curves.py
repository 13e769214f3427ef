"""Loss curves of training runs: read back from a run's metrics.jsonl and drawn for people.

The trainer's logger (engine.training.run_logger) writes one JSON object per logged step into
`<run>/metrics.jsonl`; this module reads it and plots one or several runs' losses.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

from engine.reports.figures import pyplot
from engine.reports.image_grid import save_figure

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] without one). Each must be an object with an integer
    "step" and, when it has one, a numeric "loss": the file may come from anyone, and its values end
    up in plots and pages. A bad line is a one-line error naming the file and line."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}:{number}: not a JSON line ({type(e).__name__})") from None
        if not isinstance(row, dict) or not _is_int(row.get("step")) or not _is_number(row.get("loss", 0.0)):
            raise ValueError(f"{path}:{number}: expected an object with an integer \"step\" and a numeric \"loss\"")
        rows.append(row)
    return rows


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def smooth(values: Sequence[float], half_width: int | None = None) -> list[float]:
    """Centred geometric running mean of positive losses. A trailing average (TensorBoard's slider)
    lags: over the first few hundred steps, when the loss falls tenfold, it drew the smoothed line
    several times above every logged value, and two runs' early curves looked alike however they
    differed. Centred in log space, a loss that falls exponentially is drawn exactly where it is; the
    window narrows symmetrically at both ends so the first and last points stay centred."""
    n = len(values)
    h = max(1, n // 40) if half_width is None else half_width
    logs = [math.log(v) for v in values]
    prefix = [0.0]
    for v in logs:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(n):
        k = min(h, i, n - 1 - i)
        out.append(math.exp((prefix[i + k + 1] - prefix[i - k]) / (2 * k + 1)))
    return out


def plot_loss_curves(curves: dict[str, list[dict]], path: str | os.PathLike, title: str = "training loss") -> Path:
    """One line per run (raw faint, smoothed solid), log-scale loss."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for i, (name, rows) in enumerate(curves.items()):
        rows = [r for r in rows if "loss" in r and math.isfinite(r["loss"]) and r["loss"] > 0]   # log axis
        if not rows:
            continue
        steps, loss = [r["step"] for r in rows], [r["loss"] for r in rows]
        color = f"C{i}"
        ax.plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(loss), color=color, linewidth=1.6, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (MSE on the noise)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        ax.legend()
    return save_figure(fig, path)
