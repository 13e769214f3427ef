"""Every Triton kernel variant the dispatch can launch compiles for Ampere (sm_80) and Hopper (sm_90)
on this CPU machine, without spills and within each architecture's shared-memory and register limits
(kernels/aot.py; the interpreter tests in test_kernels_*.py check what the kernels compute).

The compiled set is each kernel module's launch_space(). Two checks tie it to the dispatch: the
real dispatch functions, run under the interpreter over their dtypes and options, launch only
variants in that set; and at the largest sizes the launch code accepts it still builds launches in
that set (typed integers: no int64 variant appears at large sizes), or refuses with a one-line error.
"""
import itertools
import time

import pytest
import torch

from kernels import aot
from kernels.backend import INT32_MAX, MAX_GRID_YZ, TRITON_DTYPES, Launch

SPACES = aot.launch_spaces()
KEYS = {name: {aot.variant_key(launch) for launch in launches} for name, launches in SPACES.items()}


@pytest.fixture(scope="module")
def compiled():
    start = time.perf_counter()
    records = aot.compile_all()
    print(f"kernels.aot: {len(records)} compiles in {time.perf_counter() - start:.1f} s")
    return records


def _records(compiled, kernel, arch):
    recs = [r for r in compiled if r["kernel"] == kernel and r["arch"] == arch]
    assert len(recs) == len(SPACES[kernel]) * len(aot.REGIMES), f"{kernel} sm_{arch}: {len(recs)} compiles"
    return recs


@pytest.mark.parametrize("arch", sorted(aot.ARCHS))
@pytest.mark.parametrize("kernel", sorted(SPACES))
def test_every_dispatchable_variant_compiles(compiled, kernel, arch):
    failures = [f"{kernel} [{r['variant']}] {r['regime']} sm_{arch}:\n{r['error']}"
                for r in _records(compiled, kernel, arch) if not r["ok"]]
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("arch", sorted(aot.ARCHS))
@pytest.mark.parametrize("kernel", sorted(SPACES))
def test_no_spills_and_within_arch_limits(compiled, kernel, arch):
    problems = [f"{kernel} [{r['variant']}] {r['regime']} sm_{arch}: {'; '.join(aot.limit_violations(r))}"
                for r in _records(compiled, kernel, arch) if r["ok"] and aot.limit_violations(r)]
    assert not problems, "\n".join(problems)


def _limits_record(**overrides):
    rec = dict(arch=80, registers=40, num_warps=4, spill_stores=0, spill_loads=0, local=0, static_shared=0,
               dynamic_shared=1024)
    return dict(rec, **overrides)


def test_limit_check_flags_spills_shared_memory_and_registers():
    assert aot.limit_violations(_limits_record()) == []
    assert "spills" in aot.limit_violations(_limits_record(spill_stores=4))[0]
    assert "spills" in aot.limit_violations(_limits_record(local=8))[0]
    assert "shared memory" in aot.limit_violations(_limits_record(dynamic_shared=163 * 1024 + 1))[0]
    assert aot.limit_violations(_limits_record(arch=90, dynamic_shared=163 * 1024 + 1)) == []
    assert aot.limit_violations(_limits_record(registers=255, num_warps=8)) == []     # 8192 per warp x 8
    assert "registers" in aot.limit_violations(_limits_record(registers=255, num_warps=16))[0]


# ----------------------------------------------------------------------------- the space is the dispatch's

def _constexpr_flags(launch: Launch) -> tuple:
    return tuple(sorted((k, v) for k, v in launch.constexprs.items() if isinstance(v, bool)))


