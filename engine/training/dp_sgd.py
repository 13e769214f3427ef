"""DP-SGD for the conditional diffusion model: per-sample clipping and one noise draw per step.

One private step on the global Poisson batch S (each of the N training examples included
independently with probability q; |S| varies, E|S| = qN):

    g_i  = grad of loss_i (the diffusion loss of example i, averaged over its K noise draws)
    G    = ( sum_{i in S} min(1, C / (||g_i|| + 1e-6)) g_i  +  N(0, sigma^2 C^2 I) ) / (q N)

Dividing by the *expected* batch size qN (not |S|) keeps the sensitivity of the released sum
at C: that is what the accountant (engine.training.privacy) assumes.

How it is computed:
  * norms: `kernels.dp_clip.PerSampleNormHooks` ("ghost" norms from each layer's activations and
    output gradients, no per-sample gradient materialised), then sum_i c_i g_i layer by layer from
    the same activations. With K > 1 one example is K consecutive rows of the network batch; the
    hooks fold them into the example's positions. The exact alternative "vmap" forms per-sample
    gradients with torch.func in chunks of samples (memory: chunk x parameters); it is used when the
    model has a layer without a per-sample rule, and by "auto" when it is the faster of the two on
    the model and first batch (`choose_norm_method`: both timed at the first step).
  * several ranks: every rank clips its own samples, the clipped sums are all-reduced (SUM), and
    the noise is added AFTER the reduction on every rank from the same Philox seed, so it is added
    once for the global batch and every rank holds the same gradient. With the same samples this is
    the single-process computation (up to summation order).
  * randomness of the loss (t and eps per example) is drawn from (seed, step, example index), not
    from the position in the local batch, so sharding the batch over ranks does not change it
    (engine.training.diffusion_loss.make_dp_batch); the batches are data_pipeline.poisson's.

DeepSpeed: our all-reduce replaces DeepSpeed's; the DP step (engine.training.steps.DPStep) calls
`DPSGD.backward` on `engine.module` instead of `engine.backward`, then `engine.step()`, with ZeRO stage 0,
gradient_accumulation_steps 1 and fp32 (`check_deepspeed_for_dp` rejects anything else). Stages >= 1 reduce,
average or partition gradients inside DeepSpeed's backward/step, which would average our noisy sum
or drop the noise onto one partition.
"""
from __future__ import annotations

import logging
import secrets
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.config_schema import ConfigSection, FieldError, constrained
from data_pipeline.keyed_random import keyed_seed
from engine.training.diffusion_loss import Batch, LossFn
from engine.training.privacy import Accountant, solve_noise_multiplier
from kernels.dp_clip import PerSampleNormHooks, add_noise_and_scale_, clip_factors, fastest

