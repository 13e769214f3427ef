"""One classifier-free-guided DDIM/DDPM step plus the conditional-noise norm, in one pass.

Input is the network output for a stacked batch `[eps_cond x B ; eps_uncond x B]` (epsilon
predictions) and the current latent `x_t [B, C, H, W]`; all samples are at the same timestep, so
the schedule coefficients are Python floats. Per element:

    d      = eps_c - eps_u                      (summed as d^2 per sample -> norm_raw)
    eps    = eps_u + w * d
    x0     = (x_t - sqrt_1mab_t * eps) / sqrt_ab_t
    if clip_x0:  x0 = clamp(x0, -1, 1)          (eps stays the network's: not re-derived from x0)
    x_prev = sqrt_ab_prev * x0 + sqrt_1mab_prev_dir * eps + sigma * noise

Why eps is not re-derived from the clipped x0 (guided-diffusion does, diffusers' DDIM pipeline does
not): early in sampling most x0 pixels are clipped (87% at t = 999 on the demo model), and the
re-derived eps = (x_t - sqrt_ab_t * x0) / sqrt_1mab_t is then x_t's own content rather than the
network's noise estimate, so part of the initial noise is carried to the end. Measured on the demo
model (bench/ddim_investigation.py, 48 prompts x 4 seeds, 20 steps, w = 7.5): 9/192 generations ended
as pixel noise with re-derivation, 0/192 without; timestep spacing, step count (20-100) and w (1-7.5)
did not change the share; no clipping at all gave 95/192.

`sqrt_1mab_prev_dir` is sqrt(1 - abar_prev - sigma^2) for DDIM; DDPM ancestral sampling is the same
step with sigma from eta = 1. norm_raw = ||eps_c - eps_u||_2 over C*H*W, norm_rms = that / sqrt(C*H*W).

The fused kernel reads eps_c, eps_u, x_t (and noise) once and writes x_prev once; the eager
reference makes ~10 full passes. Norm partial sums go to a [B, n_blocks] buffer reduced afterwards
(deterministic, no atomics).
"""
import math

import torch

from kernels.backend import TRITON_DTYPES, Launch, as_secondary, check_blocks_per_sample, secondary_dtypes, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works without triton
    triton = None


def _alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every kernel output buffer comes from here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 inputs are computed in fp32; fp64 stays fp64 (for exactness checks)
    return torch.promote_types(dtype, torch.float32)


def _check(pred: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor | None, sigma: float) -> None:
    if x_t.dim() < 2:
        raise ValueError(f"guided_step: x_t must be [B, ...], got shape {tuple(x_t.shape)}")
    if pred.shape[0] != 2 * x_t.shape[0] or pred.shape[1:] != x_t.shape[1:]:
        raise ValueError(f"guided_step: pred must be [2B, ...] = [cond; uncond] for x_t {tuple(x_t.shape)}, "
                         f"got {tuple(pred.shape)}")
    if sigma != 0.0 and noise is None:
        raise ValueError(f"guided_step: sigma={sigma} > 0 needs a noise tensor")
    if noise is not None and noise.shape != x_t.shape:
        raise ValueError(f"guided_step: noise shape {tuple(noise.shape)} != x_t shape {tuple(x_t.shape)}")


