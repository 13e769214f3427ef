"""Kernels vs eager PyTorch vs torch.compile of the reference.

On CUDA: training-sized shapes (batch 256, 1x64x64 and 1x128x128; U-Net layer shapes for the DP
norms), Triton kernels included. On CPU only the references/eager versions run (Triton needs a GPU;
the interpreter is a correctness tool) and the batch is BENCH_KERNELS_BATCH (default 16) so the
file finishes in reasonable time; torch.compile of the Philox reference is skipped on CPU (its
inductor build takes minutes on 2 cores). Every case records device, shape, modelled bytes moved
and effective GB/s in benchmark.extra_info.

Bytes moved per case: bench/bytes_model.py (the model bench/RESULTS.md quotes).
"""
import math
import os

import pytest
import torch
from bytes_model import direct_norm_bytes, guided_step_bytes, noise_step_bytes, noising_loss_step_bytes

from kernels import dp_clip, guided_step, noising

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BATCH = 256 if CUDA else int(os.environ.get("BENCH_KERNELS_BATCH", "16"))
SIZES = (64, 128)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, fn, bytes_moved, impl, shape, rounds):
    def call():
        out = fn()
        _sync()
        return out
    call()                                               # warm-up / compile
    benchmark.pedantic(call, rounds=rounds, iterations=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", impl=impl,
                                shape=list(shape), bytes_moved_model=int(bytes_moved),
                                effective_GBps=round(bytes_moved / mean / 1e9, 3))


# ----------------------------------------------------------------------------- noising + loss

def _noising_inputs(size):
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(BATCH, 1, size, size, generator=g) * 2 - 1).to(DEVICE)
    ab = torch.rand(BATCH, generator=g) * 0.98 + 0.01
    pred = torch.randn(BATCH, 1, size, size, generator=g).to(DEVICE).requires_grad_(True)
    return x0, ab.sqrt().to(DEVICE), (1 - ab).sqrt().to(DEVICE), pred


def _eager_train_noise_loss(x0, sab, s1mab, pred):
    # what training does without the kernel: materialised noise, q_sample, MSE, backward
    eps = torch.randn_like(x0)
    x_t = sab[:, None, None, None] * x0 + s1mab[:, None, None, None] * eps
    loss = (pred - eps).pow(2).flatten(1).mean(1)
    loss.mean().backward()
    pred.grad = None
    return x_t


def _kernel_train_noise_loss(x0, sab, s1mab, pred, noised, loss_fn):
    x_t = noised(x0, sab, s1mab, 1234)
    loss_fn(pred, x0, sab, s1mab, 1234).mean().backward()
    pred.grad = None
    return x_t


IMPLS_NOISE = ["eager", "reference"] + (["compiled_reference", "triton"] if CUDA else [])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS_NOISE)
def test_noising_and_loss(benchmark, impl, size):
    x0, sab, s1mab, pred = _noising_inputs(size)
    n = x0.numel()
    if impl == "eager":
        fn, nbytes = (lambda: _eager_train_noise_loss(x0, sab, s1mab, pred)), noising_loss_step_bytes(n, "eager")
    elif impl == "reference":
        fn, nbytes = (lambda: _kernel_train_noise_loss(x0, sab, s1mab, pred, noising.noised_input_reference,
                                                       noising.noise_prediction_loss_reference)), noising_loss_step_bytes(n, "fused")
    elif impl == "compiled_reference":
        noised_c = torch.compile(noising.noised_input_reference)
        loss_c = torch.compile(noising.noise_prediction_loss_reference)
        fn, nbytes = (lambda: _kernel_train_noise_loss(x0, sab, s1mab, pred, noised_c, loss_c)), noising_loss_step_bytes(n, "fused")
    else:
        fn, nbytes = (lambda: _kernel_train_noise_loss(x0, sab, s1mab, pred, noising.noised_input_triton,
                                                       noising.noise_prediction_loss_triton)), noising_loss_step_bytes(n, "fused")
    _run(benchmark, fn, nbytes, impl, tuple(x0.shape), rounds=5 if CUDA else 2)


