"""Fused guided DDIM/DDPM step (kernels/guided_step.py) against an independent float64 step.

The Triton kernel runs under TRITON_INTERPRET=1 on CPU (set by tests/conftest.py before triton is
first imported: triton decides interpreted-or-compiled when its functions are decorated).
"""
import math

import pytest
import torch
from kernel_test_support import fresh_seed, interpreted_kernel_module, poison_allocations


@pytest.fixture(scope="module")
def gs():
    return interpreted_kernel_module("kernels.guided_step")


@pytest.fixture
def poisoned(gs, monkeypatch):
    poison_allocations(gs, monkeypatch)


def _coefs(gen: torch.Generator, ddpm: bool) -> dict:
    ab_t, ab_prev = sorted(torch.rand(2, generator=gen, dtype=torch.float64).mul(0.9).add(0.05).tolist())
    sigma = math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) if ddpm else 0.0
    return dict(sqrt_ab_t=math.sqrt(ab_t), sqrt_1mab_t=math.sqrt(1 - ab_t), sqrt_ab_prev=math.sqrt(ab_prev),
                sqrt_1mab_prev_dir=math.sqrt(1 - ab_prev - sigma ** 2), sigma=sigma)


def _independent_step(pred, x_t, noise, guidance, c, clip_x0):
    """The DDIM step written out in float64 from the definitions, and torch.linalg.vector_norm."""
    p, x = pred.double(), x_t.double()
    b = x.shape[0]
    eps_c, eps_u = p[:b], p[b:]
    eps = eps_u + guidance * (eps_c - eps_u)
    x0 = (x - c["sqrt_1mab_t"] * eps) / c["sqrt_ab_t"]
    if clip_x0:
        x0 = torch.clamp(x0, -1, 1)          # eps stays the network's (not re-derived from x0)
    x_prev = c["sqrt_ab_prev"] * x0 + c["sqrt_1mab_prev_dir"] * eps
    if c["sigma"] > 0:
        x_prev = x_prev + c["sigma"] * noise.double()
    raw = torch.linalg.vector_norm((eps_c - eps_u).reshape(b, -1), dim=1)
    return x_prev, raw, raw / math.sqrt(x[0].numel())


@pytest.mark.parametrize("ddpm", [False, True])
@pytest.mark.parametrize("clip_x0", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_triton_and_reference_match_float64_step(gs, poisoned, ddpm, clip_x0, dtype, tol):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    b, shape = 3, (1, 19, 23)             # C*H*W not a multiple of the block: exercises the mask
    pred = (torch.randn(2 * b, *shape, generator=gen) * 1.5).to(dtype)
    x_t = torch.randn(b, *shape, generator=gen).to(dtype)
    noise = torch.randn(b, *shape, generator=gen).to(dtype)
    c = _coefs(gen, ddpm)
    want = _independent_step(pred, x_t, noise, 7.5, c, clip_x0)
    for name, fn in (("reference", gs.guided_step_reference), ("triton", gs.guided_step_triton)):
        extra = {"block": 128} if name == "triton" else {}
        got = fn(pred, x_t, noise if ddpm else None, guidance=7.5, clip_x0=clip_x0, **c, **extra)
        assert got[0].dtype == dtype and got[0].shape == x_t.shape
        for g, w, what in zip(got, want, ("x_prev", "norm_raw", "norm_rms")):
            assert not torch.isnan(g).any(), f"{name} {what}: NaN (seed {seed})"
            # bf16: the output itself is rounded to bf16 (rel 2^-8)
            err = ((g.double() - w).abs() / (w.abs() + 1.0)).max().item()
            assert err <= tol, f"{name} {what}: rel err {err:.2e} > {tol} (seed {seed})"


def test_fp32_triton_equals_reference_tightly(gs, poisoned):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    pred, x_t, noise = torch.randn(8, 1, 16, 16, generator=gen), torch.randn(4, 1, 16, 16, generator=gen), torch.randn(4, 1, 16, 16, generator=gen)
    c = _coefs(gen, True)
    ref = gs.guided_step_reference(pred, x_t, noise, guidance=3.0, **c)
    tri = gs.guided_step_triton(pred, x_t, noise, guidance=3.0, **c)
    torch.testing.assert_close(tri[0], ref[0], rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(tri[1], ref[1], rtol=1e-6, atol=0, msg=f"seed {seed}")
    torch.testing.assert_close(tri[1], torch.linalg.vector_norm((pred[:4] - pred[4:]).flatten(1), dim=1), rtol=1e-6, atol=0)


def test_dispatch_follows_memdiff_kernels(gs, monkeypatch):
    pred, x_t = torch.randn(4, 1, 8, 8), torch.randn(2, 1, 8, 8)
    c = _coefs(torch.Generator().manual_seed(0), False)
    calls = []
    monkeypatch.setattr(gs, "guided_step_triton", lambda *a, **k: calls.append("triton") or gs.guided_step_reference(*a, **k))
    monkeypatch.setenv("MEMDIFF_KERNELS", "auto")
    gs.guided_step(pred, x_t, guidance=2.0, **c)
    assert calls == []                       # CPU tensors -> reference
    monkeypatch.setenv("MEMDIFF_KERNELS", "triton")
    gs.guided_step(pred, x_t, guidance=2.0, **c)
    assert calls == ["triton"]


def test_bad_shapes_raise_one_line_errors(gs):
    c = _coefs(torch.Generator().manual_seed(0), True)
    with pytest.raises(ValueError, match=r"\[2B"):
        gs.guided_step_reference(torch.randn(3, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), guidance=1.0, **c)
    with pytest.raises(ValueError, match="needs a noise tensor"):
        gs.guided_step_reference(torch.randn(4, 1, 4, 4), torch.randn(2, 1, 4, 4), None, guidance=1.0, **c)