@pytest.mark.parametrize("kernel", sorted(SPACES))
def test_launch_space_has_every_dtype_with_every_flag_combination(kernel):
    launches = SPACES[kernel]
    flag_names = sorted({k for launch in launches for k, v in launch.constexprs.items() if isinstance(v, bool)})
    for dtype in TRITON_DTYPES:
        with_dtype = [l for l in launches if any(isinstance(a, torch.Tensor) and a.dtype == dtype for a in l.args)]
        assert with_dtype, f"{kernel}: no launch with {dtype}"
        seen = {_constexpr_flags(l) for l in with_dtype}
        # flags tied to the dtype (the direct kernel's IEEE = float32) take one value per dtype
        free = [n for n in flag_names if len({dict(f)[n] for f in seen}) > 1]
        want = {tuple(vals) for vals in itertools.product((False, True), repeat=len(free))}
        got = {tuple(dict(f)[n] for n in free) for f in seen}
        assert got == want, f"{kernel} {dtype}: flag combinations {sorted(got)} of {free}"
    assert len({aot.variant_key(l) for l in launches}) == len(launches), f"{kernel}: duplicate launches"


@pytest.fixture
def recorded_launches(monkeypatch):
    """Run dispatch functions for real (interpreter) and record the variant of every launch they make."""
    from kernel_test_support import interpreted_kernel_module
    interpreted_kernel_module("kernels.noising")
    monkeypatch.setenv("MEMDIFF_KERNELS", "triton")
    seen = []
    real_run = Launch.run

    def run(self):
        seen.append(aot.variant_key(self))
        real_run(self)
    monkeypatch.setattr(Launch, "run", run)
    return seen


def _assert_in_space(seen):
    assert seen, "no launch recorded"
    missing = sorted({k for k in seen if k not in KEYS[k[0]]}, key=repr)
    assert not missing, "launched but not compiled by kernels.aot:\n" + "\n".join(map(repr, missing))


def test_noising_dispatch_launches_only_compiled_variants(recorded_launches):
    from kernels.noising import PARAMETERIZATIONS, noise_prediction_loss, noised_input
    sab, s1mab = torch.full((2,), 0.6, dtype=torch.float64), torch.full((2,), 0.8)
    for dtype in (*TRITON_DTYPES, torch.float64):
        x0 = torch.rand(2, 1, 4, 4).to(dtype)
        noised_input(x0, sab, s1mab, 2**40 + 3)
        noised_input(x0[:, :, 1:], sab.float(), s1mab, 5)                     # non-contiguous view
        for x0_dtype in (torch.float32, torch.bfloat16, torch.float64):
            for parameterization in PARAMETERIZATIONS:
                for weights in (None, torch.rand(2, dtype=torch.float64)):
                    for grad in (False, True):
                        pred = torch.randn(2, 1, 4, 4).to(dtype).requires_grad_(grad)
                        noise_prediction_loss(pred, x0.to(x0_dtype), sab, s1mab, 7, weights, parameterization)
    launched = {k[0] for k in recorded_launches}
    assert launched == {"_noised_input_kernel", "_loss_kernel"}
    _assert_in_space(recorded_launches)


def test_guided_step_dispatch_launches_only_compiled_variants(recorded_launches):
    from kernels.guided_step import guided_step
    coefs = dict(guidance=3.0, sqrt_ab_t=0.3, sqrt_1mab_t=0.95, sqrt_ab_prev=0.4, sqrt_1mab_prev_dir=0.9)
    for dtype in (*TRITON_DTYPES, torch.float64):
        x_t = torch.randn(2, 1, 4, 4).to(dtype)
        for pred_dtype in (*TRITON_DTYPES, torch.float64):
            pred = torch.randn(4, 1, 4, 4).to(pred_dtype)
            for noise_dtype in (None, torch.float32, torch.bfloat16, torch.float64):
                noise = None if noise_dtype is None else torch.randn(2, 1, 4, 4).to(noise_dtype)
                for clip_x0 in (False, True):
                    guided_step(pred, x_t, noise, sigma=0.0 if noise is None else 0.2, clip_x0=clip_x0, **coefs)
    _assert_in_space(recorded_launches)


