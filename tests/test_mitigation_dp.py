"""DP-SGD: the clipped gradient against a slow per-sample reference (torch.func), one and two ranks;
the noise's variance; Poisson sampling; the accountant against Opacus' own call."""
from __future__ import annotations

import math
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.func import functional_call, grad, vmap

from data_pipeline.poisson import poisson_batches, poisson_indices, shard_indices
from engine.diffusion.schedule import NoiseSchedule
from engine.model.unet import ConditionalUNet, UNetConfig
from engine.training.diffusion_loss import diffusion_loss_fn, make_dp_batch
from engine.training.dp_sgd import DPSGD, DPConfig, check_deepspeed_for_dp
from engine.training.privacy import PrivacyAccountant, epsilon_for, solve_noise_multiplier

warnings.filterwarnings("ignore", message=".*batching rule.*")
SEED, STEP, B = 7, 3, 6
SCHEDULE = NoiseSchedule("linear", 100)


def tiny_model(dropout: float = 0.0) -> ConditionalUNet:
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_heads=2, vocab_size=20, max_tokens=6, context_dim=16,
                     encoder_layers=1, encoder_heads=2, dropout=dropout)
    model = ConditionalUNet(cfg).double()
    with torch.no_grad():  # zero-initialised output layers would make most per-sample gradients vanish
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def make_batch(n: int = B, k: int = 1):
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(n, 1, 16, 16, generator=g) * 2 - 1).double()
    tokens = torch.randint(2, 20, (n, 6), generator=g)
    tokens[:, 4:] = 0
    index = torch.arange(100, 100 + n)
    return make_dp_batch(x0, tokens, index, SCHEDULE, seed=SEED, step=STEP, multiplicity=k)


def reference_clipped_sum(model, batch, clip: float) -> dict[str, torch.Tensor]:
    """Slow path: per-sample gradients by torch.func (vmap of grad), clipped one by one, summed."""
    loss_fn = diffusion_loss_fn(SCHEDULE)
    params = {n: p.detach() for n, p in model.named_parameters()}

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, b):
            return loss_fn(self.m, b)
    wrap = Wrap()

    def one(p, sample):
        return functional_call(wrap, {"m." + k: v for k, v in p.items()},
                               ({k: v[None] for k, v in sample.items()},))[0]
    grads = vmap(grad(one), in_dims=(None, 0))(params, batch)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    c = torch.clamp(clip / (norms + 1e-6), max=1.0)
    return {n: torch.einsum("b,b...->...", c, g) for n, g in grads.items()}, norms


def resolved(clip: float, sigma: float = 0.0, expected: int = B, k: int = 1, method: str = "auto",
             reproducible: bool = False):
    cfg = DPConfig(enabled=True, clip_norm=clip, noise_multiplier=sigma, expected_batch_size=expected,
                   noise_multiplicity=k, norm_method=method, reproducible_noise_voids_guarantee=reproducible)
    return cfg.resolve(num_examples=10 * expected, planned_steps=10)


@pytest.mark.parametrize("method,k", [("ghost", 1), ("auto", 1), ("vmap", 2), ("ghost", 3), ("auto", 2)])
def test_dp_gradient_matches_per_sample_reference(method, k):
    model = tiny_model()
    batch = make_batch(k=k)
    ref_sum, ref_norms = reference_clipped_sum(model, batch, clip=1.0)
    clip = float(ref_norms.median())  # some samples clipped, some not
    ref_sum, _ = reference_clipped_sum(model, batch, clip=clip)
    assert (ref_norms > clip).any() and (ref_norms < clip).any()
    dp = DPSGD(model, resolved(clip, k=k, method=method), seed=SEED)
    stats = dp.backward(diffusion_loss_fn(SCHEDULE), batch, STEP)
    if method == "auto":   # the faster exact path on this model and batch, timed at the first step
        seconds = dp.norm_seconds
        assert set(seconds) == {"hooks", "torch_func"}
        assert (dp.hooks is None) == (seconds["torch_func"] < seconds["hooks"])
        assert stats["dp/norm_seconds_hooks"] == seconds["hooks"]
    else:
        assert (dp.hooks is None) == (method == "vmap")   # ghost stays on the hooks, K > 1 included
    assert stats["dp/norms_by_hooks"] == float(dp.hooks is not None)
    assert stats["dp/batch_size"] == B
    assert stats["dp/grad_norm_mean"] == pytest.approx(float(ref_norms.mean()), rel=1e-5)
    for n, p in model.named_parameters():
        # per_sample_loss computes the MSE in float32, so batched and per-sample paths agree to ~1e-7
        expected = ref_sum[n] / B
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=n)


