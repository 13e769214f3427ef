"""Top-k nearest training items for many queries, in chunks, and an on-disk embedding cache.

The similarity matrix of all queries against the whole training set is never held: keys are visited
chunk by chunk and only the running top-k per query is kept, so memory is O(query_chunk * key_chunk).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import numpy as np
import torch

from data_pipeline.atomic_files import atomic_path
from engine.audit.similarity import PairSimilarity, dot_similarity


def topk_neighbors(queries: torch.Tensor | np.ndarray, keys: torch.Tensor | np.ndarray, k: int = 3, *,
                   similarity: PairSimilarity = dot_similarity, query_chunk: int = 256,
                   key_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [Q, k], indices [Q, k]) of the k most similar keys per query, most similar first.

    `keys` may be a numpy array (e.g. a memory-mapped embedding cache); only one chunk is turned into
    a tensor at a time. Ties are broken towards the lower key index, as a stable full sort would.
    """
    n_q, n_k = len(queries), len(keys)
    if n_k == 0:
        raise ValueError("nearest neighbours: no keys (empty training set?)")
    k = min(k, n_k)
    best_v = torch.full((n_q, k), -torch.inf)
    best_i = torch.full((n_q, k), -1, dtype=torch.long)
    for k0 in range(0, n_k, key_chunk):
        key_block = torch.as_tensor(np.asarray(keys[k0:k0 + key_chunk]) if isinstance(keys, np.ndarray)
                                    else keys[k0:k0 + key_chunk])
        idx = torch.arange(k0, k0 + key_block.shape[0])
        for q0 in range(0, n_q, query_chunk):
            q_block = torch.as_tensor(queries[q0:q0 + query_chunk])
            sims = similarity(q_block, key_block).float()                      # [q, key_chunk]
            cand_v = torch.cat([best_v[q0:q0 + len(q_block)], sims], dim=1)
            cand_i = torch.cat([best_i[q0:q0 + len(q_block)], idx.expand(len(q_block), -1)], dim=1)
            # Stable descending sort keeps earlier (lower-index) keys first among equal values.
            order = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :k]
            best_v[q0:q0 + len(q_block)] = torch.gather(cand_v, 1, order)
            best_i[q0:q0 + len(q_block)] = torch.gather(cand_i, 1, order)
    return best_v, best_i


def array_fingerprint(array: np.ndarray) -> str:
    """A short content hash of an array (shape, dtype and bytes): the dataset part of a cache key."""
    h = hashlib.sha1()
    h.update(json.dumps([list(array.shape), str(array.dtype)]).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


def cached_embeddings(cache_dir: str | None, images: np.ndarray, model_key: str,
                      embed: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Embeddings of `images`, read from `<cache_dir>/<dataset hash>-<model hash>.npy` when present.

    `model_key` names the embedding model exactly (e.g. "clip:ViT-B-32:laion2b_s34b_b79k" or a copy
    detector's weight hash); the dataset part is the content hash of `images`, so a changed training
    set or model never reads a stale cache. Written atomically.
    """
    if cache_dir is None:
        return embed(images)
    model_hash = hashlib.sha1(model_key.encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"{array_fingerprint(images)}-{model_hash}.npy")
    if os.path.exists(path):
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape[0] == images.shape[0]:
                return cached
        except (OSError, ValueError):
            pass  # a damaged cache file is recomputed and replaced
    out = np.ascontiguousarray(embed(images))
    with atomic_path(path) as tmp:
        np.save(tmp, out, allow_pickle=False)
    return out
