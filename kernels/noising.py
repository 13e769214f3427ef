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

from kernels.backend import TRITON_DTYPES, Launch, as_secondary, check_blocks_per_sample, secondary_dtypes, use_triton
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
BLOCK = 1024     # elements per program: the only block size the launchers use


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

# Integer arguments carry explicit types: the seed and the per-sample size never turn into
# compile-time constants (Triton would otherwise specialise a 1 into one) and their width does not
# depend on their value, so the compiled variants are exactly those launch_space() lists.
if triton is not None:
    @triton.jit(do_not_specialize=["seed"])
    def _noised_input_kernel(x0_ptr, sab_ptr, s1mab_ptr, out_ptr, seed: tl.int64, n_per_sample: tl.int32,
                             BLOCK: tl.constexpr):
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_per_sample
        offs = b.to(tl.int64) * n_per_sample + cols        # flat element index = Philox offset
        eps = tl.randn(seed, offs)
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sab = tl.load(sab_ptr + b).to(tl.float32)
        s1mab = tl.load(s1mab_ptr + b).to(tl.float32)
        tl.store(out_ptr + offs, (sab * x0 + s1mab * eps).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["seed"])
    def _loss_kernel(pred_ptr, x0_ptr, sab_ptr, s1mab_ptr, w_ptr, grad_ptr, partial_ptr,
                     seed: tl.int64, n_per_sample: tl.int32, n_blocks: tl.int32, inv_n,
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


def _coefficients(v: torch.Tensor) -> torch.Tensor:
    # [B] schedule coefficients and weights go in as float32 (the kernels read them as float32 anyway)
    return v.to(torch.float32).contiguous()


def _noised_input_launch(x0, sqrt_ab, sqrt_1mab, seed) -> tuple[Launch, torch.Tensor]:
    """The launch noised_input_triton makes, and its output buffer."""
    x0 = x0.contiguous()
    n = x0[0].numel()
    check_blocks_per_sample("noised_input", n, BLOCK)
    out = _alloc(x0.shape, x0.dtype, x0.device)
    launch = Launch(_noised_input_kernel, (x0.shape[0], triton.cdiv(n, BLOCK)),
                    (x0, _coefficients(sqrt_ab), _coefficients(sqrt_1mab), out, int(seed), n), dict(BLOCK=BLOCK))
    return launch, out


def noised_input_triton(x0: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor, seed: int) -> torch.Tensor:
    _check(x0, sqrt_ab, sqrt_1mab, seed)
    launch, out = _noised_input_launch(x0, sqrt_ab, sqrt_1mab, seed)
    launch.run()
    return out


def _loss_launch(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization, need_grad):
    """The launch of the fused loss, its per-block partial sums [B, n_blocks] and gradient buffer (or None)."""
    pred = pred.detach().contiguous()
    v_pred = parameterization == "v"
    x0 = as_secondary(x0, pred.dtype) if v_pred else pred          # x0 is read for the v target only
    bsz, n = pred.shape[0], pred[0].numel()
    check_blocks_per_sample("noise_prediction_loss", n, BLOCK)
    n_blocks = triton.cdiv(n, BLOCK)
    partial = _alloc((bsz, n_blocks), torch.float32, pred.device)
    grad = _alloc(pred.shape, pred.dtype, pred.device) if need_grad else None
    launch = Launch(_loss_kernel, (bsz, n_blocks),
                    (pred, x0, _coefficients(sqrt_ab), _coefficients(sqrt_1mab),
                     _coefficients(weights) if weights is not None else partial,   # dummy pointers: never read
                     grad if need_grad else partial, partial,
                     int(seed), n, n_blocks, 1.0 / n),
                    dict(HAS_WEIGHTS=weights is not None, V_PRED=v_pred, STORE_GRAD=need_grad, BLOCK=BLOCK))
    return launch, partial, grad


def _loss_and_grad_triton(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization, need_grad):
    launch, partial, grad = _loss_launch(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization, need_grad)
    launch.run()
    return partial.sum(dim=1), grad


def launch_space() -> list[Launch]:
    """Every launch the dispatch can make (dtypes x options), built by the launch code above on meta
    tensors; kernels.aot compiles each for real GPUs. Sizes are placeholders: types, not values, matter."""
    meta = dict(device="meta")
    bsz, shape = 4, (1, 64, 64)
    launches = []
    for dtype in TRITON_DTYPES:
        x0 = torch.empty(bsz, *shape, dtype=dtype, **meta)
        coef = torch.empty(bsz, dtype=torch.float32, **meta)
        launches.append(_noised_input_launch(x0, coef, coef, 2**40)[0])
        for x0_dtype in secondary_dtypes(dtype):
            for parameterization in PARAMETERIZATIONS:
                if parameterization != "v" and x0_dtype != dtype:
                    continue                                   # x0 is not passed for eps
                for weights in (None, coef):
                    for need_grad in (False, True):
                        launches.append(_loss_launch(x0, x0.to(x0_dtype), coef, coef, 2**40, weights,
                                                     parameterization, need_grad)[0])
    return launches


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
    if triton is not None and x0.dtype in TRITON_DTYPES and use_triton(x0, sqrt_ab, sqrt_1mab):
        return noised_input_triton(x0, sqrt_ab, sqrt_1mab, seed)
    return noised_input_reference(x0, sqrt_ab, sqrt_1mab, seed)


def noise_prediction_loss(pred: torch.Tensor, x0: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor,
                          seed: int, weights: torch.Tensor | None = None, parameterization: str = "eps",
                          ) -> torch.Tensor:
    """Per-sample loss [B] (fp32) = weights[b] * mean((pred - target)^2), target from the same eps as
    `noised_input(x0, ..., seed)`. Differentiable in pred only (weights are treated as constants)."""
    if triton is not None and pred.dtype in TRITON_DTYPES and use_triton(pred, x0, sqrt_ab, sqrt_1mab, weights):
        return noise_prediction_loss_triton(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization)
    return noise_prediction_loss_reference(pred, x0, sqrt_ab, sqrt_1mab, seed, weights, parameterization)
