"""Exponential moving average of the model weights, correct under every ZeRO stage.

ZeRO 0-2 keep full parameters on every rank, so the average reads them directly. ZeRO 3 shards
each parameter across ranks: the average gathers them (deepspeed.zero.GatheredParameters, a
collective every rank must enter) a few at a time, so peak memory stays one chunk above the shard.
Only rank 0 holds the average (fp32, on the training device); the others take part in the gathers.
"""
from __future__ import annotations

import torch
from torch import nn

_GATHER_CHUNK = 64   # parameters gathered at once under ZeRO 3


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """decay, or min(decay, (1 + step) / (10 + step)) with warmup so early steps forget the init fast."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


def _is_zero3(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


class EMA:
    def __init__(self, module: nn.Module, decay: float, warmup: bool = True, keep: bool = True) -> None:
        """`module` is the unwrapped model; `keep` is True on the rank that stores the average."""
        self.decay, self.warmup, self.keep = decay, warmup, keep
        self.shadow: dict[str, torch.Tensor] = {}
        self._for_each_full_param(module, lambda name, p: self.shadow.__setitem__(name, p.detach().float().clone()))

    def _for_each_full_param(self, module: nn.Module, fn) -> None:
        params = list(module.named_parameters())
        if not any(_is_zero3(p) for _, p in params):
            if self.keep:
                for name, p in params:
                    fn(name, p)
            return
        import deepspeed
        for i in range(0, len(params), _GATHER_CHUNK):
            chunk = params[i:i + _GATHER_CHUNK]
            with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=None):
                if self.keep:
                    for name, p in chunk:
                        fn(name, p)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Blend the current weights in after optimizer step `step` (0-based)."""
        weight = 1.0 - ema_decay_at(step, self.decay, self.warmup)
        params = list(module.named_parameters())
        if self.keep and not any(_is_zero3(p) for _, p in params):   # one fused update, not one per tensor
            torch._foreach_lerp_([self.shadow[n] for n, _ in params], [p.detach().float() for _, p in params], weight)
            return
        self._for_each_full_param(module, lambda name, p: self.shadow[name].lerp_(p.detach().float(), weight))

    def all_finite(self) -> bool:
        """False if any averaged weight is inf or NaN (a NaN step poisons the average for good)."""
        return all(bool(torch.isfinite(t).all()) for t in self.shadow.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model (differs in {sorted(missing)[:3]}...)")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, target: nn.Module) -> nn.Module:
        """Write the averaged weights into a plain (unsharded) copy of the model."""
        for name, p in target.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))
        return target
