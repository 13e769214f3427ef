"""Triton's counter-based normal RNG (`tl.randn(seed, offset)`) reproduced in PyTorch integer arithmetic.

This lets the PyTorch references of the noising kernels draw exactly the noise the Triton kernels
draw, so CPU (reference) and CUDA (kernel) training see the same eps for the same (seed, offset).

What `tl.randn(seed, offset)` does (triton/language/random.py, triton 3.x), mirrored here:
  counter = (offset_lo32, offset_hi32, 0, 0), key = (seed_lo32, seed_hi32)
  10 Philox-4x32 rounds (constants 0xD2511F53 / 0xCD9E8D57, key bumps 0x9E3779B9 / 0xBB67AE85)
  the first two output words -> uniform floats: bitcast to int32, x<0 -> ~x, times 4.6566127342e-10 (fp32)
  Box-Muller on (u1, u2): sqrt(-2 log max(u1, 1e-7)) * cos(2 pi u2), evaluated in fp32.

uint32 values are held in int64 tensors (torch has no general uint32 arithmetic); products of two
32-bit words are split into 16-bit halves so nothing overflows int64.
"""
import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10    # largest scale with (2^31 - 1) * scale < 1 in fp32
_TWO_PI = 6.283185307179586


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of constant a and the uint32 values in b."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo                      # < 2^48
    mid = a * b_hi + (p_lo >> 16)        # < 2^48 + 2^32: the product is mid * 2^16 + (p_lo & 0xFFFF)
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox_4x32(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                n_rounds: int = N_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox-4x32 on int64 tensors holding uint32 words, keyed by a 64-bit seed (as Triton keys it)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit words: a float32 in [0, 1)."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed)   # ~x for negative two's-complement values
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def randn_like_triton(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 N(0,1) draws equal to `tl.randn(seed, offsets)` for the given int64 offsets."""
    offsets = offsets.to(torch.int64)
    lo = offsets & _MASK32
    hi = (offsets >> 32) & _MASK32
    zero = torch.zeros_like(lo)
    r0, r1, _, _ = philox_4x32(seed, lo, hi, zero, zero)
    u1 = uint32_to_uniform(r0).clamp_min(1.0e-7)
    u2 = uint32_to_uniform(r1)
    theta = torch.tensor(_TWO_PI, dtype=torch.float32) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(theta)


def randn_for_shape(seed: int, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise a kernel draws for a contiguous tensor of `shape`: element i (flat index) gets offset i."""
    numel = 1
    for s in shape:
        numel *= int(s)
    offsets = torch.arange(numel, dtype=torch.int64, device=device)
    return randn_like_triton(seed, offsets).reshape(shape)
