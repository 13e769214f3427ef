"""Bytes moved per call: the one model that bench/RESULTS.md quotes and that bench_kernels.py
(effective GB/s) and kernel_resources.py (roofline) compute with.

A pass is one full-tensor read (R) or write (W) of N = B*C*H*W elements; bytes = passes x N x
element size (4 for fp32). Per-sample scalars ([B] schedule coefficients, loss partial sums) are
left out: B*4 bytes next to N*4.

noising + eps loss, forward + backward of one training step
  eager   randn W1 | q_sample: 2 muls R2 W2, add R2 W1 | loss: sub R2 W1, pow R1 W1, mean R1 |
          backward: 2*(pred-target) R1 W1, * grad R1 W1                             = 18 passes
  fused   noised_input kernel R1 (x0) W1 (x_t) | loss kernel R1 (pred) W1 (grad) |
          autograd backward (grad * per-sample scale) R1 W1                          =  6 passes
  split   noising (randn + q_sample): eager 8, fused 2 (the noised_input kernel);
          loss forward + backward: eager 10, fused 4 (loss kernel 2 + backward 2)
  v target: eager +7 passes (sqrt_ab*eps - sqrt_1mab*x0), fused +1 (x0 read by the loss kernel)
guided step (DDIM, clip_x0, sigma = 0; eps_c, eps_u, x_t are N each)
  eager   diff R2 W1, norm R1, eps R2 W1 (+ scale R1 W1), x0 R2 W1 (+ div R1 W1), clamp R1 W1,
          eps' R2 W1 (+ div R1 W1), x_prev R2 W1 (+ R1 W1)                          ~ 28 passes
  fused   R3 (eps_c, eps_u, x_t) W1 (x_prev)                                         =  4 passes
          (+ R1 of the noise with sigma > 0)
DP direct per-sample norm, A [B, T, P] and B [B, T, Q]
  ideal   A and B read once: B*T*(P + Q) elements; the kernel reads A once per Q tile and B once
          per P tile (from L2 when the tiles of a sample fit there): B*T*(P*n_q + Q*n_p)
  materialised (einsum per-sample gradients): ideal + W and R of B*P*Q fp32 gradients
DP noise step over n gradient elements
  eager   randn W1, add_ R2 W1, mul_ R1 W1                                           =  6 passes
  fused   noise-scale kernel R1 W1                                                   =  2 passes
"""
FP32 = 4

NOISING_PASSES = dict(eager=8, fused=2)
LOSS_PASSES = dict(eager=10, fused=4)
NOISING_LOSS_V_EXTRA = dict(eager=7, fused=1)
GUIDED_STEP_PASSES = dict(eager=28, fused=4)
NOISE_STEP_PASSES = dict(eager=6, fused=2)


def noising_loss_step_bytes(n: int, impl: str, v_target: bool = False, elt: int = FP32) -> int:
    """One training step's noising + loss, forward and backward (impl: 'eager' or 'fused')."""
    return noising_bytes(n, impl, elt) + loss_bytes(n, impl, v_target, elt)


def noising_bytes(n: int, impl: str, elt: int = FP32) -> int:
    """randn + q_sample (eager) or the noised_input kernel (fused)."""
    return NOISING_PASSES[impl] * n * elt


def loss_bytes(n: int, impl: str, v_target: bool = False, elt: int = FP32) -> int:
    """Loss forward + backward: eager ops, or the loss kernel plus the autograd backward's scale."""
    return (LOSS_PASSES[impl] + (NOISING_LOSS_V_EXTRA[impl] if v_target else 0)) * n * elt


def loss_kernel_bytes(n: int, pred_elt: int = FP32, v_target: bool = False, x0_elt: int = FP32) -> int:
    """The loss kernel alone (its 2 passes of the fused loss, +1 x0 read for v), pred/grad of pred_elt bytes."""
    return n * (2 * pred_elt + (x0_elt if v_target else 0))


def guided_step_bytes(n: int, impl: str, elt: int = FP32, noise: bool = False) -> int:
    """n = elements of x_t (B*C*H*W)."""
    return (GUIDED_STEP_PASSES[impl] + (1 if noise and impl == "fused" else 0)) * n * elt


def direct_norm_bytes(b: int, t: int, p: int, q: int, impl: str, elt: int = FP32, n_p: int = 1, n_q: int = 1) -> int:
    """impl: 'ideal' (each input read once), 'tiled' (the kernel's re-reads, n_p x n_q tiles) or
    'materialised' (per-sample gradients written and read back)."""
    if impl == "ideal":
        return elt * b * t * (p + q)
    if impl == "tiled":
        return elt * b * t * (p * n_q + q * n_p)
    if impl == "materialised":
        return elt * b * t * (p + q) + 2 * FP32 * b * p * q
    raise ValueError(f"direct_norm_bytes: impl {impl!r}")


def direct_norm_flops(b: int, t: int, p: int, q: int) -> int:
    """Multiply-adds of A_i^T B_i for every sample, counted as 2 flops each."""
    return 2 * b * t * p * q


def noise_step_bytes(n: int, impl: str, elt: int = FP32) -> int:
    return NOISE_STEP_PASSES[impl] * n * elt