log = logging.getLogger(__name__)
NOISE_TAG = 0x4015E   # keyed_random purpose tag of the Gaussian noise's seed


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class DPConfig(ConfigSection):
    """The `dp` section of a training config. Give noise_multiplier OR target_epsilon, and
    sample_rate OR expected_batch_size (q = expected_batch_size / N)."""
    SECTION = "dp"
    enabled: bool = False
    clip_norm: float = constrained(1.0, "float > 0", lambda v: v > 0)
    noise_multiplier: float | None = constrained(None, "float >= 0 or null", lambda v: v >= 0)
    target_epsilon: float | None = constrained(None, "float > 0 or null", lambda v: v > 0)
    delta: float = constrained(1e-5, "float in (0, 1)", lambda v: 0 < v < 1)
    accountant: Accountant = "prv"
    sample_rate: float | None = constrained(None, "float in (0, 1] or null", lambda v: 0 < v <= 1)
    expected_batch_size: int | None = constrained(None, "int >= 1 or null", lambda v: v >= 1)
    noise_multiplicity: int = constrained(1, "int >= 1", lambda v: v >= 1)
    norm_method: Literal["auto", "ghost", "vmap"] = "auto"
    vmap_chunk: int = constrained(16, "int >= 1", lambda v: v >= 1)
    # The noise is keyed by a secret the OS draws at start (rank 0, broadcast), never written anywhere:
    # noise derived from training.seed (which config.json shows) can be recomputed and subtracted by
    # anyone who has the config, and then (epsilon, delta) holds only while the config is secret.
    # true: noise from training.seed, bit-reproducible runs (tests), and NO privacy guarantee; the
    # name says so, and privacy.json and every epsilon reported say so too.
    reproducible_noise_voids_guarantee: bool = False

    def check(self) -> None:
        if self.enabled:
            if (self.noise_multiplier is None) == (self.target_epsilon is None):
                raise FieldError("noise_multiplier", "give exactly one of noise_multiplier and target_epsilon")
            if (self.sample_rate is None) == (self.expected_batch_size is None):
                raise FieldError("sample_rate", "give exactly one of sample_rate and expected_batch_size")

    def resolve(self, num_examples: int, planned_steps: int, noise_multiplier: float | None = None) -> "ResolvedDP":
        """Fix q and sigma for a dataset of `num_examples` and a run of `planned_steps` steps.
        `noise_multiplier`: the sigma a resumed run was started with (never re-solved: the
        accountant's history assumes the sigma every past step was taken with)."""
        if num_examples < 1:
            raise ValueError(f"dp: the training split is empty (num_examples={num_examples})")
        q = self.sample_rate if self.sample_rate is not None else self.expected_batch_size / num_examples
        if not 0 < q <= 1:
            raise ValueError(f"dp.expected_batch_size: {self.expected_batch_size} exceeds the {num_examples} "
                             f"training examples")
        sigma = noise_multiplier if noise_multiplier is not None else self.noise_multiplier
        if sigma is None:
            sigma = solve_noise_multiplier(self.target_epsilon, q, planned_steps, self.delta, self.accountant)
        return ResolvedDP(self, float(q), float(q) * num_examples, float(sigma), num_examples, int(planned_steps))


@dataclass(frozen=True)
class ResolvedDP:
    cfg: DPConfig
    sample_rate: float
    expected_batch_size: float   # q N: the divisor of the noisy sum
    noise_multiplier: float
    num_examples: int
    planned_steps: int = 0       # training.steps when sigma was fixed


def check_deepspeed_for_dp(ds_config: dict | None) -> None:
    """One-line error unless DeepSpeed leaves gradient reduction to DP-SGD (ZeRO 0, no accumulation)."""
    if not ds_config:
        return
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if stage != 0:
        raise ValueError(f"deepspeed.zero_optimization.stage: DP-SGD needs stage 0 (stage {stage} averages or "
                         f"partitions gradients inside DeepSpeed, breaking the single noise draw)")
    gas = int(ds_config.get("gradient_accumulation_steps", 1) or 1)
    if gas != 1:
        raise ValueError(f"deepspeed.gradient_accumulation_steps: DP-SGD needs 1 (one Poisson batch per step), got {gas}")
    for key in ("fp16", "bf16"):
        # DeepSpeed's mixed-precision optimizers keep their own gradient buffers filled by its backward
        if (ds_config.get(key) or {}).get("enabled", False):
            raise ValueError(f"deepspeed.{key}.enabled: DP-SGD runs its own backward and needs fp32 (set false)")


# ----------------------------------------------------------------------------- the step

class _LossModule(nn.Module):
    """Wraps (model, loss_fn) so torch.func.functional_call can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _vmap_clipped_sum(model: nn.Module, loss_fn: LossFn, batch: Batch, clip_norm: float,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-sample gradients (torch.func) chunk by chunk; .grad <- sum_i c_i g_i. Returns (norms, losses)."""
    from torch.func import functional_call, grad_and_value, vmap  # noqa: PLC0415

    wrapper = _LossModule(model, loss_fn)
    names = [n for n, p in wrapper.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in wrapper.named_parameters() if p.requires_grad}

    def one(p: dict, sample: Batch) -> torch.Tensor:
        return functional_call(wrapper, p, ({k: v.unsqueeze(0) for k, v in sample.items()},)).squeeze(0)

    per_sample = vmap(grad_and_value(one), in_dims=(None, 0), randomness="different")
    sums = {n: torch.zeros_like(params[n]) for n in names}
    norms, losses = [], []
    b = next(iter(batch.values())).shape[0]
    for s in range(0, b, chunk):
        with warnings.catch_warnings():  # SDPA has no vmap batching rule: torch warns on every call
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            grads, loss = per_sample(params, {k: v[s:s + chunk] for k, v in batch.items()})
        sq = sum(grads[n].flatten(1).double().pow(2).sum(1) for n in names)
        norm = sq.sqrt().to(loss.dtype)
        c = clip_factors(norm, clip_norm)
        for n in names:
            sums[n] += torch.tensordot(c.to(grads[n].dtype), grads[n], dims=1)
        norms.append(norm)
        losses.append(loss.detach())
    for n, p in wrapper.named_parameters():
        if p.requires_grad:
            p.grad = sums[n]
    return torch.cat(norms), torch.cat(losses)