# ----------------------------------------------------------------------------- guided step

IMPLS_STEP = ["reference", "compiled_reference"] + (["triton"] if CUDA else [])
COEFS = dict(guidance=7.5, sqrt_ab_t=0.3, sqrt_1mab_t=math.sqrt(1 - 0.09), sqrt_ab_prev=0.35,
             sqrt_1mab_prev_dir=math.sqrt(1 - 0.35 ** 2), sigma=0.0)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS_STEP)
def test_guided_step(benchmark, impl, size):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2 * BATCH, 1, size, size, generator=g).to(DEVICE)
    x_t = torch.randn(BATCH, 1, size, size, generator=g).to(DEVICE)
    fn = {"reference": guided_step.guided_step_reference,
          "compiled_reference": torch.compile(guided_step.guided_step_reference),
          "triton": getattr(guided_step, "guided_step_triton")}[impl]
    nbytes = guided_step_bytes(x_t.numel(), "fused" if impl == "triton" else "eager")
    _run(benchmark, lambda: fn(pred, x_t, None, **COEFS), nbytes, impl, tuple(x_t.shape),
         rounds=10 if CUDA else 3)


# ----------------------------------------------------------------------------- DP norms

# (name, T, P, Q): U-Net layers at 64x64 / base 64 — conv 3x3 64->64 at 64x64 (im2col P = 576),
# conv 3x3 128->128 at 16x16, attention qkv Linear 128->384 over 16x16 tokens, cross-attn kv over 32 tokens
DP_LAYERS = [("conv64_64x64", 64 * 64, 576, 64), ("conv128_16x16", 256, 1152, 128),
             ("qkv128_16x16", 256, 128, 384), ("cross_kv_32tok", 32, 128, 256)]
DP_BATCH = 32 if CUDA else 2


@pytest.mark.parametrize("layer", DP_LAYERS, ids=[l[0] for l in DP_LAYERS])
@pytest.mark.parametrize("impl", ["materialised", "ghost", "direct_reference", "compiled_direct_reference"]
                         + (["direct_triton"] if CUDA else []))
def test_dp_norms(benchmark, impl, layer):
    name, t, p, q = layer
    if impl == "ghost" and t > 1024 and not CUDA:
        pytest.skip("ghost norm at T=4096 needs B*T^2 memory/time: the cost model picks direct there")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(DP_BATCH, t, p, generator=g).to(DEVICE)
    b = torch.randn(DP_BATCH, t, q, generator=g).to(DEVICE)
    fn = {"materialised": lambda: torch.einsum("btp,btq->bpq", a, b).square().sum((1, 2)),
          "ghost": lambda: dp_clip.ghost_sq_norms_reference(a, b),
          "direct_reference": lambda: dp_clip.direct_sq_norms_reference(a, b),
          "compiled_direct_reference": torch.compile(lambda: dp_clip.direct_sq_norms_reference(a, b)),
          "direct_triton": lambda: dp_clip.direct_sq_norms_triton(a, b)}[impl]
    nbytes = direct_norm_bytes(DP_BATCH, t, p, q, "ideal")        # the ideal for every method
    benchmark.extra_info["chosen_by_cost_model"] = dp_clip.choose_method(t, p, q)
    _run(benchmark, fn, nbytes, impl, (DP_BATCH, t, p, q), rounds=5 if CUDA else 2)


@pytest.mark.parametrize("impl", ["reference"] + (["triton"] if CUDA else []))
def test_dp_noise_step(benchmark, impl):
    # flat gradient list of a ~30M-parameter model on CUDA, 1M on CPU
    sizes = [1 << 20] * (30 if CUDA else 1)
    grads = [torch.zeros(s, device=DEVICE) for s in sizes]
    fn = (dp_clip.add_noise_and_scale_reference_ if impl == "reference" else dp_clip.add_noise_and_scale_)
    n = sum(sizes)
    _run(benchmark, lambda: fn(grads, 1.0, 1.0, 256.0, 7), noise_step_bytes(n, "fused"), impl, (n,), rounds=3)
