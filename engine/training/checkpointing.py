"""Resumable training checkpoints that an interrupted write, a damaged file or a folder someone
sent can never turn into a wrong, lost or unsafe resume.

    <run>/checkpoints/latest                 the tag of the newest complete checkpoint (one line)
    <run>/checkpoints/step_00000500/         DeepSpeed's files (model, optimizer shards, scheduler)
                                 ema.safetensors     the EMA weights (rank 0)
                                 trainer_state.json  step counters (and the privacy accountant under DP)
                                 manifest.json       byte size and SHA-256 of every file above; written
                                                     last, so it also means "complete"

Writing: under a temporary tag, completed, manifest last (fsync), renamed to its final tag (a
directory rename is atomic) and only then named in `latest` (tmp file + os.replace). A crash at any
point leaves `latest` naming the previous good checkpoint. A folder of the same step that already
exists (a resumed run re-reaching it, a damaged one) is replaced by the new one.

Resuming: `latest`'s checkpoint if its files match its manifest, else the newest one that does,
with a one-line warning naming what is damaged (truncated file, broken JSON, empty `latest`). The
manifest gives integrity, not authenticity: anyone can write matching digests. So loading never
runs anything from the files either: DeepSpeed's pickles are read weights-only
(engine.training.weights_only), the EMA is safetensors, the trainer state is JSON checked key by key.

Deleting (pruning beyond `keep`, replacing, cleaning an interrupted write): only files our manifest
lists or that carry the names DeepSpeed and we give checkpoint files. A folder that still holds
anything else (a user's file) is left in place with a warning; nothing a user owns is deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data_pipeline.atomic_files import write_json, write_text
from engine.training.ema import EMA
from engine.training.weights_only import UnsafeCheckpointFile, weights_only_loads

LATEST = "latest"
STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "memdiff-checkpoint"
TMP_PREFIX = "tmp_"
TAG_RE = re.compile(r"step_(\d{8})")
# The files a checkpoint folder holds by name: DeepSpeed's (model / optimizer states per rank, any
# ZeRO stage, bf16), ours, and atomic_files' temporary names. Only these, or what a manifest lists,
# are ever deleted.
OUR_FILES = re.compile(r"(?:(?:bf16_)?(?:zero_pp_rank_\d+_)?mp_rank_\d+_(?:model|optim)_states\.pt"
                       r"|ema\.safetensors|trainer_state\.json|manifest\.json|\..+\.tmp\d+\..+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written; the message is one line naming the file."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(TAG_RE.fullmatch(tag).group(1))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- manifest (integrity)

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    """Size and digest of every file under `folder` (DeepSpeed's and ours), written last with fsync."""
    files = {}
    for path in sorted(_files(folder)):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    write_json(folder / MANIFEST, {"format": MANIFEST_FORMAT, "version": 1, "step": step, "files": files},
               indent=1, fsync=True)


def _inside(folder: Path, rel: object) -> Path | None:
    """`folder/rel` when rel is a plain relative path that stays inside folder, else None."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return None
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return None
    return folder / rel


def read_manifest(folder: Path) -> dict:
    """The manifest's {relative path: {"bytes", "sha256"}}; CheckpointError if it is missing or malformed."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST} (incomplete, or not written by memdiff)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / MANIFEST}: unreadable ({str(exc).splitlines()[0][:80]})") from None
    files = data.get("files") if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None
    if not isinstance(files, dict) or data.get("step") != step_of(folder.name):
        raise CheckpointError(f"{folder / MANIFEST}: not a memdiff checkpoint manifest for {folder.name}")
    for rel, entry in files.items():
        if _inside(folder, rel) is None or not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) \
                or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"{folder / MANIFEST}: bad entry {str(rel)[:60]!r}")
    return files


def verify(folder: Path) -> str | None:
    """None if every file the manifest lists is there, a regular file, of its size and digest; else
    what is wrong, in a few words naming the file."""
    try:
        files = read_manifest(folder)
    except CheckpointError as exc:
        return str(exc)
    for rel in (STATE, EMA_FILE):
        if rel not in files:
            return f"{folder / MANIFEST}: does not list {rel}"
    for rel, entry in files.items():
        path = folder / rel
        if path.is_symlink() or not path.is_file():
            return f"{path}: missing or not a regular file"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{path}: {size} bytes, the checkpoint wrote {entry['bytes']} (truncated or changed)"
        if _sha256(path) != entry["sha256"]:
            return f"{path}: content differs from what the checkpoint wrote"
    return None


# ----------------------------------------------------------------------------- which checkpoint

