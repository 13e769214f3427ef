"""DP-SGD building blocks: per-sample gradient norms without per-sample gradients, clipping, noise.

Per-sample squared norms come from what backprop already has: a layer's input activations A_i and
the gradient B_i of its output, for each sample i.

  Linear  (A_i [T, P], B_i [T, Q]; T = 1 without a sequence dim)   grad W_i = B_i^T A_i
      T == 1   ||W_i||^2 = ||a_i||^2 ||b_i||^2                    (outer product, exact, O(P + Q))
      direct   sum over tiles of (A_i^T B_i)^2                      O(T P Q); the Triton kernel keeps each
               [P, Q] tile in registers and reduces its squares in the epilogue: nothing [B, P, Q] is stored
      ghost    sum((A_i A_i^T) * (B_i B_i^T))                       O(T^2 (P + Q)), memory B T^2
      "auto" takes the cheaper of direct and ghost for the layer's shapes.
  Conv2d  the same with A_i = the input's patches [L, C_in k k] (im2col, from a strided view of the
          padded input), B_i = grad_out_i [L, C_out]; or
      grouped  the per-sample weight gradients from the convolution's own weight gradient with the
               batch as groups (no patch matrix), squared and summed    O(T P Q), memory B x |W|
  bias    ||sum_t B_i[t]||^2
  GroupNorm / LayerNorm   per-sample sums of grad * x_hat (weight) and grad (bias), x_hat recomputed
  Embedding               sum_{s,t} [tok_s == tok_t] <B_s, B_t>  (rows hit by repeated tokens add up)

`PerSampleNormHooks(model)` records the inputs/outputs of every supported layer during the forward
pass and `clipped_backward(per_sample_loss, clip_norm)` runs (1) one backward to the layer outputs
only (no parameter gradients formed) to get the norms, (2) sum_i c_i g_i with c_i = min(1, C /
(||g_i|| + 1e-6)) layer by layer from the same activations and output gradients ("book-keeping"):
each layer's parameter gradient is a sum over samples of a function of (A_i, B_i) that is linear in
B_i, so scaling row i of B by c_i gives that layer's gradient of sum_i c_i loss_i exactly, without a
second backward through the network. Which exact rule each Linear/Conv2d weight uses is measured
on the first norm pass (method "measured", the default). `add_noise_and_scale_` then adds
N(0, sigma^2 C^2) and divides by the expected batch size in one pass per gradient tensor.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.backend import INT32_MAX, TRITON_DTYPES, Launch, use_triton
from kernels.philox import randn_like_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every kernel output buffer comes from here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)

METHODS = ("auto", "direct", "ghost")                  # rules of linear_weight_sq_norms
CONV_METHODS = METHODS + ("grouped",)                   # rules of conv2d_weight_sq_norms
HOOK_METHODS = ("measured",) + CONV_METHODS             # what PerSampleNormHooks takes
MEASURE_WITHIN = 4.0    # "measured" times the rules within this factor of the fewest multiply-adds
KEEP_BYTES = 256 << 20  # per-sample gradients a rule forms anyway, kept for the clipped sum (in all)
_REF_CHUNK_ELEMS = 1 << 26    # bound the reference's per-chunk [b, P, Q] / [b, T, T] temporaries


# ----------------------------------------------------------------------------- cost model

def choose_method(t: int, p: int, q: int) -> str:
    """'direct' (tile A^T B) or 'ghost' (Gram identity), whichever needs fewer multiply-adds."""
    return "ghost" if t * t * (p + q) < t * p * q else "direct"


# ----------------------------------------------------------------------------- references

def _chunks(bsz: int, per_sample: int) -> int:
    return max(1, min(bsz, _REF_CHUNK_ELEMS // max(per_sample, 1)))


def direct_sq_norms_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum((A_i^T B_i)^2) per sample, a [B, T, P], b [B, T, Q] (forms the per-sample products, chunked)."""
    out = []
    step = _chunks(a.shape[0], a.shape[2] * b.shape[2])
    for s in range(0, a.shape[0], step):
        out.append(torch.bmm(a[s:s + step].transpose(1, 2), b[s:s + step]).square().sum(dim=(1, 2)))
    return torch.cat(out)