def test_auto_norm_choice_changes_nothing_but_the_path():
    """norm_method auto times both exact paths on the first batch, then runs the faster one. With
    dropout on, the step's gradient and the global RNG state afterwards are those of the chosen path
    run alone: the trial calls consumed no random numbers and left no gradient behind."""
    loss_fn, batch = diffusion_loss_fn(SCHEDULE), make_batch()
    runs = {}
    for method in ("auto", None):
        model = tiny_model(dropout=0.3)
        if method is None:    # the path auto chose, configured directly
            method = "vmap" if runs["auto"]["dp"].hooks is None else "ghost"
        torch.manual_seed(11)
        dp = DPSGD(model, resolved(clip=0.05, sigma=0.0, method=method), seed=SEED)
        dp.backward(loss_fn, batch, STEP)
        runs["auto" if "auto" not in runs else method] = {
            "dp": dp, "rng": torch.get_rng_state(), "grads": {n: p.grad for n, p in model.named_parameters()}}
    (auto, chosen), = [(runs["auto"], v) for k, v in runs.items() if k != "auto"]
    assert torch.equal(auto["rng"], chosen["rng"])
    for n, g in chosen["grads"].items():
        torch.testing.assert_close(auto["grads"][n], g, rtol=1e-9, atol=1e-12, msg=n)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tiny_model()
    full = make_batch()
    idx = shard_indices(torch.arange(B), rank, world)
    batch = {k: v[idx] for k, v in full.items()}
    # bit-identity across processes needs noise from the public seed (which voids the guarantee)
    dp = DPSGD(model, resolved(clip=0.05, sigma=0.3, reproducible=True), seed=SEED)
    stats = dp.backward(diffusion_loss_fn(SCHEDULE), batch, STEP)
    torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "stats": stats},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_dp_two_ranks_equal_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        outs = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    model = tiny_model()
    dp = DPSGD(model, resolved(clip=0.05, sigma=0.3, reproducible=True), seed=SEED)
    single = dp.backward(diffusion_loss_fn(SCHEDULE), make_batch(), STEP)
    assert outs[0]["stats"]["dp/batch_size"] == B
    assert outs[0]["stats"]["dp/clipped_fraction"] == pytest.approx(single["dp/clipped_fraction"])
    for n, p in model.named_parameters():
        for r in range(2):  # noise added once: both ranks hold exactly the single-process gradient
            torch.testing.assert_close(outs[r]["grads"][n], p.grad, rtol=1e-7, atol=1e-10, msg=n)


def test_noise_variance_without_clipping():
    # Huge C: no clipping; with sigma*C = 2.0 and E|S| = 4 the gradient is mean_grad + N(0, 0.5^2).
    model = tiny_model()
    batch = make_batch(n=4)
    sigma, clip, expected = 2.0 / 1e6, 1e6, 4
    dp = DPSGD(model, resolved(clip, sigma, expected=expected), seed=SEED)
    dp.backward(diffusion_loss_fn(SCHEDULE), batch, STEP)
    noisy = torch.cat([p.grad.flatten() for p in model.parameters()])
    ref, norms = reference_clipped_sum(model, batch, clip=clip)
    assert (norms < clip).all()
    clean = torch.cat([ref[n].flatten() for n, _ in model.named_parameters()]) / expected
    z = (noisy - clean) / 0.5
    n = z.numel()
    assert n > 20000
    # mean 0 and variance 1 within 6 standard errors (var of the sample variance ~ 2/n)
    assert abs(float(z.mean())) < 6 / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) < 6 * math.sqrt(2 / n)
    # a different step draws different noise
    dp.backward(diffusion_loss_fn(SCHEDULE), batch, STEP + 1)
    assert not torch.equal(torch.cat([p.grad.flatten() for p in model.parameters()]), noisy)


