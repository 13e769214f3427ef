"""Resumable training checkpoints that an interrupted write can never break.

    <run>/checkpoints/latest                 the tag of the newest complete checkpoint (one line)
    <run>/checkpoints/step_00000500/         DeepSpeed's files (model, optimizer shards, scheduler)
                                 ema.safetensors     the EMA weights (rank 0)
                                 trainer_state.json  step counters; written last = "complete"

A checkpoint is written under a temporary tag, completed, renamed to its final tag (a directory
rename is atomic) and only then named in `latest` (tmp file + os.replace). A crash at any point
leaves `latest` naming the previous good checkpoint. Older checkpoints beyond `keep` are pruned
after the switch.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import load_file, save_file

from data_pipeline.atomic_files import write_json, write_text
from engine.training.ema import EMA

LATEST = "latest"
STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
TMP_PREFIX = "tmp_"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    """The tag named by `latest` if that checkpoint is complete, else None."""
    ckpt_dir = Path(ckpt_dir)
    try:
        tag = (ckpt_dir / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    if not tag or not (ckpt_dir / tag / STATE).is_file():
        raise RuntimeError(f"{ckpt_dir / LATEST}: names {tag!r}, which is not a complete checkpoint")
    return tag


def save_checkpoint(engine, ckpt_dir: str | os.PathLike, step: int, ema: EMA, state: dict, keep: int,
                    rank: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    final_tag, tmp_tag = tag_for(step), TMP_PREFIX + tag_for(step)
    final = ckpt_dir / final_tag
    if final.is_dir() and (final / STATE).is_file():
        return final  # this exact step is already saved (a resumed run re-reaching it)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)  # a previous interrupted attempt
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={}, save_latest=False)
    _barrier()
    if rank == 0:
        tmp = ckpt_dir / tmp_tag
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(tmp / EMA_FILE))
        write_json(tmp / STATE, {**state, "step": step}, indent=2, fsync=True)
        if final.exists():
            shutil.rmtree(final)  # an incomplete directory of the same name (no STATE): not a checkpoint
        os.replace(tmp, final)
        write_text(ckpt_dir / LATEST, final_tag + "\n", fsync=True)
        _prune(ckpt_dir, keep, final_tag)
    _barrier()
    return final


def _prune(ckpt_dir: Path, keep: int, newest: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for tag in tags[:-keep] if keep > 0 else []:
        if tag != newest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: str | os.PathLike, tag: str, ema: EMA, rank: int) -> dict:
    """Collective: restore model, optimizer, scheduler and (on rank 0) the EMA; returns the trainer state."""
    ckpt_dir = Path(ckpt_dir)
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    if rank == 0:
        ema.load_state_dict(load_file(str(ckpt_dir / tag / EMA_FILE)))
    return json.loads((ckpt_dir / tag / STATE).read_text())