def ghost_sq_norms_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum((A_i A_i^T) * (B_i B_i^T)) per sample: the ghost-norm identity, a [B, T, P], b [B, T, Q]."""
    out = []
    step = _chunks(a.shape[0], a.shape[1] * a.shape[1])
    for s in range(0, a.shape[0], step):
        aa = torch.bmm(a[s:s + step], a[s:s + step].transpose(1, 2))
        bb = torch.bmm(b[s:s + step], b[s:s + step].transpose(1, 2))
        out.append((aa * bb).sum(dim=(1, 2)))
    return torch.cat(out)


# ----------------------------------------------------------------------------- triton

if triton is not None:
    # Sizes and batch strides are typed (never a compile-time constant, width independent of the
    # value); the four in-sample strides are left to Triton's specialisation, which turns a stride
    # of 1 into a constant so that loads along that axis are contiguous (STRIDE_PATTERNS).
    @triton.jit
    def _direct_sq_norm_kernel(a_ptr, b_ptr, partial_ptr, T: tl.int32, P: tl.int32, Q: tl.int32,
                               sa_b: tl.int64, sa_t, sa_p, sb_b: tl.int64, sb_t, sb_q, n_tiles_q: tl.int32,
                               IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                               BLOCK_Q: tl.constexpr):
        """One [BLOCK_P, BLOCK_Q] tile of A_i^T B_i, accumulated over T, squared and summed.
        In-sample offsets are int32: the launch code refuses a sample whose span does not fit."""
        i = tl.program_id(0)
        pid_p = tl.program_id(1)
        pid_q = tl.program_id(2)
        rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        rt = tl.arange(0, BLOCK_T)
        a_base = a_ptr + i.to(tl.int64) * sa_b
        b_base = b_ptr + i.to(tl.int64) * sb_b
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + rt
            a = tl.load(a_base + rp[:, None] * sa_p + t[None, :] * sa_t,
                        mask=(rp[:, None] < P) & (t[None, :] < T), other=0.0)          # [BP, BT]
            b = tl.load(b_base + t[:, None] * sb_t + rq[None, :] * sb_q,
                        mask=(t[:, None] < T) & (rq[None, :] < Q), other=0.0)          # [BT, BQ]
            # bf16/fp16 tiles go through tf32 tensor cores (fp32 accumulate); fp32 inputs stay exact (ieee)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        sq = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
        tl.store(partial_ptr + i * (tl.num_programs(1) * n_tiles_q) + pid_p * n_tiles_q + pid_q, sq)


def direct_tiles(dtype: torch.dtype) -> dict:
    """The tile (constexprs) and warps the dispatch launches the direct kernel with, per input dtype.
    float32 runs an exact FMA dot: at BLOCK_T = 32 over 4 warps ptxas used all 255 registers on
    sm_80 and spilled, so it takes K tiles of 16 over 8 warps (<= 128 registers, no spills; see
    bench/RESULTS.md). An FMA dot accumulates over t in order whatever the tile, so results are
    unchanged. bf16/fp16 tiles go through tf32 tensor cores at 32 x 64 x 64 over 4 warps."""
    if dtype == torch.float32:
        return dict(IEEE=True, BLOCK_T=16, BLOCK_P=64, BLOCK_Q=64, num_warps=8)
    return dict(IEEE=False, BLOCK_T=32, BLOCK_P=64, BLOCK_Q=64, num_warps=4)


def _direct_launch(a: torch.Tensor, b: torch.Tensor, tiles: dict | None = None) -> tuple[Launch, torch.Tensor]:
    """The launch direct_sq_norms_triton makes and its partial sums [B, n_tiles]."""
    constexprs = dict(tiles or direct_tiles(a.dtype))
    num_warps = constexprs.pop("num_warps")
    if a.dtype != b.dtype:
        b = b.to(a.dtype)
    bsz, t, p = a.shape
    q = b.shape[2]
    bt, bp, bq = constexprs["BLOCK_T"], constexprs["BLOCK_P"], constexprs["BLOCK_Q"]
    n_p, n_q = triton.cdiv(p, bp), triton.cdiv(q, bq)
    # every in-sample offset the kernel forms (padded tiles included) must fit in int32
    span_a = (n_p * bp - 1) * a.stride(2) + (triton.cdiv(t, bt) * bt - 1) * a.stride(1)
    span_b = (n_q * bq - 1) * b.stride(2) + (triton.cdiv(t, bt) * bt - 1) * b.stride(1)
    if max(span_a, span_b, bsz * n_p * n_q, t, p, q) > INT32_MAX:
        raise ValueError(f"direct_sq_norms_triton: a [{bsz}, {t}, {p}] strides {a.stride()}, b [{bsz}, {t}, {q}] "
                         f"strides {b.stride()}: in-sample offsets exceed the kernel's int32 range")
    partial = _alloc((bsz, n_p * n_q), torch.float32, a.device)
    launch = Launch(_direct_sq_norm_kernel, (bsz, n_p, n_q),
                    (a, b, partial, t, p, q, a.stride(0), a.stride(1), a.stride(2),
                     b.stride(0), b.stride(1), b.stride(2), n_q),
                    constexprs, num_warps)
    return launch, partial


def direct_sq_norms_triton(a: torch.Tensor, b: torch.Tensor, block_t: int | None = None,
                           block_p: int | None = None, block_q: int | None = None) -> torch.Tensor:
    """Same as direct_sq_norms_reference; any strides (so unfold()^T views need no copy). Explicit
    tile sizes are for interpreter tests only; the dispatch always uses direct_tiles(a.dtype)."""
    if triton is None:
        raise RuntimeError("direct_sq_norms_triton: triton is not installed")
    tiles = None
    if (block_t, block_p, block_q) != (None, None, None):
        tiles = dict(direct_tiles(a.dtype), BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_Q=block_q)
    launch, partial = _direct_launch(a, b, tiles)
    launch.run()
    return partial.sum(dim=1)


# Which of the in-sample strides (a: t, p; b: t, q) equal 1. Each pattern is its own compiled
# variant; all 16 can reach the kernel (unfold()^T views: a's t stride; contiguous Linear inputs:
# a's p stride; NCHW / channels_last output gradients: b's t / q stride; both at size-1 axes).
STRIDE_PATTERNS = tuple((at, ap, bt, bq) for at in (False, True) for ap in (False, True)
                        for bt in (False, True) for bq in (False, True))


def _direct_launch_space() -> list[Launch]:
    bsz, t, p, q = 4, 256, 96, 80
    launches = []
    for dtype in TRITON_DTYPES:
        for unit_at, unit_ap, unit_bt, unit_bq in STRIDE_PATTERNS:
            # non-unit strides: multiples of 16 apart from the unit ones (their value does not matter)
            sa = (t * p * 16, 1 if unit_at else p * 16, 1 if unit_ap else 16)
            sb = (t * q * 16, 1 if unit_bt else q * 16, 1 if unit_bq else 16)
            a = torch.empty_strided((bsz, t, p), sa, dtype=dtype, device="meta")
            b = torch.empty_strided((bsz, t, q), sb, dtype=dtype, device="meta")
            launches.append(_direct_launch(a, b)[0])
    return launches


# ----------------------------------------------------------------------------- per-layer rules

def grouped_direct_sq_norms_reference(a: torch.Tensor, b: torch.Tensor, rows: int) -> torch.Tensor:
    """sum((sum_k A_ik^T B_ik)^2) per sample for a [B*K, T, P], b [B*K, T, Q]: one product per row,
    summed over the sample's K rows before squaring (no copy of the activations to fold them)."""
    bsz, out = a.shape[0] // rows, []
    step = _chunks(bsz, rows * a.shape[2] * b.shape[2])
    for s in range(0, bsz, step):
        r = slice(s * rows, (s + step) * rows)
        prod = torch.bmm(a[r].transpose(1, 2), b[r])
        out.append(prod.reshape(-1, rows, *prod.shape[1:]).sum(dim=1).square().sum(dim=(1, 2)))
    return torch.cat(out)


