"""Forward noising and the noise-prediction loss with the noise drawn inside the kernel.

Training normally writes a noise tensor eps (randn), reads it to build x_t, and reads it again for
the loss target. Here eps is a pure function of (seed, element offset) — Triton's counter-based
Philox `tl.randn(seed, offset)` — so each kernel regenerates it in registers and it never touches
memory:

    noised_input(x0, sqrt_ab, sqrt_1mab, seed)         x_t = sqrt_ab[b] * x0 + sqrt_1mab[b] * eps
    noise_prediction_loss(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization)
        target = eps                                   ('eps')
        target = sqrt_ab[b] * eps - sqrt_1mab[b] * x0  ('v')
        loss[b] = weights[b] * mean over C*H*W of (pred - target)^2
    The loss kernel writes d loss[b] / d pred in the same pass; the autograd backward only scales it
    by the incoming per-sample gradient.

Offset convention: the element at flat (row-major, contiguous) index i of x0 — i = b*C*H*W + j —
uses Philox offset i with the given seed (counter = (i mod 2^32, i >> 32, 0, 0), key = seed).
Call both functions of one training step with the same seed; use a fresh seed every step (and a
different one per data-parallel rank).

The references (`*_reference`) draw the identical eps through `kernels.philox`, so CPU training
and CUDA training see the same noise up to float rounding of log/cos.
"""
import torch

from kernels.backend import use_triton
from kernels.philox import randn_for_shape

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every kernel output buffer comes from here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)

PARAMETERIZATIONS = ("eps", "v")
_BLOCK = 1024


def _check(x0: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor, seed: int,
           pred: torch.Tensor | None = None, weights: torch.Tensor | None = None,
           parameterization: str = "eps") -> None:
    bsz = x0.shape[0]
    if sqrt_ab.shape != (bsz,) or sqrt_1mab.shape != (bsz,):
        raise ValueError(f"noising: sqrt_ab/sqrt_1mab must be [B]={bsz}, got {tuple(sqrt_ab.shape)}, "
                         f"{tuple(sqrt_1mab.shape)}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"noising: seed must be in [0, 2^63), got {seed}")
    if pred is not None and pred.shape != x0.shape:
        raise ValueError(f"noising: pred shape {tuple(pred.shape)} != x0 shape {tuple(x0.shape)}")
    if weights is not None and weights.shape != (bsz,):
        raise ValueError(f"noising: weights must be [B]={bsz}, got {tuple(weights.shape)}")
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"noising: parameterization {parameterization!r} not in {PARAMETERIZATIONS}")


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def noise_for(x0: torch.Tensor, seed: int) -> torch.Tensor:
    """The eps the kernels draw for x0 and seed (float32, x0's shape): for tests and x0-parameterised callers."""
    return randn_for_shape(seed, x0.shape, device=x0.device)


# ----------------------------------------------------------------------------- references

def noised_input_reference(x0: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor, seed: int) -> torch.Tensor:
    _check(x0, sqrt_ab, sqrt_1mab, seed)
    cdt = torch.promote_types(x0.dtype, torch.float32)
    eps = noise_for(x0, seed).to(cdt)
    x_t = _per_sample(sqrt_ab.to(cdt), x0) * x0.to(cdt) + _per_sample(sqrt_1mab.to(cdt), x0) * eps
    return x_t.to(x0.dtype)


def noise_prediction_loss_reference(pred: torch.Tensor, x0: torch.Tensor, sqrt_ab: torch.Tensor,
                                    sqrt_1mab: torch.Tensor, seed: int, weights: torch.Tensor | None = None,
                                    parameterization: str = "eps") -> torch.Tensor:
    """Plain autograd version: per-sample (weighted) MSE [B] in fp32 (fp64 for fp64 pred)."""
    _check(x0, sqrt_ab, sqrt_1mab, seed, pred, weights, parameterization)
    cdt = torch.promote_types(pred.dtype, torch.float32)
    eps = noise_for(x0, seed).to(cdt)
    if parameterization == "v":
        target = _per_sample(sqrt_ab.to(cdt), x0) * eps - _per_sample(sqrt_1mab.to(cdt), x0) * x0.to(cdt)
    else:
        target = eps
    loss = (pred.to(cdt) - target).square().flatten(1).mean(dim=1)
    if weights is not None:
        loss = loss * weights.detach().to(cdt)   # Min-SNR weights are constants, as in the fused path
    return loss


