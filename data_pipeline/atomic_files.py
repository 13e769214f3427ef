"""Every file memdiff writes appears whole or not at all: written beside its final name, then renamed.

A reader, a resumed job or a crash never sees half a file (os.replace is atomic on one file
system). This module is the one owner of that convention; data_pipeline holds it because it is the
lowest layer that writes files, and engine and tools import it from here.
"""
from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary file name beside `path` for writers that want a name (Parquet, safetensors, PIL,
    matplotlib, np.save); it replaces `path` when the block ends without error and is removed otherwise.

    The temporary name keeps the suffix, so writers that infer a format from it (PIL, matplotlib,
    np.save's ".npy") behave as they would on the final name. `fsync` flushes the file to disk first
    (checkpoints: the rename must not reach the disk before the data does).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def check_writable(folder: str | os.PathLike) -> None:
    """Raise OSError naming `folder` unless files can be created in it, or, when it does not exist
    yet, in its nearest existing parent (where it would be made). Called before long work, so an
    unwritable output fails in seconds, not after hours; nothing is written by the check."""
    path = Path(folder).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{existing} is not a folder", str(path))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot write into {existing}" if existing != path
                              else "Permission denied", str(path))


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists (json cannot encode them)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, allow_nan: bool = True,
               fsync: bool = False) -> Path:
    """`obj` as JSON; numpy values become plain numbers. allow_nan=False refuses NaN/inf (reports that
    must stay valid JSON for other readers)."""
    return write_text(path, json.dumps(obj, indent=indent, allow_nan=allow_nan, default=_plain), fsync=fsync)