def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """Every step_XXXXXXXX folder, newest first (complete or not)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.fullmatch(p.name)), reverse=True)


def holds_checkpoints(ckpt_dir: Path) -> bool:
    return bool(checkpoint_tags(ckpt_dir)) or (ckpt_dir / LATEST).exists()


def choose_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The tag to resume from: `latest`'s if intact, else the newest intact one (with a one-line
    warning per damaged one); None when there is no checkpoint; CheckpointError when none is intact."""
    ckpt_dir = Path(ckpt_dir)
    tags = checkpoint_tags(ckpt_dir)
    try:
        named = (ckpt_dir / LATEST).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        named = None
    except (OSError, ValueError):
        named = ""
    if named is None and not tags:
        return None
    order = tags
    if named is not None:
        if named in tags:
            order = [named] + [t for t in tags if t != named]
        else:
            warn(f"{ckpt_dir / LATEST}: names {named[:40]!r}, which is not a checkpoint folder here; "
                 f"using the newest intact checkpoint")
    problems = []
    for tag in order:
        problem = verify(ckpt_dir / tag)
        if problem is None:
            if problems:
                warn(f"{problems[0]}; resuming from {ckpt_dir / tag} instead")
            return tag
        problems.append(problem)
    raise CheckpointError(f"{ckpt_dir}: no intact checkpoint to resume from ({'; '.join(problems[:3])}); "
                          f"move the folder aside or train into a new output_dir")


# ----------------------------------------------------------------------------- deleting only what is ours

def _files(folder: Path) -> list[Path]:
    """Every file (or symlink) under `folder`, without following symlinked folders out of it."""
    return [Path(root) / name for root, dirs, names in os.walk(folder)
            for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]]


def discard(folder: Path) -> list[str]:
    """Delete the checkpoint files in `folder` (listed in its manifest or named as ours), then the
    folder if nothing else is left. Returns what is left (files memdiff did not write)."""
    if not folder.is_dir() or folder.is_symlink():
        return []
    try:
        listed = {folder / rel for rel in read_manifest(folder)}
    except CheckpointError:
        listed = set()
    for path in _files(folder):
        if not path.is_symlink() and (path in listed or OUR_FILES.fullmatch(path.name)):
            path.unlink()
    left = sorted(os.listdir(folder))
    if not left:
        folder.rmdir()
    return left


def _move_into(src: Path, dest: Path) -> None:
    """Move a complete checkpoint from `src` into an existing folder `dest` file by file, manifest
    last (so `dest` is complete only once every file is in place); used when dest keeps a user's file."""
    for path in sorted(p for p in _files(src) if p.name != MANIFEST):
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    os.replace(src / MANIFEST, dest / MANIFEST)
    discard(src)


def _prune(ckpt_dir: Path, keep: int, newest: str) -> None:
    """Drop our checkpoints older than the newest `keep`: only folders with our manifest."""
    ours = [t for t in sorted(checkpoint_tags(ckpt_dir)) if (ckpt_dir / t / MANIFEST).is_file()]
    for tag in ours[:-keep] if keep > 0 else []:
        if tag != newest:
            left = discard(ckpt_dir / tag)
            if left:
                warn(f"{ckpt_dir / tag}: kept, it holds files memdiff did not write ({', '.join(left[:3])})")


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(engine, ckpt_dir: str | os.PathLike, step: int, ema: EMA, state: dict, keep: int,
                    rank: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    final_tag, tmp_tag = tag_for(step), TMP_PREFIX + tag_for(step)
    final, tmp = ckpt_dir / final_tag, ckpt_dir / tmp_tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        left = discard(tmp)  # a previous interrupted attempt
        if left:
            raise CheckpointError(f"{tmp}: holds files memdiff did not write ({', '.join(left[:3])}); move them")
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={}, save_latest=False)
    _barrier()
    if rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(tmp / EMA_FILE))
        write_json(tmp / STATE, {**state, "step": step}, indent=2, fsync=True)
        write_manifest(tmp, step)
        if final.exists() and discard(final):
            _move_into(tmp, final)   # the old folder keeps a user's file: fill it rather than delete it
        else:
            os.replace(tmp, final)
        write_text(ckpt_dir / LATEST, final_tag + "\n", fsync=True)
        _prune(ckpt_dir, keep, final_tag)
    _barrier()
    return final


def read_state(ckpt_dir: Path, tag: str) -> dict:
    """trainer_state.json of a checkpoint, checked: an object whose step is the tag's."""
    path = ckpt_dir / tag / STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(state, dict) or state.get("step") != step_of(tag):
        raise CheckpointError(f"{path}: expected an object with \"step\": {step_of(tag)}")
    return state


def load_checkpoint(engine, ckpt_dir: str | os.PathLike, tag: str, ema: EMA, rank: int) -> dict:
    """Collective: restore model, optimizer, scheduler and (on rank 0) the EMA; returns the trainer state.
    `tag` comes from choose_checkpoint (verified against its manifest)."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir, tag)
    try:
        with weights_only_loads():
            path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    except UnsafeCheckpointFile as exc:
        raise CheckpointError(str(exc)) from None
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load it ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    if path is None:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    if rank == 0:
        try:
            ema.load_state_dict(load_file(str(ckpt_dir / tag / EMA_FILE)))
        except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
            raise CheckpointError(f"{ckpt_dir / tag / EMA_FILE}: does not fit the model "
                                  f"({str(exc).splitlines()[0][:120]})") from None
    return state