def test_noise_is_secret_by_default_and_reproducible_only_when_the_guarantee_is_void():
    """Default: the noise is keyed by an OS secret, so the same seed and step give different noise in
    two processes (nobody can recompute it from config.json); reproducible only on request."""
    def noise(reproducible: bool) -> torch.Tensor:
        model = tiny_model()
        DPSGD(model, resolved(1e6, 1.0, reproducible=reproducible), seed=SEED).backward(
            diffusion_loss_fn(SCHEDULE), make_batch(n=2), STEP)
        return torch.cat([p.grad.flatten() for p in model.parameters()])
    assert not torch.equal(noise(False), noise(False))
    assert torch.equal(noise(True), noise(True))


def test_poisson_sampling_is_deterministic_and_has_rate_q():
    a = poisson_indices(1000, 0.1, seed=3, step=5)
    assert torch.equal(a, poisson_indices(1000, 0.1, seed=3, step=5))
    assert not torch.equal(a, poisson_indices(1000, 0.1, seed=3, step=6))
    sizes = torch.tensor([len(poisson_indices(1000, 0.1, seed=3, step=s)) for s in range(200)], dtype=torch.float64)
    # Binomial(1000, 0.1): mean 100, sd 9.5; the mean of 200 draws is within 4 standard errors
    assert abs(float(sizes.mean()) - 100) < 4 * 9.49 / math.sqrt(200)
    assert sizes.std() > 5  # the batch size varies, as Poisson sampling requires
    shards = [shard_indices(a, r, 3) for r in range(3)]
    assert torch.equal(torch.sort(torch.cat(shards)).values, a)


