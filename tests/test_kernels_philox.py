"""kernels/philox.py (in place, chunked, one wrapping int64 product per 32-bit multiply) against the
straightforward formulation it replaced: Philox-4x32 with each product split into 16-bit halves so
nothing overflows, on full-size temporaries. Bit for bit, words and normals, over many seeds
(64-bit ones included) and offsets (past 2^32, random, unordered, across chunk boundaries)."""
import pytest
import torch
from kernel_test_support import fresh_seed

from kernels import philox

MASK = 0xFFFFFFFF


def mulhilo_halves(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo                                   # < 2^48
    mid = a * b_hi + (p_lo >> 16)                     # < 2^48 + 2^32
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox_halves(seed: int, c0, c1, c2, c3, n_rounds: int = 10):
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & MASK, (seed >> 32) & MASK
    for _ in range(n_rounds):
        hi_b, lo_b = mulhilo_halves(0xCD9E8D57, c2)
        hi_a, lo_a = mulhilo_halves(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
    return c0, c1, c2, c3


def uniform_where(x: torch.Tensor) -> torch.Tensor:
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def randn_straightforward(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    offsets = offsets.to(torch.int64)
    lo, hi = offsets & MASK, (offsets >> 32) & MASK
    zero = torch.zeros_like(lo)
    r0, r1, _, _ = philox_halves(seed, lo, hi, zero, zero)
    u1 = uniform_where(r0).clamp_min(1.0e-7)
    theta = torch.tensor(6.283185307179586, dtype=torch.float32) * uniform_where(r1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


SEEDS = (0, 1, 2**31 - 1, 2**32 - 1, 2**32, 2**40 + 7, 2**62 + 12345, 2**63 - 1, 2**64 - 1, 0xDEADBEEFCAFEBABE)


def test_words_match_the_half_product_formulation():
    gen = torch.Generator().manual_seed(fresh_seed())
    seeds = list(SEEDS) + torch.randint(0, 2**63 - 1, (30,), generator=gen).tolist()
    for seed in seeds:
        c0 = torch.randint(0, 2**32, (4096,), generator=gen)
        c1 = torch.randint(0, 2**32, (4096,), generator=gen)
        c1[:4] = torch.tensor([0, MASK, 2**31, 2**31 - 1])
        c0[:4] = torch.tensor([MASK, 0, 2**31 - 1, 2**31])
        want = philox_halves(seed, c0, c1, torch.zeros_like(c0), torch.zeros_like(c0))[:2]
        got = philox.philox_first_words(seed, c0.clone(), c1.clone())
        for w, g in zip(want, got):
            assert torch.equal(w, g), f"seed {seed}"
            assert int(g.min()) >= 0 and int(g.max()) <= MASK


@pytest.mark.parametrize("chunk", [philox.CHUNK, 1000])
def test_normals_match_bit_for_bit(monkeypatch, chunk):
    """Contiguous ranges from 0, around 2^31 and 2^32, past 2^40 and 2^62, random unordered offsets
    and a 2-d offset tensor; with a small CHUNK the ranges straddle many chunk boundaries."""
    monkeypatch.setattr(philox, "CHUNK", chunk)
    gen = torch.Generator().manual_seed(fresh_seed())
    seeds = list(SEEDS) + torch.randint(0, 2**63 - 1, (6,), generator=gen).tolist()
    for seed in seeds:
        for base in (0, 2**31 - 1500, 2**32 - 1700, 2**33 + 3, 2**40, 2**62):
            offsets = torch.arange(3001) + base
            assert torch.equal(philox.randn_like_triton(seed, offsets), randn_straightforward(seed, offsets)), \
                f"seed {seed} base {base}"
        offsets = torch.randint(0, 2**62, (2503,), generator=gen)
        assert torch.equal(philox.randn_like_triton(seed, offsets), randn_straightforward(seed, offsets)), f"seed {seed}"
    offsets = torch.randint(0, 2**40, (37, 91), generator=gen)
    got = philox.randn_like_triton(123, offsets)
    assert got.shape == (37, 91) and torch.equal(got, randn_straightforward(123, offsets))
    assert philox.randn_like_triton(5, torch.zeros(0, dtype=torch.int64)).shape == (0,)


def test_a_full_dp_noise_call_is_unchanged():
    """One call the size of the demo U-Net's flat gradient (473k elements, several chunks), as the
    DP step draws it, and the training noise of a batch (randn_for_shape)."""
    seed = (fresh_seed() << 32) | 0x5EED
    offsets = torch.arange(473_117)
    assert torch.equal(philox.randn_like_triton(seed, offsets), randn_straightforward(seed, offsets))
    assert torch.equal(philox.randn_for_shape(seed, (32, 1, 32, 32)),
                       randn_straightforward(seed, torch.arange(32 * 32 * 32)).reshape(32, 1, 32, 32))