def _loss_and_grad_torch(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization, need_grad):
    """The fused kernel's arithmetic in torch ops: (loss [B], d loss[b] / d pred or None)."""
    cdt = torch.promote_types(pred.dtype, torch.float32)
    with torch.no_grad():
        eps = noise_for(x0, seed).to(cdt)
        if parameterization == "v":
            target = _per_sample(sqrt_ab.to(cdt), x0) * eps - _per_sample(sqrt_1mab.to(cdt), x0) * x0.to(cdt)
        else:
            target = eps
        diff = pred.detach().to(cdt) - target
        n = diff[0].numel()
        w = weights.to(cdt) if weights is not None else torch.ones(pred.shape[0], dtype=cdt, device=pred.device)
        loss = w * diff.square().flatten(1).sum(dim=1) / n
        grad = (diff * _per_sample(2.0 * w / n, diff)).to(pred.dtype) if need_grad else None
    return loss, grad


# ----------------------------------------------------------------------------- triton

if triton is not None:
    @triton.jit
    def _noised_input_kernel(x0_ptr, sab_ptr, s1mab_ptr, out_ptr, seed, n_per_sample, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_per_sample
        offs = b.to(tl.int64) * n_per_sample + cols        # flat element index = Philox offset
        eps = tl.randn(seed, offs)
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sab = tl.load(sab_ptr + b).to(tl.float32)
        s1mab = tl.load(s1mab_ptr + b).to(tl.float32)
        tl.store(out_ptr + offs, (sab * x0 + s1mab * eps).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _loss_kernel(pred_ptr, x0_ptr, sab_ptr, s1mab_ptr, w_ptr, grad_ptr, partial_ptr,
                     seed, n_per_sample, n_blocks, inv_n,
                     HAS_WEIGHTS: tl.constexpr, V_PRED: tl.constexpr, STORE_GRAD: tl.constexpr,
                     BLOCK: tl.constexpr):
        b = tl.program_id(0)
        blk = tl.program_id(1)
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_per_sample
        offs = b.to(tl.int64) * n_per_sample + cols
        eps = tl.randn(seed, offs)
        pred = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if V_PRED:
            x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            sab = tl.load(sab_ptr + b).to(tl.float32)
            s1mab = tl.load(s1mab_ptr + b).to(tl.float32)
            target = sab * eps - s1mab * x0
        else:
            target = eps
        diff = tl.where(mask, pred - target, 0.0)
        w = 1.0
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + b).to(tl.float32)
        # per-block partial of w * sum(diff^2) / n; summed over blocks afterwards (no atomics)
        tl.store(partial_ptr + b * n_blocks + blk, tl.sum(diff * diff, axis=0) * (w * inv_n))
        if STORE_GRAD:
            tl.store(grad_ptr + offs, (diff * (2.0 * w * inv_n)).to(grad_ptr.dtype.element_ty), mask=mask)


def noised_input_triton(x0: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor, seed: int) -> torch.Tensor:
    _check(x0, sqrt_ab, sqrt_1mab, seed)
    x0 = x0.contiguous()
    n = x0[0].numel()
    out = _alloc(x0.shape, x0.dtype, x0.device)
    _noised_input_kernel[(x0.shape[0], triton.cdiv(n, _BLOCK))](
        x0, sqrt_ab.contiguous(), sqrt_1mab.contiguous(), out, int(seed), n, BLOCK=_BLOCK)
    return out


def _loss_and_grad_triton(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization, need_grad):
    pred = pred.detach().contiguous()
    x0 = x0.contiguous()
    bsz, n = pred.shape[0], pred[0].numel()
    n_blocks = triton.cdiv(n, _BLOCK)
    partial = _alloc((bsz, n_blocks), torch.float32, pred.device)
    grad = _alloc(pred.shape, pred.dtype, pred.device) if need_grad else partial        # dummy pointer when not stored
    _loss_kernel[(bsz, n_blocks)](
        pred, x0, sqrt_ab.contiguous(), sqrt_1mab.contiguous(),
        weights.contiguous() if weights is not None else partial, grad, partial,
        int(seed), n, n_blocks, 1.0 / n,
        HAS_WEIGHTS=weights is not None, V_PRED=parameterization == "v", STORE_GRAD=need_grad, BLOCK=_BLOCK)
    return partial.sum(dim=1), grad if need_grad else None


class _NoisePredictionLoss(torch.autograd.Function):
    """Forward returns loss [B] and keeps d loss / d pred computed in the forward pass;
    backward multiplies it by the incoming per-sample gradient. x0, schedule and weights get no grad."""

    @staticmethod
    def forward(ctx, pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization, impl):
        need_grad = ctx.needs_input_grad[0]
        loss, grad = impl(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization, need_grad)
        ctx.save_for_backward(grad if need_grad else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        grad_pred = None
        if grad is not None:
            # in fp32, rounded once: a bf16 product of two bf16-rounded factors would round three times
            cdt = torch.promote_types(grad.dtype, torch.float32)
            grad_pred = (grad.to(cdt) * _per_sample(grad_loss.to(cdt), grad)).to(grad.dtype)
        return grad_pred, None, None, None, None, None, None, None


def noise_prediction_loss_fused_torch(pred, x0, sqrt_ab, sqrt_1mab, seed, weights=None, parameterization="eps"):
    """The autograd Function with the kernel's arithmetic in torch ops (gradcheck target on CPU)."""
    _check(x0, sqrt_ab, sqrt_1mab, seed, pred, weights, parameterization)
    return _NoisePredictionLoss.apply(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization,
                                      _loss_and_grad_torch)


def noise_prediction_loss_triton(pred, x0, sqrt_ab, sqrt_1mab, seed, weights=None, parameterization="eps"):
    if triton is None:
        raise RuntimeError("noise_prediction_loss_triton: triton is not installed")
    _check(x0, sqrt_ab, sqrt_1mab, seed, pred, weights, parameterization)
    return _NoisePredictionLoss.apply(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization,
                                      _loss_and_grad_triton)


# ----------------------------------------------------------------------------- dispatch

def noised_input(x0: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor, seed: int) -> torch.Tensor:
    """x_t = sqrt_ab[b] * x0 + sqrt_1mab[b] * eps(seed, flat index); same dtype/shape as x0."""
    if triton is not None and x0.dtype != torch.float64 and use_triton(x0, sqrt_ab, sqrt_1mab):
        return noised_input_triton(x0, sqrt_ab, sqrt_1mab, seed)
    return noised_input_reference(x0, sqrt_ab, sqrt_1mab, seed)


def noise_prediction_loss(pred: torch.Tensor, x0: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor,
                          seed: int, weights: torch.Tensor | None = None, parameterization: str = "eps",
                          ) -> torch.Tensor:
    """Per-sample loss [B] (fp32) = weights[b] * mean((pred - target)^2), target from the same eps as
    `noised_input(x0, ..., seed)`. Differentiable in pred only (weights are treated as constants)."""
    if triton is not None and pred.dtype != torch.float64 and use_triton(pred, x0, sqrt_ab, sqrt_1mab, weights):
        return noise_prediction_loss_triton(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization)
    return noise_prediction_loss_reference(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization)