def test_accountant_matches_opacus_and_grows():
    from opacus.accountants import PRVAccountant, RDPAccountant
    for kind, cls in (("prv", PRVAccountant), ("rdp", RDPAccountant)):
        acc = PrivacyAccountant(noise_multiplier=1.1, sample_rate=0.01, delta=1e-5, accountant=kind)
        eps = []
        for _ in range(3):
            acc.step(100)
            eps.append(acc.epsilon())
        assert eps[0] < eps[1] < eps[2]
        lib = cls()
        for _ in range(300):
            lib.step(noise_multiplier=1.1, sample_rate=0.01)
        assert eps[2] == pytest.approx(lib.get_epsilon(delta=1e-5), rel=1e-6)
    sigma = solve_noise_multiplier(3.0, 0.01, 300, 1e-5, "rdp")
    assert epsilon_for(sigma, 0.01, 300, 1e-5, "rdp") <= 3.0
    assert epsilon_for(sigma * 0.95, 0.01, 300, 1e-5, "rdp") > 3.0 - 0.02


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"^dp\.noise_multiplier"):
        DPConfig(enabled=True, clip_norm=1.0, noise_multiplier=1.0, target_epsilon=3.0, sample_rate=0.1)
    with pytest.raises(ValueError, match=r"^dp\.clip_norm"):
        DPConfig(clip_norm=-1.0)
    with pytest.raises(ValueError, match=r"zero_optimization\.stage"):
        check_deepspeed_for_dp({"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match=r"bf16\.enabled"):
        check_deepspeed_for_dp({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}})
    check_deepspeed_for_dp({"zero_optimization": {"stage": 0}, "gradient_accumulation_steps": 1})
    r = DPConfig(enabled=True, target_epsilon=5.0, expected_batch_size=10, accountant="rdp").resolve(1000, 200)
    assert r.sample_rate == pytest.approx(0.01)
    assert epsilon_for(r.noise_multiplier, 0.01, 200, 1e-5, "rdp") <= 5.0


def test_dp_batch_randomness_follows_the_example_not_its_position():
    g = torch.Generator().manual_seed(4)
    x0, tokens = torch.rand(8, 1, 16, 16, generator=g), torch.randint(2, 20, (8, 6), generator=g)
    index = torch.tensor([3, 9, 11, 20, 21, 40, 41, 77])
    full = make_dp_batch(x0, tokens, index, SCHEDULE, seed=SEED, step=STEP, multiplicity=2, p_uncond=0.5)
    rows = torch.tensor([5, 1, 6])
    part = make_dp_batch(x0[rows], tokens[rows], index[rows], SCHEDULE, seed=SEED, step=STEP, multiplicity=2,
                         p_uncond=0.5)
    for key in ("t", "noise", "tokens"):
        assert torch.equal(part[key], full[key][rows]), key
    dropped = (full["tokens"][:, 0] == 1) & (full["tokens"][:, 1:] == 0).all(1)
    assert 0 < int(dropped.sum()) < 8  # p_uncond = 0.5 on 8 examples: some, not all, get the null prompt
    other = make_dp_batch(x0, tokens, index, SCHEDULE, seed=SEED, step=STEP + 1, multiplicity=2)
    assert not torch.equal(other["noise"], full["noise"])


def test_poisson_batches_shard_the_global_batch_and_resume():
    from data_pipeline.augment import AugmentConfig
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 8, 8), generator=g, dtype=torch.uint8)
    tokens = torch.randint(2, 20, (50, 6), generator=g)
    streams = [poisson_batches(images, tokens, 0.3, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in range(3):
        parts = [next(s) for s in streams]
        idx = torch.cat([p[2] for p in parts])
        assert torch.equal(torch.sort(idx).values, poisson_indices(50, 0.3, seed=1, step=step))
        for x, tok, i in parts:
            torch.testing.assert_close(x[:, 0], images[i].float() / 127.5 - 1)
            assert torch.equal(tok, tokens[i])
    aug = AugmentConfig(rotation_p=1.0, noise_p=1.0)
    a = next(poisson_batches(images, tokens, 0.3, seed=1, start_step=2, augment=aug))
    b = list(zip(range(3), poisson_batches(images, tokens, 0.3, seed=1, augment=aug)))[2][1]
    assert torch.equal(a[2], b[2]) and torch.equal(a[0], b[0])  # resuming at step 2 = the same batch
    assert not torch.allclose(a[0][:, 0], images[a[2]].float() / 127.5 - 1)  # and it was augmented


def test_training_config_sections_validate_with_one_line_errors(tmp_path):
    from engine.training.config import ConfigError, config_from_dict
    base = {"data": {"root": str(tmp_path), "image_size": 32}, "model": {"image_size": 32}}
    dp = {"enabled": True, "noise_multiplier": 1.0, "expected_batch_size": 8}
    cfg = config_from_dict({**base, "dp": dp}, "x.json")
    assert isinstance(cfg.dp, DPConfig) and cfg.dp.expected_batch_size == 8
    cases = [({"dp": {**dp, "clip_norm": 0}}, "x.json: dp.clip_norm: "),
             ({"dp": {**dp, "sample_rate": 0.1}}, "x.json: dp.sample_rate: "),
             ({"dp": dp, "deepspeed": {"zero_optimization": {"stage": 2}}}, "x.json: deepspeed.zero_optimization.stage: "),
             ({"dp": dp, "screening": {"enabled": True, "tau": 1.0}}, "x.json: screening.enabled: "),
             ({"screening": {"enabled": True, "tau": 1.0, "units": "db"}}, "x.json: screening.units: "),
             ({"dp": {**dp, "bogus": 1}}, "x.json: dp.bogus: unknown key"),
             ({"screening": {"typo": 1}}, "x.json: screening.typo: unknown key"),
             ({"augment": {"rotation_degrees": 5}}, "x.json: augment.rotation_degrees: unknown key")]
    for extra, prefix in cases:
        with pytest.raises(ConfigError) as info:
            config_from_dict({**base, **extra}, "x.json")
        assert str(info.value).startswith(prefix) and "\n" not in str(info.value), str(info.value)