def test_dp_dispatch_launches_only_compiled_variants(recorded_launches):
    from torch import nn

    from kernels.dp_clip import add_noise_and_scale_, conv2d_weight_sq_norms, linear_weight_sq_norms
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    for dtype in (*TRITON_DTYPES, torch.float64):
        a, b = torch.randn(2, 6, 7, generator=gen).to(dtype), torch.randn(2, 6, 5, generator=gen).to(dtype)
        linear_weight_sq_norms(a, b, "direct")                                       # contiguous Linear
        linear_weight_sq_norms(a.transpose(1, 2).contiguous().transpose(1, 2), b, "direct")
        x = torch.randn(2, 3, 4, 4, generator=gen).to(dtype)
        g = torch.randn(2, 5, 4, 4, generator=gen).to(dtype)
        for grad_out in (g, g.contiguous(memory_format=torch.channels_last)):         # NCHW / channels_last
            conv2d_weight_sq_norms(x, grad_out, conv, "direct")
        add_noise_and_scale_([torch.zeros(300).to(dtype), torch.zeros(3, 5).to(dtype)], 1.0, 1.0, 4.0, 2**40)
    launched = {k[0] for k in recorded_launches}
    assert launched == {"_direct_sq_norm_kernel", "_noise_scale_kernel"}
    _assert_in_space(recorded_launches)


# ----------------------------------------------------------------------------- largest sizes

def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_largest_per_sample_sizes_stay_in_the_compiled_space_or_are_refused():
    from kernels import guided_step, noising
    limit = MAX_GRID_YZ * noising.BLOCK
    assert limit + noising.BLOCK < 2**31                    # in-sample column indices stay int32
    coef = _meta(64)
    coefs = dict(guidance=3.0, sqrt_ab_t=0.3, sqrt_1mab_t=0.95, sqrt_ab_prev=0.4, sqrt_1mab_prev_dir=0.9,
                 sigma=0.0, clip_x0=True)
    for dtype in TRITON_DTYPES:
        x0 = _meta(64, limit, dtype=dtype)                   # 2^32 elements in all: int64 flat offsets
        launches = [noising._noised_input_launch(x0, coef, coef, 2**62)[0],
                    noising._loss_launch(x0, x0, coef, coef, 2**62, coef, "v", True)[0],
                    guided_step._guided_step_launch(_meta(128, limit, dtype=dtype), x0, None, **coefs)[0]]
        for launch in launches:
            assert aot.variant_key(launch) in KEYS[aot.kernel_name(launch)], aot.variant_key(launch)
        big = _meta(2, limit + 1, dtype=dtype)
        with pytest.raises(ValueError, match="elements per sample"):
            noising._noised_input_launch(big, coef[:2], coef[:2], 1)
        with pytest.raises(ValueError, match="elements per sample"):
            noising._loss_launch(big, big, coef[:2], coef[:2], 1, None, "eps", True)
        with pytest.raises(ValueError, match="elements per sample"):
            guided_step._guided_step_launch(_meta(4, limit + 1, dtype=dtype), big, None, **coefs)


def test_dp_kernels_at_largest_sizes_stay_in_the_compiled_space_or_are_refused():
    from kernels import dp_clip
    for dtype in TRITON_DTYPES:
        noise = dp_clip._noise_scale_launch(_meta(2**33, dtype=dtype), 2**40, 2**62, 1.0, 0.5)
        assert aot.variant_key(noise) in KEYS["_noise_scale_kernel"]
        # per-sample spans just inside int32, batch strides far beyond it
        t, p, q = 2**16, 2**15 - 64, 64
        a = torch.empty_strided((4, t, p), (2**40, p, 1), dtype=dtype, device="meta")
        b = torch.empty_strided((4, t, q), (2**40, q, 1), dtype=dtype, device="meta")
        launch = dp_clip._direct_launch(a, b)[0]
        assert aot.variant_key(launch) in KEYS["_direct_sq_norm_kernel"]
        wide = torch.empty_strided((4, t, p + 128), (2**40, p + 128, 1), dtype=dtype, device="meta")
        assert (t - 1) * (p + 128) > INT32_MAX
        with pytest.raises(ValueError, match="int32"):
            dp_clip._direct_launch(wide, b)
