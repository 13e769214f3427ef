"""Whose folder is output_dir: a training run writes only into a folder that is new, empty or
already one of its runs, and continues a run only with the config it was started with.

    <run>/memdiff_run.json   written first into a new or empty folder: "this folder is a memdiff run"

Without the marker a non-empty folder is someone else's (a thesis, another tool's output, a run of
another program): training refuses it rather than overwrite config.json, append to metrics.jsonl
or prune files under checkpoints/. With it, every file memdiff writes there is its own.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from data_pipeline.atomic_files import write_json, write_text
from engine.training.checkpointing import choose_checkpoint, holds_checkpoints
from engine.training.config import TrainConfig, resolved_json

RUN_MARKER = "memdiff_run.json"
RUN_FORMAT = "memdiff-run"
# The sections a resumed run must share with the run it continues (others, e.g. training.steps, may change).
FIXED_ON_RESUME = ("model", "diffusion", "data", "conditioning",
                   "dp")  # dp: the accountant assumes one (sigma, q) for the whole run
# Keys inside those sections that may change: where things live, not what they are.
FREE_ON_RESUME = ("data.cache_dir",)


class RunDirError(ValueError):
    """output_dir cannot be used for this run; one line naming the folder."""


def is_our_run(run_dir: Path) -> bool:
    try:
        marker = json.loads((run_dir / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == RUN_FORMAT


def _diff_sections(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first key (dotted) whose value differs between two config trees, or None."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        where = f"{prefix}.{key}" if prefix else key
        if where in FREE_ON_RESUME:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found = _diff_sections(a, b, where)
            if found:
                return found
        elif a != b:
            return f"{where} ({json.dumps(a)[:60]} in the run, {json.dumps(b)[:60]} now)"
    return None


def check_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool) -> str | None:
    """Rank 0, before any work: the checkpoint tag to resume from (None = fresh start). Refuses a
    folder that is not ours, a second run into a run folder, and a resume with a changed config."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: output_dir is a file, expected a folder")
    entries = sorted(os.listdir(run_dir)) if run_dir.is_dir() else []
    if entries and not is_our_run(run_dir):
        shown = ", ".join(e[:40] for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RunDirError(f"{run_dir}: output_dir holds files that are not from a memdiff run ({shown}; no "
                          f"{RUN_MARKER}); train into a new or empty folder")
    ckpt_dir = run_dir / "checkpoints"
    if not holds_checkpoints(ckpt_dir):
        return None
    if not resume:
        raise RunDirError(f"{run_dir}: already holds checkpoints; pass --resume auto to continue it or choose "
                          f"another output_dir")
    tag = choose_checkpoint(ckpt_dir)
    saved = run_dir / "config.json"
    try:
        old = json.loads(saved.read_text(encoding="utf-8"))
        assert isinstance(old, dict)
    except (OSError, ValueError, AssertionError):
        raise RunDirError(f"{saved}: missing or unreadable, so this run cannot be continued safely") from None
    new = json.loads(resolved_json(cfg))
    for section in FIXED_ON_RESUME:
        diff = _diff_sections({section: old.get(section)}, {section: new.get(section)})
        if diff:
            raise RunDirError(f"{run_dir}: cannot resume, the config changed at {diff}")
    return tag


def claim_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    """Rank 0, after check_run_dir: mark the folder as ours (first write: a read-only folder fails
    here, before any data is read) and save the resolved config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_our_run(run_dir):
        write_json(run_dir / RUN_MARKER, {"format": RUN_FORMAT, "version": 1,
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2)
    write_text(run_dir / "config.json", resolved_json(cfg))
