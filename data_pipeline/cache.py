"""Decode and resize every image once into a uint8 array, so training never decodes JPEGs twice.

Files in `cache_dir`: `images-<S>px-<digest>.npy` (uint8 [N, S, S]) and the matching `.json`
index (source paths, ok mask, skipped list). The digest covers the size and every source file's
path, byte size and modification time, so a changed source list, file or size builds a new cache.
Images are resized to S x S without cropping (like CheXpert baselines): aspect is not kept, but no
anatomy at the image borders (costophrenic angles) is cut away.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .atomic_files import atomic_path, write_json
from .records import XrayRecord

MIN_SIZE, MAX_SIZE = 32, 512
CACHE_VERSION = 1


@dataclasses.dataclass
class CachedImages:
    images: np.ndarray            # uint8 [N, S, S]; rows of unreadable images are zero
    ok: np.ndarray                # bool [N]
    skipped: list[str]            # "path: reason" for each unreadable image
    rebuilt: bool = False         # True when this call decoded the images (not loaded)
    path: str = ""                # the .npy file


def open_gray(img: Image.Image) -> Image.Image:
    """An opened image as 8-bit grayscale (RGBA/RGB converted, 16-bit scaled down to 8 bits)."""
    return img.convert("L") if img.mode != "I;16" else img.point(lambda v: v / 256).convert("L")


def decode_image(path: str, size: int) -> np.ndarray:
    """One image as uint8 [size, size] grayscale (RGBA/RGB/16-bit converted to 8-bit L)."""
    with Image.open(path) as img:
        img.draft("L", (size, size))      # JPEG: let the decoder downscale by 1/2..1/8 for free
        img = open_gray(img)
        img = img.resize((size, size), Image.BILINEAR)   # PIL's bilinear filter antialiases on reduction
        return np.asarray(img, dtype=np.uint8)


def _digest(paths: Sequence[str], size: int) -> str:
    h = hashlib.sha256(f"memdiff-cache-v{CACHE_VERSION}:{size}\n".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\tmissing\n".encode())
    return h.hexdigest()[:16]


def _try_decode(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return decode_image(path, size), None
    except Exception as e:   # PIL raises OSError, SyntaxError, ValueError... for broken files
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def load_or_build_cache(records: Sequence[XrayRecord] | Sequence[str], size: int, cache_dir: str,
                        progress: bool = True, workers: int | None = None) -> CachedImages:
    """Images of `records` (or of plain paths) at size x size, from the cache or decoded now."""
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"image_size: {size} is outside [{MIN_SIZE}, {MAX_SIZE}]")
    size = int(size)
    paths = [r if isinstance(r, str) else r.image_path for r in records]
    digest = _digest(paths, size)
    os.makedirs(cache_dir, exist_ok=True)
    stem = os.path.join(cache_dir, f"images-{size}px-{digest}")
    npy_path, index_path = stem + ".npy", stem + ".json"
    if os.path.isfile(npy_path) and os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                index = json.load(f)
            images = np.load(npy_path, mmap_mode="r")
            if index.get("paths") == paths and images.shape == (len(paths), size, size):
                return CachedImages(images, np.asarray(index["ok"], dtype=bool), index["skipped"], False, npy_path)
        except (OSError, ValueError, KeyError):
            pass   # a damaged cache is rebuilt below

    ok = np.zeros(len(paths), dtype=bool)
    skipped = []
    workers = workers or min(4, os.cpu_count() or 1)
    with atomic_path(npy_path) as tmp_npy:
        images = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(len(paths), size, size))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:   # PIL decodes without the GIL
            results = pool.map(lambda p: _try_decode(p, size), paths, chunksize=16)
            for i, (pixels, error) in enumerate(tqdm(results, total=len(paths), desc=f"cache {size}px",
                                                     unit="img", disable=not progress)):
                if pixels is None:
                    skipped.append(f"{paths[i]}: {error}")
                else:
                    images[i] = pixels
                    ok[i] = True
        images.flush()
        del images
    write_json(index_path, {"version": CACHE_VERSION, "size": size, "digest": digest, "paths": paths,
                            "ok": ok.tolist(), "skipped": skipped}, indent=None)
    return CachedImages(np.load(npy_path, mmap_mode="r"), ok, skipped, True, npy_path)