def linear_weight_sq_norms(a: torch.Tensor, b: torch.Tensor, method: str = "auto",
                           rows_per_sample: int = 1) -> torch.Tensor:
    """Per-sample ||dL_i/dW||_F^2 for y = x W^T, a = x [B*K, *, P], b = dL/dy [B*K, *, Q] -> [B]
    (fp32/fp64); sample i owns rows i*K .. i*K+K-1 (K = rows_per_sample, DP noise multiplicity)."""
    if method not in METHODS:
        raise ValueError(f"linear_weight_sq_norms: method {method!r} not in {METHODS}")
    k = rows_per_sample
    cdt = torch.promote_types(a.dtype, torch.float32)
    a = a.reshape(a.shape[0], -1, a.shape[-1])
    b = b.reshape(b.shape[0], -1, b.shape[-1])
    t, p, q = a.shape[1] * k, a.shape[2], b.shape[2]        # t: positions per sample
    if t == 1:
        return a.to(cdt).square().sum(dim=(1, 2)) * b.to(cdt).square().sum(dim=(1, 2))
    if method == "auto":
        method = choose_method(t, p, q)
    if method == "direct":
        if k > 1:
            return grouped_direct_sq_norms_reference(a.to(cdt), b.to(cdt), k)
        if triton is not None and a.dtype in TRITON_DTYPES and use_triton(a, b):
            return direct_sq_norms_triton(a, b)
        return direct_sq_norms_reference(a.to(cdt), b.to(cdt))
    # Gram identity over all of a sample's positions, its K rows' included
    return ghost_sq_norms_reference(a.to(cdt).reshape(-1, t, p), b.to(cdt).reshape(-1, t, q))


