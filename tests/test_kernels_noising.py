"""Noising + noise-prediction loss with in-kernel Philox noise (kernels/noising.py, kernels/philox.py).

The PyTorch Philox reproduction is checked against Triton's own tl.randn (interpreter), the kernels
against the references, the fused gradient against autograd/finite differences.
"""

import pytest
import torch
from kernel_test_support import fresh_seed, interpreted_kernel_module, poison_allocations


@pytest.fixture(scope="module")
def nz():
    return interpreted_kernel_module("kernels.noising")


@pytest.fixture
def poisoned(nz, monkeypatch):
    poison_allocations(nz, monkeypatch)


def _inputs(seed, b=3, shape=(1, 9, 13), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(b, *shape, generator=gen) * 2 - 1).to(dtype)
    ab = torch.rand(b, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    return x0, ab.sqrt().float(), (1 - ab).sqrt().float(), gen


def test_philox_reference_reproduces_triton_randn(nz):
    """Triton's tl.randn vs kernels.philox for 32-bit and 64-bit seeds and offsets past 2^32."""
    import triton
    import triton.language as tl

    from kernels.philox import randn_like_triton

    @triton.jit
    def draw(out_ptr, seed, base, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.randn(seed, base + i.to(tl.int64)), mask=i < n)

    for seed in (0, fresh_seed(), 2**31 - 1, 2**40 + fresh_seed()):
        for base in (0, 2**32 - 100, 2**35 + 3):
            out = torch.full((300,), float("nan"))
            draw[(3,)](out, seed, base, 300, BLOCK=128)
            want = randn_like_triton(seed, torch.arange(300) + base)
            # bit-identical Philox words; log/cos differ by float rounding only
            torch.testing.assert_close(out, want, rtol=0, atol=2e-6, msg=f"seed {seed} base {base}")


def test_noise_is_deterministic_and_seeds_independent(nz):
    shape = (4, 1, 32, 32)
    s = fresh_seed()
    x0 = torch.zeros(shape)
    one, zero = torch.ones(4), torch.zeros(4)
    a = nz.noised_input_triton(x0, zero, one, s)          # x_t = eps exactly
    assert torch.equal(a, nz.noised_input_triton(x0, zero, one, s))
    torch.testing.assert_close(a, nz.noise_for(x0, s), rtol=0, atol=2e-6)
    b = nz.noised_input_triton(x0, zero, one, s + 1)
    n = a.numel()                                          # 4096 draws: 5-sigma bounds
    for e in (a, b):
        assert abs(e.mean().item()) < 5 / n ** 0.5
        assert abs(e.var().item() - 1) < 5 * (2 / n) ** 0.5
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
    assert abs(corr) < 5 / n ** 0.5, f"seeds {s}, {s + 1}: correlation {corr}"
    # neighbouring offsets are independent too (lag-1 autocorrelation)
    lag = torch.corrcoef(torch.stack([a.flatten()[:-1], a.flatten()[1:]]))[0, 1].item()
    assert abs(lag) < 5 / n ** 0.5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_noised_input_matches_reference_and_formula(nz, poisoned, dtype, tol):
    seed = fresh_seed()
    x0, sab, s1mab, _ = _inputs(seed, dtype=dtype)
    eps = nz.noise_for(x0, seed).double()
    want = sab.double()[:, None, None, None] * x0.double() + s1mab.double()[:, None, None, None] * eps
    for fn in (nz.noised_input_reference, nz.noised_input_triton):
        got = fn(x0, sab, s1mab, seed)
        assert got.dtype == dtype and not torch.isnan(got).any()
        err = ((got.double() - want).abs() / (want.abs() + 1)).max().item()
        assert err <= tol, f"{fn.__name__}: {err:.2e} (seed {seed})"


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_loss_and_grad_match_reference(nz, poisoned, parameterization, weighted, dtype, tol):
    seed = fresh_seed()
    x0, sab, s1mab, gen = _inputs(seed, dtype=dtype)
    w = torch.rand(3, generator=gen) + 0.5 if weighted else None
    pred = torch.randn(x0.shape, generator=gen).to(dtype).requires_grad_(True)
    upstream = torch.rand(3, generator=gen)               # a non-uniform per-sample grad_output
    ref = nz.noise_prediction_loss_reference(pred, x0, sab, s1mab, seed, w, parameterization)
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), pred)
    tri = nz.noise_prediction_loss_triton(pred, x0, sab, s1mab, seed, w, parameterization)
    (g_tri,) = torch.autograd.grad((tri * upstream).sum(), pred)
    assert tri.shape == (3,) and not torch.isnan(tri).any() and not torch.isnan(g_tri).any()
    torch.testing.assert_close(tri, ref, rtol=tol, atol=tol * 1e-2, msg=f"seed {seed}")
    # Both gradients against the exact one (float64 from the same inputs), within the casts each path
    # makes to `dtype`, each off by at most one ulp (2u: Triton's interpreter truncates fp32 -> bf16
    # rather than rounding): the reference casts once (its fp32 gradient), the fused path twice (the
    # stored d loss / d pred, then its product with grad_output).
    p64 = pred.detach().double().requires_grad_(True)
    exact = nz.noise_prediction_loss_reference(p64, x0.double(), sab.double(), s1mab.double(), seed,
                                               None if w is None else w.double(), parameterization)
    (g64,) = torch.autograd.grad((exact * upstream.double()).sum(), p64)
    ulp = torch.finfo(dtype).eps
    scale = g64.abs().max().item()
    for name, g, casts in (("reference", g_ref, 1), ("triton", g_tri, 2)):
        err = (g.double() - g64).abs().max().item()
        assert err <= (casts * ulp + 1e-6) * scale, f"{name}: {err / scale:.2e} of max |grad| (seed {seed})"


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_gradcheck_float64(nz, parameterization):
    seed = fresh_seed()
    x0, sab, s1mab, gen = _inputs(seed, b=2, shape=(1, 3, 4))
    x0 = x0.double()
    w = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    pred = torch.randn(x0.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    for fn in (nz.noise_prediction_loss_reference, nz.noise_prediction_loss_fused_torch):
        assert torch.autograd.gradcheck(lambda p: fn(p, x0, sab.double(), s1mab.double(), seed, w, parameterization), (pred,))
    # the hand-written gradient of the fused path equals autograd of the reference
    upstream = torch.rand(2, generator=gen, dtype=torch.float64)
    (a,) = torch.autograd.grad((nz.noise_prediction_loss_reference(pred, x0, sab, s1mab, seed, w, parameterization) * upstream).sum(), pred)
    (b,) = torch.autograd.grad((nz.noise_prediction_loss_fused_torch(pred, x0, sab, s1mab, seed, w, parameterization) * upstream).sum(), pred)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_loss_uses_the_noise_of_noised_input(nz):
    """A perfect eps prediction (and the v target built from the same eps) gives zero loss."""
    seed = fresh_seed()
    x0, sab, s1mab, _ = _inputs(seed)
    x_t = nz.noised_input_triton(x0, sab, s1mab, seed)
    eps_hat = (x_t - sab[:, None, None, None] * x0) / s1mab[:, None, None, None]
    assert nz.noise_prediction_loss_triton(eps_hat, x0, sab, s1mab, seed).max().item() < 1e-9
    assert nz.noise_prediction_loss_triton(eps_hat, x0, sab, s1mab, seed + 1).min().item() > 1.0
    v = sab[:, None, None, None] * eps_hat - s1mab[:, None, None, None] * x0
    assert nz.noise_prediction_loss_triton(v, x0, sab, s1mab, seed, None, "v").max().item() < 1e-9


def test_bad_inputs_raise(nz):
    x0, sab, s1mab, _ = _inputs(0)
    with pytest.raises(ValueError, match="sqrt_ab"):
        nz.noised_input_reference(x0, sab[:2], s1mab, 0)
    with pytest.raises(ValueError, match="parameterization"):
        nz.noise_prediction_loss_reference(x0, x0, sab, s1mab, 0, None, "x0")
    with pytest.raises(ValueError, match="seed"):
        nz.noised_input_reference(x0, sab, s1mab, -1)
