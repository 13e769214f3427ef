"""Which training images (which patients) a model reproduces: the auditor's question behind flagged prompts.

A label prompt ("frontal AP chest x-ray, female, 60s: edema") covers many training images, so "this prompt
is memorized" does not say whose image leaks. For every flagged prompt, each of its generations is
matched to its nearest training image by pixel Pearson correlation (no learned model); a generation above
the copy threshold reproduces that image. Aggregated per training image: its path, its patient, how many
generations reproduce it, and by which prompts.

The copy threshold is the project's one pixel copy rule (engine.audit.copy_rule.pixel_copy_threshold: Dar et
al.'s rule in pixel space, methods.md section 2): the 95th percentile, over training images, of their highest
correlation to any held-out image, i.e. a similarity that only 5% of training images reach with an image the
model never saw.
"""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_pipeline.atomic_files import atomic_path
from engine.audit.detectors.nearest_training import TrainingNeighbours

EXPOSURE_SCHEMA = pa.schema([
    ("image_path", pa.string()), ("patient_id", pa.string()), ("times_reproduced", pa.int64()),
    ("n_prompts", pa.int64()), ("prompts", pa.list_(pa.string())), ("max_correlation", pa.float64()),
    ("mean_correlation", pa.float64()),
])
META_KEY = b"memdiff_exposure"


def exposed_training_images(prompts: list[str], generations: torch.Tensor, train: TrainingNeighbours,
                            threshold: float, patient_ids: dict[str, str] | None = None) -> list[dict]:
    """Per training image reproduced by the flagged prompts' generations [P, G, 1, S, S] (in [-1, 1]): one
    row (EXPOSURE_SCHEMA's fields), most reproduced first (ties: higher correlation first, then path)."""
    if generations.shape[0] != len(prompts):
        raise ValueError(f"exposure: {len(prompts)} prompts but generations for {generations.shape[0]}")
    if len(prompts) == 0:
        return []
    g = generations.shape[1]
    values, index = train.nearest_by_correlation(generations.float().flatten(0, 1), 1)
    hits: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for flat, (v, i) in enumerate(zip(values[:, 0].tolist(), index[:, 0].tolist())):
        if v > threshold:
            hits[i].append((flat // g, v))
    rows = []
    for i, events in hits.items():
        path = train.paths[i]
        corr = [v for _, v in events]
        prompt_ids = sorted({p for p, _ in events})
        rows.append({"image_path": path, "patient_id": (patient_ids or {}).get(path),
                     "times_reproduced": len(events), "n_prompts": len(prompt_ids),
                     "prompts": [prompts[p] for p in prompt_ids], "max_correlation": float(max(corr)),
                     "mean_correlation": float(np.mean(corr))})
    rows.sort(key=lambda r: (-r["times_reproduced"], -r["max_correlation"], r["image_path"]))
    return rows


def write_exposure(rows: list[dict], path: str, meta: dict) -> pa.Table:
    """The exposure table as Parquet (atomically), `meta` (threshold, counts) in the schema metadata."""
    table = pa.Table.from_pylist(rows, schema=EXPOSURE_SCHEMA).replace_schema_metadata(
        {META_KEY: json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return table


def patient_ids(splits: dict, split: str = "train") -> dict[str, str]:
    """image path -> patient id, from a run's splits.json (engine.audit.run_data.read_splits)."""
    return {r["image_path"]: r.get("patient_id") for r in splits["splits"].get(split, [])}
