"""Triton's counter-based normal RNG (`tl.randn(seed, offset)`) reproduced in PyTorch integer arithmetic.

This lets the PyTorch references of the noising kernels draw exactly the noise the Triton kernels
draw, so CPU (reference) and CUDA (kernel) training see the same eps for the same (seed, offset).

What `tl.randn(seed, offset)` does (triton/language/random.py, triton 3.x), mirrored here:
  counter = (offset_lo32, offset_hi32, 0, 0), key = (seed_lo32, seed_hi32)
  10 Philox-4x32 rounds (constants 0xD2511F53 / 0xCD9E8D57, key bumps 0x9E3779B9 / 0xBB67AE85)
  the first two output words -> uniform floats: bitcast to int32, x<0 -> ~x, times 4.6566127342e-10 (fp32)
  Box-Muller on (u1, u2): sqrt(-2 log max(u1, 1e-7)) * cos(2 pi u2), evaluated in fp32.

uint32 words are held in int64 tensors (torch has no general uint32 arithmetic). The product of
two 32-bit words is one int64 multiply: it wraps modulo 2^64, which keeps all 64 bits of the
unsigned product (two's complement), so hi = (p >> 32) & 0xFFFFFFFF and lo = p & 0xFFFFFFFF.
The reference is the CPU training path's noise, so it runs in place on chunks of CHUNK elements
(a chunk's five int64 buffers stay in cache instead of ~100 full-size temporaries per call);
tests/test_kernels_philox.py checks it bit for bit against the straightforward formulation.
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
CHUNK = 1 << 17                      # elements per pass (5 x 1 MiB of int64 words)


def philox_first_words(seed: int, c0: torch.Tensor, c1: torch.Tensor,
                       n_rounds: int = N_ROUNDS) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two output words of Philox-4x32 on counters (c0, c1, 0, 0) keyed by a 64-bit seed
    (as Triton keys it): the words tl.randn uses. c0, c1: int64 tensors of uint32 values, consumed
    (overwritten) as scratch."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c2, c3, spare = torch.zeros_like(c0), torch.zeros_like(c0), torch.empty_like(c0)
    # Each round: (c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0)).
    # lo words are kept unmasked (the full product): they are only ever xor-ed into a word that is
    # masked right after, so their high bits never reach a multiply or an output.
    for r in range(n_rounds):
        pb = c2.mul_(_ROUND_B)
        new_c0 = torch.bitwise_right_shift(pb, 32, out=spare).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_MASK32)
        if r == n_rounds - 1:
            return new_c0, pb.bitwise_and_(_MASK32)
        pa = c0.mul_(_ROUND_A)
        new_c2 = torch.bitwise_right_shift(pa, 32, out=c1).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_MASK32)
        c0, c1, c2, c3, spare = new_c0, pb, new_c2, pa, c3
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    raise ValueError(f"philox_first_words: n_rounds must be >= 1, got {n_rounds}")


def uint32_to_uniform_(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit words held in int64 (consumed): a float32 in [0, 1).
    As int32, x < 0 maps to ~x; for the uint32 value that is x ^ 0xFFFFFFFF when x >= 2^31."""
    flip = torch.bitwise_right_shift(x, 31).mul_(_MASK32)
    return x.bitwise_xor_(flip).to(torch.float32).mul_(torch.tensor(_UNIFORM_SCALE, dtype=torch.float32))


def _randn_chunk(seed: int, offsets: torch.Tensor, out: torch.Tensor) -> None:
    r0, r1 = philox_first_words(seed, offsets & _MASK32, torch.bitwise_right_shift(offsets, 32).bitwise_and_(_MASK32))
    u1 = uint32_to_uniform_(r0).clamp_min_(1.0e-7)
    theta = uint32_to_uniform_(r1).mul_(torch.tensor(_TWO_PI, dtype=torch.float32))
    # the same fp32 operations, in the same order, as sqrt(-2 log u1) * cos(2 pi u2)
    torch.mul(u1.log_().mul_(-2.0).sqrt_(), theta.cos_(), out=out)


def randn_like_triton(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 N(0,1) draws equal to `tl.randn(seed, offsets)` for the given int64 offsets."""
    flat = offsets.to(torch.int64).reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    for s in range(0, flat.numel(), CHUNK):
        _randn_chunk(seed, flat[s:s + CHUNK], out[s:s + CHUNK])
    return out.reshape(offsets.shape)


def randn_for_shape(seed: int, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise a kernel draws for a contiguous tensor of `shape`: element i (flat index) gets offset i."""
    numel = 1
    for s in shape:
        numel *= int(s)
    offsets = torch.arange(numel, dtype=torch.int64, device=device)
    return randn_like_triton(seed, offsets).reshape(shape)