def conv_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """F.unfold(x) [B, C_in k k, L] for the conv's kernel, stride, dilation and (zero) padding, copied
    once out of a strided view of the padded input (as Opacus does): on this project's CPU,
    aten::im2col took 20% of a DP step's operator time and this copy about a third of that."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    n, c, h, w = xp.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = xp.stride()
    view = xp.as_strided((n, c, kh, kw, ho, wo), (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw),
                         xp.storage_offset())
    return view.reshape(n, c * kh * kw, ho * wo)


def conv2d_per_sample_weight_grads(x: torch.Tensor, grad_out: torch.Tensor, conv: nn.Conv2d,
                                   rows_per_sample: int = 1) -> torch.Tensor:
    """dL_i/dW [B, C_out, C_in, kh, kw] (fp32/fp64) of a groups=1 Conv2d: the convolution's own weight
    gradient with the batch rows as groups, a sample's K rows summed."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    n, c_in, c_out = x.shape[0], x.shape[1], grad_out.shape[1]
    per_row = torch.nn.grad.conv2d_weight(
        x.to(cdt).reshape(1, n * c_in, *x.shape[2:]), (n * c_out, c_in, *conv.kernel_size),
        grad_out.to(cdt).reshape(1, n * c_out, *grad_out.shape[2:]), conv.stride, conv.padding, conv.dilation,
        groups=n)                                           # [B*K*C_out, C_in, kh, kw]
    return per_row.reshape(n // rows_per_sample, rows_per_sample, c_out, c_in, *conv.kernel_size).sum(dim=1)


def conv2d_weight_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, conv: nn.Conv2d, method: str = "auto",
                           rows_per_sample: int = 1) -> torch.Tensor:
    """Per-sample ||dL_i/dW||^2 of a groups=1 Conv2d from its input x and output gradient.
    With rows_per_sample K, rows i*K .. i*K+K-1 belong to sample i: their patches are one sample's.
    method: "direct" / "ghost" on the patch matrix (im2col), "auto" the cheaper of the two,
    "grouped" the per-sample weight gradients themselves (one grouped weight-gradient convolution)."""
    if method not in CONV_METHODS:
        raise ValueError(f"conv2d_weight_sq_norms: method {method!r} not in {CONV_METHODS}")
    if method == "grouped":
        return conv2d_per_sample_weight_grads(x, grad_out, conv, rows_per_sample).flatten(1).square().sum(dim=1)
    cols = conv_patches(x, conv)                                 # [B*K, C_in k k, L]
    g = grad_out.flatten(2)                                      # [B*K, C_out, L]
    return linear_weight_sq_norms(cols.transpose(1, 2), g.transpose(1, 2), method, rows_per_sample)


def weight_rule_costs(module: nn.Module, x: torch.Tensor, g: torch.Tensor, rows_per_sample: int) -> dict[str, int]:
    """Multiply-adds per sample of every exact rule for a Linear or Conv2d weight ({"outer": ...}
    alone when a Linear has one position per sample)."""
    if isinstance(module, nn.Linear):
        p, q = x.shape[-1], g.shape[-1]
        t = x.numel() // max(x.shape[0] * p, 1) * rows_per_sample
        if t == 1:
            return {"outer": p + q}
        return {"direct": t * p * q, "ghost": t * t * (p + q)}
    p = x.shape[1] * module.kernel_size[0] * module.kernel_size[1]
    q, t = g.shape[1], g.shape[2] * g.shape[3] * rows_per_sample
    return {"direct": t * p * q, "grouped": t * p * q, "ghost": t * t * (p + q)}


