"""Choosing tau for Wen's training-time screening from a trained (baseline or warm-up) run.

Screening (engine.training.screening) drops a training example from the loss when
L = ||eps(x_t, y) - eps(x_t, null)|| at its own random t exceeds tau (config `screening.tau`, units
rms = per element). Here L is computed for every training record of a run at several seeded t, as the
trainer would see it (engine.training.screening.magnitude_profile), and tau is read off at a quantile,
with the share it would drop per t band and — when the run has planted duplicates — for planted copies
against all other examples, so the choice is made on measured numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.images import to_model_range
from engine.audit.prompt_lists import PromptList, encode_prompts
from engine.audit.run_data import load_split_cache, read_splits
from engine.diffusion.finite import model_source, require_finite
from engine.training.screening import magnitude_profile


@dataclass
class TrainingExamples:
    """Every record of a run's training split (planted copies count as often as they were trained on)."""
    x0: torch.Tensor          # [N, 1, S, S] in [-1, 1]
    tokens: torch.Tensor      # [N, L]
    image_paths: list[str]


def load_training_examples(run_dir: str, vocab) -> TrainingExamples:
    """The training records of a run, encoded with the model's vocabulary; a one-line error naming the
    split file when a prompt is unknown or an image cannot be read."""
    splits = read_splits(run_dir)
    records = splits["splits"]["train"]
    tokens = encode_prompts(vocab, PromptList([r["prompt"] for r in records],
                                              [f"{splits['path']}:train[{i}]" for i in range(len(records))]))
    paths = [r["image_path"] for r in records]
    cache = load_split_cache(splits, paths, progress=False)
    if not np.asarray(cache.ok).all():
        raise ValueError(f"{splits['path']}: some training images cannot be read")
    return TrainingExamples(to_model_range(np.array(cache.images)), tokens, paths)


def per_band_drops(ts: torch.Tensor, mag: torch.Tensor, tau: float, num_timesteps: int, bands: int,
                   planted: torch.Tensor) -> list[dict]:
    """Per t band [lo, hi): the share of (example, t) draws above tau, the median L and, when some
    examples are planted copies, the share for planted copies and for the others."""
    drop = mag > tau
    edges = np.linspace(0, num_timesteps, bands + 1).astype(int)
    per_band = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (ts >= lo) & (ts < hi)
        row = {"t": [int(lo), int(hi)], "dropped": float(drop[m].float().mean()) if m.any() else None,
               "median_L": float(mag[m].median()) if m.any() else None}
        if planted.any():
            mp, mo = m & planted[:, None], m & ~planted[:, None]
            row["dropped_planted"] = float(drop[mp].float().mean()) if mp.any() else None
            row["dropped_other"] = float(drop[mo].float().mean()) if mo.any() else None
        per_band.append(row)
    return per_band


def screening_threshold(loaded, examples: TrainingExamples, manifest: dict | None, *, checkpoint: str,
                        quantile: float = 0.99, draws: int = 4, seed: int = 0, bands: int = 5) -> dict:
    """tau at `quantile` of L (rms) over the run's (example, t) draws and what it would drop (JSON-able)."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile: expected a number in (0, 1), got {quantile}")
    ts, mag = magnitude_profile(loaded.model, loaded.schedule, examples.x0, examples.tokens, draws=draws, seed=seed,
                                parameterization=loaded.diffusion_config.parameterization)
    require_finite(mag, f"{model_source(loaded.model)}: the conditional-noise magnitudes of the training examples")
    tau = float(torch.quantile(mag.flatten(), quantile))
    planted_paths = {e["image_path"] for e in (manifest or {}).get("planted", [])}
    planted = torch.tensor([p in planted_paths for p in examples.image_paths])
    drop = mag > tau
    doc = {"checkpoint": checkpoint, "quantile": quantile, "draws": draws, "seed": seed, "tau_rms": tau,
           "n_examples": len(examples.image_paths), "dropped": float(drop.float().mean()),
           "per_t_band": per_band_drops(ts, mag, tau, loaded.schedule.num_timesteps, bands, planted)}
    if planted.any():
        doc["dropped_planted"] = float(drop[planted].float().mean())
        doc["dropped_other"] = float(drop[~planted].float().mean())
    return doc


def summary_lines(doc: dict) -> list[str]:
    """The document for a terminal: tau as a config snippet, the overall and per-band drop rates."""
    planted = "dropped_planted" in doc
    lines = [f"tau (rms) at quantile {doc['quantile']}: {doc['tau_rms']:.6g}  -> screening: "
             f"{json.dumps({'enabled': True, 'tau': round(doc['tau_rms'], 6), 'units': 'rms'})}",
             f"drops {doc['dropped']:.1%} of (example, t) draws" + (
                 f"; planted copies {doc['dropped_planted']:.1%}, other examples {doc['dropped_other']:.1%}"
                 if planted else "")]
    for row in doc["per_t_band"]:
        extra = (f"  planted {row['dropped_planted']:.1%}  other {row['dropped_other']:.1%}"
                 if planted and row.get("dropped_planted") is not None else "")
        lines.append(f"  t in [{row['t'][0]:4d}, {row['t'][1]:4d}): median L {row['median_L']:.4g}  "
                     f"dropped {row['dropped']:.1%}{extra}")
    return lines