def choose_norm_method(model: nn.Module, hooks: PerSampleNormHooks, loss_fn: LossFn, batch: Batch,
                       clip_norm: float, vmap_chunk: int, repeats: int = 2) -> dict[str, float]:
    """Seconds of one clipped sum of `batch` by the norm hooks ("hooks") and by torch.func
    ("torch_func"), the fastest of 1 + `repeats` interleaved calls each (the first call warms up;
    the hooks time their per-layer rules on theirs). Both are exact, so the faster one is kept by
    `dp.norm_method: auto`. The trial calls change nothing training sees: the global RNG state is
    restored (dropout, vmap's randomness) and .grad cleared; no noise is drawn."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device

    def by_hooks() -> None:
        hooks.discard()
        hooks.clipped_backward(loss_fn(model, batch), clip_norm)

    def by_torch_func() -> None:
        _vmap_clipped_sum(model, loss_fn, batch, clip_norm, vmap_chunk)
        hooks.discard()   # the hooks saw the functional forward too

    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return fastest({"hooks": by_hooks, "torch_func": by_torch_func}, device, repeats=1 + repeats)
    finally:
        hooks.discard()
        for p in params:
            p.grad = None


class DPSGD:
    """Replaces `loss.backward()` of a training step; the caller then runs `optimizer.step()`.

        dp = DPSGD(model, resolved, seed=cfg.seed)
        stats = dp.backward(loss_fn, batch, step)     # batch from make_dp_batch, this rank's samples

    After `backward`, every trainable parameter's .grad holds the noisy, clipped, reduced mean
    gradient (the same on every rank); previous .grad values are discarded.
    """

    def __init__(self, model: nn.Module, resolved: ResolvedDP, *, seed: int,
                 process_group: dist.ProcessGroup | None = None) -> None:
        cfg = resolved.cfg
        if getattr(getattr(model, "cfg", None), "grad_checkpointing", False):
            raise ValueError("model.grad_checkpointing: not supported with dp.enabled (per-sample norms need the "
                             "recorded activations)")
        self.model, self.resolved, self.cfg, self.seed = model, resolved, cfg, int(seed)
        self.group = process_group
        self._noise_key = None if cfg.reproducible_noise_voids_guarantee else self._os_secret()
        self.method = cfg.norm_method
        self.hooks: PerSampleNormHooks | None = None
        self.norm_seconds: dict[str, float] = {}   # "auto": the first step's timing of both paths
        if self.method in ("auto", "ghost"):
            try:   # the loss repeats each example K times consecutively (diffusion_loss_fn)
                self.hooks = PerSampleNormHooks(model, rows_per_sample=cfg.noise_multiplicity)
            except ValueError as exc:
                if self.method == "ghost":
                    raise
                self._fall_back(exc)

    def _fall_back(self, exc: Exception) -> None:
        log.warning("DP-SGD: ghost per-sample norms unavailable (%s); using exact torch.func per-sample "
                    "gradients (slower, more memory)", str(exc).splitlines()[0])
        if self.hooks is not None:
            self.hooks.remove()
        self.hooks, self.method = None, "vmap"

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_available() and dist.is_initialized() else 1

    def _os_secret(self) -> int:
        """62 bits from the OS on rank 0, shared with the other ranks (one collective, at start)."""
        s = torch.tensor([secrets.randbits(62)], dtype=torch.int64)
        if self.world_size > 1:
            # gloo/nccl need the tensor on the backend's device; the model's device is right for both
            s = s.to(next(self.model.parameters()).device)
            dist.broadcast(s, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return int(s.item())

    def noise_seed(self, step: int) -> int:
        """The Philox seed of this step's noise, identical on every rank: keyed by the OS secret, or
        by the public seed when the config voids the guarantee."""
        key = self.seed if self._noise_key is None else self._noise_key
        return keyed_seed(key, step, NOISE_TAG)

    def _choose(self, loss_fn: LossFn, batch: Batch) -> None:
        """norm_method auto, first non-empty batch: keep the faster exact path (this rank's timing)."""
        try:
            self.norm_seconds = choose_norm_method(self.model, self.hooks, loss_fn, batch, self.cfg.clip_norm,
                                                   self.cfg.vmap_chunk)
        except ValueError as exc:   # a layer failed a runtime check of the hooks
            self._fall_back(exc)
            return
        hooks_s, func_s = self.norm_seconds["hooks"], self.norm_seconds["torch_func"]
        log.info("DP-SGD norm_method auto: clipped sum of a batch of %d by norm hooks %.1f ms, by torch.func "
                 "%.1f ms: using %s", next(iter(batch.values())).shape[0], 1e3 * hooks_s, 1e3 * func_s,
                 "torch.func" if func_s < hooks_s else "the norm hooks")
        if func_s < hooks_s:
            self.hooks.remove()
            self.hooks, self.method = None, "vmap"

    def _local_clipped_sum(self, loss_fn: LossFn, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "auto" and not self.norm_seconds:
            self._choose(loss_fn, batch)
        if self.method == "vmap":
            return _vmap_clipped_sum(self.model, loss_fn, batch, self.cfg.clip_norm, self.cfg.vmap_chunk)
        losses = loss_fn(self.model, batch)
        try:
            norms = self.hooks.clipped_backward(losses, self.cfg.clip_norm)
        except ValueError as exc:
            if self.method == "ghost":
                raise
            # a layer failed a runtime check (e.g. unbatched call): redo this step exactly, then stay on vmap
            self._fall_back(exc)
            for p in self.model.parameters():
                p.grad = None
            return self._local_clipped_sum(loss_fn, batch)
        return norms.detach(), losses.detach()

    def backward(self, loss_fn: LossFn, batch: Batch, step: int) -> dict[str, float]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        local_b = next(iter(batch.values())).shape[0]
        device = params[0].device
        if local_b > 0:
            norms, losses = self._local_clipped_sum(loss_fn, batch)
        else:  # an empty Poisson share still takes part in the reduction and gets the noise
            norms = losses = torch.zeros(0, device=device)
            if self.hooks is not None:
                self.hooks.discard()
        for p in params:
            if p.grad is None:  # unused by this batch (or empty batch): a zero contribution
                p.grad = torch.zeros_like(p)
            elif not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
        c = clip_factors(norms, self.cfg.clip_norm) if local_b else norms
        totals = torch.stack([torch.tensor(float(local_b), device=device), (c < 1).sum().to(device, torch.float32),
                              norms.sum().float(), losses.sum().float()])
        # One flat buffer: one all-reduce (gradients + stats) and one noise call. The noise of element k
        # of the concatenated gradients is Philox(seed, k) either way, so flat or per-tensor is the same draw.
        flat = torch.cat([p.grad.reshape(-1) for p in params] + [totals.to(params[0].grad.dtype)])
        if self.world_size > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        grad_flat, totals = flat[:-totals.numel()], flat[-totals.numel():].float()
        add_noise_and_scale_([grad_flat], self.resolved.noise_multiplier, self.cfg.clip_norm,
                             self.resolved.expected_batch_size, self.noise_seed(step))
        offset = 0
        for p in params:
            p.grad.copy_(grad_flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        size, clipped, norm_sum, loss_sum = totals.tolist()   # one host sync per step, not four
        n = max(size, 1.0)
        # which exact path computed the norms, and (auto) the timings it was chosen by, in every log row
        timing = {f"dp/norm_seconds_{k}": v for k, v in self.norm_seconds.items()}
        return {"dp/batch_size": size, "dp/clipped_fraction": clipped / n,
                "dp/grad_norm_mean": norm_sum / n, "loss": loss_sum / n,
                "dp/noise_std": self.resolved.noise_multiplier * self.cfg.clip_norm / self.resolved.expected_batch_size,
                "dp/norms_by_hooks": float(self.hooks is not None), **timing}
