"""Multi-head attention through one function so the backend is a switch, not a code path.

SDPA (torch.nn.functional.scaled_dot_product_attention) is the default; xformers'
memory-efficient attention is used when asked for and its kernels load. The fallback is announced
once, because a silent fallback would make benchmark numbers lie.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
BACKENDS = ("sdpa", "xformers")
_xformers_ops = None
_xformers_checked = False


def _load_xformers():
    global _xformers_ops, _xformers_checked
    if not _xformers_checked:
        _xformers_checked = True
        try:
            import xformers.ops as xops  # noqa: PLC0415 - optional dependency

            # Importing is not enough: a binary built for another torch imports but fails at call.
            q = torch.zeros(1, 1, 1, 8, device="cuda" if torch.cuda.is_available() else "cpu")
            xops.memory_efficient_attention(q, q, q)
            _xformers_ops = xops
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
            log.warning("xformers attention unavailable (%s: %s); falling back to SDPA",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return _xformers_ops


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              backend: str = "sdpa") -> torch.Tensor:
    """q: [B, H, Lq, d], k/v: [B, H, Lk, d], key_mask: [B, Lk] bool (True = attend). Returns [B, H, Lq, d]."""
    if backend not in BACKENDS:
        raise ValueError(f"model.attention_backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "xformers" and (xops := _load_xformers()) is not None:
        bias = None
        if key_mask is not None:
            bias = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