def fastest(candidates: dict[str, Callable[[], object]], device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Seconds per call of each candidate (the minimum over `repeats` interleaved calls: the first
    call's one-off costs and other jobs' interference only ever add time)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best = {name: math.inf for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def bias_sq_norms(grad_out: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Per-sample ||dL_i/db||^2: the output gradient summed over everything but batch and channel."""
    g = grad_out.movedim(channel_dim, -1)
    g = g.reshape(g.shape[0], -1, g.shape[-1]).sum(dim=1)
    return g.to(torch.promote_types(g.dtype, torch.float32)).square().sum(dim=1)


def norm_layer_sq_norms(x_hat: torch.Tensor, grad_out: torch.Tensor, channel_dims: int, has_weight: bool,
                        has_bias: bool, channels_last: bool) -> torch.Tensor:
    """GroupNorm (channels at dim 1) / LayerNorm (normalized dims last) affine parameters."""
    cdt = torch.promote_types(grad_out.dtype, torch.float32)
    bsz = grad_out.shape[0]
    if channels_last:
        shape = (bsz, -1, math.prod(grad_out.shape[grad_out.dim() - channel_dims:]))
        reduce_dim = 1
    else:
        shape = (bsz, grad_out.shape[1], -1)
        reduce_dim = 2
    g = grad_out.to(cdt).reshape(shape)
    total = torch.zeros(bsz, dtype=cdt, device=grad_out.device)
    if has_weight:
        total = total + (g * x_hat.to(cdt).reshape(shape)).sum(dim=reduce_dim).square().sum(dim=1)
    if has_bias:
        total = total + g.sum(dim=reduce_dim).square().sum(dim=1)
    return total


def embedding_sq_norms(idx: torch.Tensor, grad_out: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """Per-sample ||dL_i/dE||^2: sum_{s,t} [tok_s == tok_t] <g_s, g_t> (padding rows get no gradient)."""
    bsz = idx.shape[0]
    cdt = torch.promote_types(grad_out.dtype, torch.float32)
    idx = idx.reshape(bsz, -1)
    g = grad_out.reshape(bsz, idx.shape[1], -1).to(cdt)
    same = idx[:, :, None] == idx[:, None, :]
    if padding_idx is not None:
        keep = idx != padding_idx
        same = same & keep[:, :, None] & keep[:, None, :]
    return (torch.bmm(g, g.transpose(1, 2)) * same).sum(dim=(1, 2))


# ----------------------------------------------------------------------------- model hooks

_SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


class PerSampleNormHooks:
    """Per-sample gradient norms of a model's trainable parameters, for DP-SGD.

    Usage, once per step (the model must see each sample independently: no BatchNorm):
        hooks = PerSampleNormHooks(model)                # once; raises for unsupported layers
        loss = per_sample_loss(model(...))               # [B], one forward pass
        norms = hooks.clipped_backward(loss, clip_norm)  # .grad = sum_i min(1, C/(|g_i|+1e-6)) g_i
        add_noise_and_scale_(grads, noise_multiplier, clip_norm, expected_batch_size, seed)

    Every layer owning trainable parameters must be Linear, Conv2d (groups=1, numeric padding,
    zeros padding mode), GroupNorm, LayerNorm or Embedding (no max_norm, sparse or
    scale_grad_by_freq), must be called once per forward and with the batch as dim 0 of its input
    (a position Embedding called on [L] indices must be fed `positions.expand(B, L)` instead), and
    its parameters must be used only by its own forward.

    method: "measured" (default) times the exact rules of each Linear/Conv2d weight within
    MEASURE_WITHIN of the fewest multiply-adds on the layer's first norm pass and keeps the fastest
    (`self.plan`, `self.plan_seconds`); "auto" the fewest multiply-adds; "direct" / "ghost" /
    "grouped" that rule wherever it applies (grouped: Conv2d only; Linear layers then take "auto").
    Every rule is exact: the choice changes floating-point summation order, nothing else.
    The per-sample weight gradients the "grouped" rule forms are kept (up to `keep_bytes` in all)
    and give that layer's clipped sum as sum_i c_i G_i, instead of a second weight-gradient pass.
    """

    def __init__(self, model: nn.Module, method: str = "measured", rows_per_sample: int = 1,
                 keep_bytes: int = KEEP_BYTES) -> None:
        if method not in HOOK_METHODS:
            raise ValueError(f"PerSampleNormHooks: method {method!r} not in {HOOK_METHODS}")
        if not (isinstance(rows_per_sample, int) and rows_per_sample >= 1):
            raise ValueError(f"PerSampleNormHooks: rows_per_sample must be an integer >= 1, got {rows_per_sample!r}")
        self.method = method
        self.rows = rows_per_sample   # K consecutive batch rows per sample (DP noise multiplicity)
        self.model = model
        self.plan: dict[str, str] = {}                        # layer label -> weight rule ("measured")
        self.plan_seconds: dict[str, dict[str, float]] = {}   # layer label -> seconds of each rule timed
        self.keep_bytes = keep_bytes
        self._kept: dict[str, torch.Tensor] | None = None     # label -> per-sample weight gradients (one pass)
        self._records: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
        self._in_backward = False
        self._handles = []
        self.params: list[nn.Parameter] = []
        for name, module in model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            label = name or type(module).__name__
            if not isinstance(module, _SUPPORTED):
                raise ValueError(f"PerSampleNormHooks: layer '{label}' ({type(module).__name__}) has trainable "
                                 f"parameters {[n for n, _ in own]} but no per-sample norm rule "
                                 f"(supported: {', '.join(t.__name__ for t in _SUPPORTED)})")
            extra = [n for n, _ in own if n not in ("weight", "bias")]
            if extra:
                raise ValueError(f"PerSampleNormHooks: layer '{label}' has extra parameters {extra}")
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or isinstance(module.padding, str)
                                                  or module.padding_mode != "zeros"):
                raise ValueError(f"PerSampleNormHooks: conv '{label}' needs groups=1, numeric padding and "
                                 f"padding_mode='zeros' (got groups={module.groups}, padding={module.padding!r}, "
                                 f"padding_mode={module.padding_mode!r})")
            if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse
                                                     or module.scale_grad_by_freq):
                # scale_grad_by_freq divides by counts over the whole batch: not a sum of per-sample gradients
                raise ValueError(f"PerSampleNormHooks: embedding '{label}' with max_norm/sparse/scale_grad_by_freq "
                                 f"is not supported")
            self.params.extend(p for _, p in own)
            self._handles.append(module.register_forward_hook(self._make_hook(label)))

    def _make_hook(self, label: str):
        def hook(module, inputs, output):
            # skip no-grad forwards and checkpoint recomputation inside our backward passes
            if self._in_backward or not torch.is_grad_enabled() or not output.requires_grad:
                return
            self._records.append((label, module, inputs[0].detach(), output))
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._records.clear()

    def discard(self) -> None:
        """Forget what the last forward recorded (e.g. after a forward that is not trained on)."""
        self._records.clear()

    def _weight_sq_norms(self, module, x, g, rule: str) -> torch.Tensor:
        if isinstance(module, nn.Linear):
            return linear_weight_sq_norms(x, g, "auto" if rule in ("grouped", "outer") else rule, self.rows)
        return conv2d_weight_sq_norms(x, g, module, rule, self.rows)

    def _weight_rule(self, label, module, x, g) -> str:
        """The rule of this layer's weight: fixed by `method`, or measured once per layer."""
        if self.method != "measured":
            return self.method
        if label not in self.plan:
            costs = weight_rule_costs(module, x, g, self.rows)
            cheapest = min(costs.values())
            rules = [r for r, c in costs.items() if c <= MEASURE_WITHIN * cheapest]
            if len(rules) == 1:
                self.plan[label] = rules[0]
            else:
                seconds = fastest({r: (lambda r=r: self._weight_sq_norms(module, x, g, r)) for r in rules}, x.device)
                self.plan_seconds[label] = seconds
                self.plan[label] = min(seconds, key=seconds.get)
        return self.plan[label]

    def _layer_sq_norms(self, label, module, x, g) -> torch.Tensor:
        """Per-sample squared norm of one layer's parameter gradients. A sample's K rows are folded
        into its position axis: its gradient is the sum over rows and positions alike."""
        w = module.weight if module.weight is not None and module.weight.requires_grad else None
        bias = getattr(module, "bias", None)
        bias = bias if bias is not None and bias.requires_grad else None
        bsz = x.shape[0] // self.rows

        def fold_last(t: torch.Tensor) -> torch.Tensor:   # [B*K, ..., D] -> [B, K*..., D]
            return t.reshape(bsz, -1, t.shape[-1])

        if isinstance(module, (nn.Linear, nn.Conv2d)):
            rule = self._weight_rule(label, module, x, g) if w is not None else None
            if rule == "grouped" and isinstance(module, nn.Conv2d) and self._kept is not None:
                per_sample = conv2d_per_sample_weight_grads(x, g, module, self.rows)
                if sum(t.nbytes for t in self._kept.values()) + per_sample.nbytes <= self.keep_bytes:
                    self._kept[label] = per_sample
                total = per_sample.flatten(1).square().sum(dim=1)
            else:
                total = self._weight_sq_norms(module, x, g, rule) if w is not None else 0.0
            g_last = g if isinstance(module, nn.Linear) else g.movedim(1, -1)
            return total + (bias_sq_norms(fold_last(g_last), -1) if bias is not None else 0.0)
        if isinstance(module, nn.GroupNorm):
            x_hat = F.group_norm(x, module.num_groups, eps=module.eps)
            return norm_layer_sq_norms(fold_last(x_hat.movedim(1, -1)), fold_last(g.movedim(1, -1)), 1,
                                       w is not None, bias is not None, channels_last=True)
        if isinstance(module, nn.LayerNorm):
            x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps).flatten(x.dim() - len(module.normalized_shape))
            return norm_layer_sq_norms(fold_last(x_hat), fold_last(g.flatten(g.dim() - len(module.normalized_shape))), 1,
                                       w is not None, bias is not None, channels_last=True)
        if isinstance(module, nn.Embedding):
            return embedding_sq_norms(x.reshape(bsz, -1), fold_last(g), module.padding_idx)
        raise AssertionError(type(module))

    def _norm_pass(self, per_sample_loss: torch.Tensor, retain_graph: bool):
        """(per-sample squared norms [B], [(label, module, input, output gradient)] of every layer
        reached by the loss) from one backward to the recorded layer outputs."""
        records, self._records = self._records, []
        if not records:
            raise RuntimeError("PerSampleNormHooks: no layer was recorded; run the forward pass with grad enabled")
        bsz = per_sample_loss.shape[0]
        seen = set()
        for label, module, x, _ in records:
            if id(module) in seen:
                raise ValueError(f"PerSampleNormHooks: layer '{label}' ran more than once in one forward; its "
                                 f"per-sample gradient is a sum over calls and has no per-call norm rule")
            seen.add(id(module))
            if isinstance(module, (nn.Linear, nn.Embedding)) and x.dim() < 2:
                raise ValueError(f"PerSampleNormHooks: layer '{label}' called on input {tuple(x.shape)} without a "
                                 f"batch dim; call it on inputs with the batch first (e.g. positions.expand(B, L))")
            if x.shape[0] != bsz * self.rows:
                raise ValueError(f"PerSampleNormHooks: layer '{label}' saw batch dim {x.shape[0]} != {bsz} samples "
                                 f"x {self.rows} rows (input shape {tuple(x.shape)})")
        self._in_backward = True
        try:
            grads = torch.autograd.grad(per_sample_loss.sum(), [r[3] for r in records],
                                        retain_graph=retain_graph, allow_unused=True)
        finally:
            self._in_backward = False
        cdt = torch.promote_types(per_sample_loss.dtype, torch.float32)
        total = torch.zeros(bsz, dtype=cdt, device=per_sample_loss.device)
        layers = []
        with torch.no_grad():
            for (label, module, x, _), g in zip(records, grads):
                if g is not None:
                    total += self._layer_sq_norms(label, module, x, g).to(cdt)
                    layers.append((label, module, x, g))
        return total, layers

    def sq_norms(self, per_sample_loss: torch.Tensor, retain_graph: bool = True) -> torch.Tensor:
        """Per-sample ||grad of loss_i wrt all trainable parameters||^2 [B] from the recorded forward."""
        return self._norm_pass(per_sample_loss, retain_graph)[0]

    def clipped_backward(self, per_sample_loss: torch.Tensor, clip_norm: float) -> torch.Tensor:
        """Norm pass, then each layer's gradient of sum_i c_i loss_i from its recorded input and its
        output gradient with row i scaled by c_i (no second backward); .grad of every trainable
        parameter receives sum_i c_i dloss_i/dparam. Returns the unclipped per-sample norms [B]."""
        kept = self._kept = {}
        try:
            total, layers = self._norm_pass(per_sample_loss, retain_graph=False)
        finally:
            self._kept = None
        norms = total.sqrt()
        factors = clip_factors(norms, clip_norm)
        row_factors = factors.repeat_interleave(self.rows)
        with torch.no_grad():
            for label, module, x, g in layers:
                scaled = g * row_factors.to(g.dtype).reshape(-1, *[1] * (g.dim() - 1))
                grads = layer_param_grads(module, x, scaled, weight=label not in kept)
                if label in kept:
                    grads.append((module.weight, torch.tensordot(factors.to(kept[label].dtype), kept.pop(label),
                                                                 dims=1).to(module.weight.dtype)))
                for param, grad in grads:
                    param.grad = grad if param.grad is None else param.grad + grad
        return norms


def layer_param_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor,
                      weight: bool = True) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, gradient) of each trainable parameter of a supported layer, from its input x and
    the gradient g of its output: what autograd's backward would add to .grad for this call
    (weight=False: all but the weight's)."""
    w = module.weight if weight and module.weight is not None and module.weight.requires_grad else None
    bias = getattr(module, "bias", None)
    bias = bias if bias is not None and bias.requires_grad else None
    if w is None and bias is None:
        return []
    dtype = (w if w is not None else bias).dtype
    out = []
    if isinstance(module, nn.Embedding):
        d = g.shape[-1]
        grad = torch.zeros_like(w).index_add_(0, x.reshape(-1), g.reshape(-1, d).to(dtype))
        if module.padding_idx is not None:
            grad[module.padding_idx] = 0        # the padding row never receives a gradient
        return [(w, grad)]
    g, x = g.to(dtype), x.to(dtype)
    if isinstance(module, nn.Linear):
        g2 = g.reshape(-1, g.shape[-1])
        if w is not None:
            out.append((w, g2.t() @ x.reshape(-1, x.shape[-1])))
        if bias is not None:
            out.append((bias, g2.sum(dim=0)))
        return out
    if isinstance(module, nn.Conv2d):
        if w is not None:
            out.append((w, torch.nn.grad.conv2d_weight(x, module.weight.shape, g, module.stride, module.padding,
                                                       module.dilation, groups=1)))
        if bias is not None:
            out.append((bias, g.sum(dim=(0, 2, 3))))
        return out
    if isinstance(module, nn.GroupNorm):
        x_hat = F.group_norm(x, module.num_groups, eps=module.eps)
        dims = [0] + list(range(2, g.dim()))      # all but the channel dim
    elif isinstance(module, nn.LayerNorm):
        x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        dims = list(range(g.dim() - len(module.normalized_shape)))   # all but the normalized dims
    else:
        raise AssertionError(type(module))
    if w is not None:
        out.append((w, (g * x_hat).sum(dim=dims)))
    if bias is not None:
        out.append((bias, g.sum(dim=dims)))
    return out


# ----------------------------------------------------------------------------- clip + noise

def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """min(1, C / (||g_i|| + 1e-6)) per sample (detached)."""
    return (clip_norm / (norms.detach() + 1e-6)).clamp(max=1.0)


if triton is not None:
    # typed integers: one compiled variant per dtype, whatever the sizes, offsets and seed
    @triton.jit(do_not_specialize=["base_offset", "seed"])
    def _noise_scale_kernel(g_ptr, n: tl.int64, base_offset: tl.int64, seed: tl.int64, std, scale,
                            BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
        z = tl.randn(seed, base_offset + i)
        tl.store(g_ptr + i, ((g + std * z) * scale).to(g_ptr.dtype.element_ty), mask=mask)


NOISE_BLOCK = 1024
NOISE_NUM_WARPS = 8     # 4 elements per thread: with 4 warps (8 per thread) ptxas spilled on sm_80


def _noise_scale_launch(g: torch.Tensor, offset: int, seed: int, std: float, scale: float) -> Launch:
    """The launch add_noise_and_scale_ makes for one (contiguous) gradient tensor, in place."""
    return Launch(_noise_scale_kernel, (triton.cdiv(g.numel(), NOISE_BLOCK),),
                  (g, g.numel(), offset, int(seed), std, scale), dict(BLOCK=NOISE_BLOCK), NOISE_NUM_WARPS)


def launch_space() -> list[Launch]:
    """Every launch the dispatch can make: the direct norm kernel for each dtype and stride pattern,
    the noise kernel for each dtype; built by the launch code on meta tensors (kernels.aot compiles them)."""
    noise = [_noise_scale_launch(torch.empty(1 << 20, dtype=dtype, device="meta"), 2**33, 2**40, 1.0, 1 / 256)
             for dtype in TRITON_DTYPES]
    return _direct_launch_space() + noise


def _noise_offsets(grads: list[torch.Tensor]) -> list[int]:
    offs, acc = [], 0
    for g in grads:
        offs.append(acc)
        acc += g.numel()
    return offs


def add_noise_and_scale_(grads: Iterable[torch.Tensor], noise_multiplier: float, clip_norm: float,
                         expected_batch_size: float, seed: int) -> None:
    """In place: g <- (g + N(0, (noise_multiplier * clip_norm)^2)) / expected_batch_size, for every tensor.

    Noise for the k-th element of the concatenation of all (contiguous) grads is Philox(seed, k), the
    same numbers on the Triton path (one read+write pass per tensor) and the torch reference.
    Philox is not a cryptographic RNG: draw `seed` from `secrets.randbits(63)` each step for DP use.
    """
    grads = [g for g in grads if g is not None]
    if not grads:
        return
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"add_noise_and_scale_: seed must be in [0, 2^63), got {seed}")
    if expected_batch_size <= 0:
        raise ValueError(f"add_noise_and_scale_: expected_batch_size must be > 0, got {expected_batch_size}")
    for g in grads:
        if not g.is_contiguous():
            raise ValueError("add_noise_and_scale_: gradients must be contiguous")
    std, scale = float(noise_multiplier) * float(clip_norm), 1.0 / float(expected_batch_size)
    offsets = _noise_offsets(grads)
    if triton is not None and all(g.dtype in TRITON_DTYPES for g in grads) and use_triton(*grads):
        for g, off in zip(grads, offsets):
            _noise_scale_launch(g, off, seed, std, scale).run()
        return
    add_noise_and_scale_reference_(grads, noise_multiplier, clip_norm, expected_batch_size, seed)


def add_noise_and_scale_reference_(grads: list[torch.Tensor], noise_multiplier: float, clip_norm: float,
                                   expected_batch_size: float, seed: int) -> None:
    std, scale = float(noise_multiplier) * float(clip_norm), 1.0 / float(expected_batch_size)
    noise = [randn_like_triton(seed, torch.arange(g.numel(), device=g.device) + off).reshape(g.shape).to(g.dtype)
             for g, off in zip(grads, _noise_offsets(grads))]
    torch._foreach_add_(grads, noise, alpha=std)
    torch._foreach_mul_(grads, scale)