def guided_step_reference(pred: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor | None = None, *,
                          guidance: float, sqrt_ab_t: float, sqrt_1mab_t: float, sqrt_ab_prev: float,
                          sqrt_1mab_prev_dir: float, sigma: float = 0.0, clip_x0: bool = True,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager PyTorch version of the step; the definition the fused kernel is tested against."""
    _check(pred, x_t, noise, sigma)
    cdt = _compute_dtype(x_t.dtype)
    eps_c, eps_u = pred.to(cdt).chunk(2)
    xt = x_t.to(cdt)
    diff = eps_c - eps_u
    norm_raw = torch.linalg.vector_norm(diff.flatten(1), dim=1)
    n = diff[0].numel()
    eps = eps_u + guidance * diff
    x0 = (xt - sqrt_1mab_t * eps) / sqrt_ab_t
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    x_prev = sqrt_ab_prev * x0 + sqrt_1mab_prev_dir * eps
    if sigma != 0.0:
        x_prev = x_prev + sigma * noise.to(cdt)
    return x_prev.to(x_t.dtype), norm_raw, norm_raw / math.sqrt(n)


BLOCK = 1024     # elements per program: the block size the dispatch uses

if triton is not None:
    # Typed integers: no value turns into a compile-time constant and no width depends on the value,
    # so the compiled variants are exactly those launch_space() lists.
    @triton.jit
    def _guided_step_kernel(pred_ptr, xt_ptr, noise_ptr, out_ptr, partial_ptr,
                            n_per_sample: tl.int32, cond_to_uncond: tl.int64, n_blocks: tl.int32,
                            guidance, sqrt_ab_t, sqrt_1mab_t, sqrt_ab_prev, sqrt_1mab_prev_dir, sigma,
                            HAS_NOISE: tl.constexpr, CLIP_X0: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        blk = tl.program_id(1)
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_per_sample
        # int64 base: B*C*H*W can exceed 2^31 at scan batch sizes
        base = b.to(tl.int64) * n_per_sample
        offs = base + cols
        eps_c = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        eps_u = tl.load(pred_ptr + cond_to_uncond + offs, mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(xt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = eps_c - eps_u
        eps = eps_u + guidance * d
        x0 = (xt - sqrt_1mab_t * eps) / sqrt_ab_t
        if CLIP_X0:
            x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
        x_prev = sqrt_ab_prev * x0 + sqrt_1mab_prev_dir * eps
        if HAS_NOISE:
            z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x_prev = x_prev + sigma * z
        tl.store(out_ptr + offs, x_prev.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + b * n_blocks + blk, tl.sum(d * d, axis=0))


def _guided_step_launch(pred, x_t, noise, *, guidance, sqrt_ab_t, sqrt_1mab_t, sqrt_ab_prev, sqrt_1mab_prev_dir,
                        sigma, clip_x0, block=BLOCK) -> tuple[Launch, torch.Tensor, torch.Tensor]:
    """The launch guided_step_triton makes, its output and its norm partial sums [B, n_blocks]."""
    x_t = x_t.contiguous()
    pred = as_secondary(pred, x_t.dtype)
    has_noise = sigma != 0.0
    noise_arg = as_secondary(noise, x_t.dtype) if has_noise else x_t   # dummy pointer, never read
    bsz = x_t.shape[0]
    n = x_t[0].numel()
    check_blocks_per_sample("guided_step", n, block)
    n_blocks = triton.cdiv(n, block)
    out = _alloc(x_t.shape, x_t.dtype, x_t.device)
    partial = _alloc((bsz, n_blocks), torch.float32, x_t.device)
    launch = Launch(_guided_step_kernel, (bsz, n_blocks),
                    (pred, x_t, noise_arg, out, partial, n, bsz * n, n_blocks,
                     float(guidance), float(sqrt_ab_t), float(sqrt_1mab_t), float(sqrt_ab_prev),
                     float(sqrt_1mab_prev_dir), float(sigma)),
                    dict(HAS_NOISE=has_noise, CLIP_X0=bool(clip_x0), BLOCK=block))
    return launch, out, partial


def guided_step_triton(pred: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor | None = None, *,
                       guidance: float, sqrt_ab_t: float, sqrt_1mab_t: float, sqrt_ab_prev: float,
                       sqrt_1mab_prev_dir: float, sigma: float = 0.0, clip_x0: bool = True,
                       block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused step: computes in fp32 (fp64 inputs are not supported by the kernel). `block` other than
    BLOCK is for interpreter tests only; the dispatch never passes one."""
    if triton is None:
        raise RuntimeError("guided_step_triton: triton is not installed")
    _check(pred, x_t, noise, sigma)
    if x_t.dtype not in TRITON_DTYPES:
        raise ValueError(f"guided_step_triton: {x_t.dtype} is reference-only (kernel dtypes: {TRITON_DTYPES})")
    launch, out, partial = _guided_step_launch(
        pred, x_t, noise, guidance=guidance, sqrt_ab_t=sqrt_ab_t, sqrt_1mab_t=sqrt_1mab_t, sqrt_ab_prev=sqrt_ab_prev,
        sqrt_1mab_prev_dir=sqrt_1mab_prev_dir, sigma=sigma, clip_x0=clip_x0, block=block)
    launch.run()
    norm_raw = partial.sum(dim=1).sqrt()
    return out, norm_raw, norm_raw / math.sqrt(x_t[0].numel())


def launch_space() -> list[Launch]:
    """Every launch the dispatch can make (x_t dtype x pred/noise dtypes x options), built by the
    launch code above on meta tensors; kernels.aot compiles each for real GPUs."""
    coefs = dict(guidance=7.5, sqrt_ab_t=0.3, sqrt_1mab_t=0.95, sqrt_ab_prev=0.35, sqrt_1mab_prev_dir=0.9)
    bsz, shape = 4, (1, 64, 64)
    launches = []
    for dtype in TRITON_DTYPES:
        x_t = torch.empty(bsz, *shape, dtype=dtype, device="meta")
        for pred_dtype in secondary_dtypes(dtype):
            pred = torch.empty(2 * bsz, *shape, dtype=pred_dtype, device="meta")
            for noise_dtype in (None, *secondary_dtypes(dtype)):
                noise = None if noise_dtype is None else torch.empty_like(x_t, dtype=noise_dtype)
                for clip_x0 in (False, True):
                    launches.append(_guided_step_launch(pred, x_t, noise, sigma=0.0 if noise is None else 0.1,
                                                        clip_x0=clip_x0, **coefs)[0])
    return launches


def guided_step(pred: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor | None = None, *,
                guidance: float, sqrt_ab_t: float, sqrt_1mab_t: float, sqrt_ab_prev: float,
                sqrt_1mab_prev_dir: float, sigma: float = 0.0, clip_x0: bool = True,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch: fused Triton kernel on CUDA (or when MEMDIFF_KERNELS=triton), reference otherwise.

    Returns (x_prev [B,C,H,W] in x_t's dtype, norm_raw [B], norm_rms [B]); norms are in the compute
    dtype (fp32, or fp64 for fp64 inputs).
    """
    kwargs = dict(guidance=guidance, sqrt_ab_t=sqrt_ab_t, sqrt_1mab_t=sqrt_1mab_t, sqrt_ab_prev=sqrt_ab_prev,
                  sqrt_1mab_prev_dir=sqrt_1mab_prev_dir, sigma=sigma, clip_x0=clip_x0)
    if triton is not None and x_t.dtype in TRITON_DTYPES and use_triton(pred, x_t, noise):
        return guided_step_triton(pred, x_t, noise, **kwargs)
    return guided_step_reference(pred, x_t, noise, **kwargs)
