"""The engine core against independent references: closed-form diffusion identities, a manual
attention, a bitwise export round trip and the DDPM posterior that DDIM(eta=1) must reproduce."""
import json
import logging
import math

import pytest
import torch

from data_pipeline.vocab import NULL_ID, PAD_ID, Vocabulary
from engine.diffusion.sampling import sample, step_coefficients, timestep_sequence
from engine.diffusion.schedule import (
    DiffusionConfig,
    NoiseSchedule,
    eps_from_prediction,
    loss_weights,
    q_sample,
    target_for,
)
from engine.diffusion.seeds import seeded_noise
from engine.model import attention as attention_module
from engine.model.attention import attention
from engine.model.export import export_model, load_model
from engine.model.unet import ConditionalUNet, UNetConfig

VOCAB = Vocabulary.default()


def tiny_model(seed: int = 0, **overrides) -> ConditionalUNet:
    torch.manual_seed(seed)
    cfg = dict(image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
               num_heads=2, vocab_size=len(VOCAB), max_tokens=VOCAB.max_len, context_dim=16, encoder_layers=1,
               encoder_heads=2)
    cfg.update(overrides)
    model = ConditionalUNet(UNetConfig(**cfg))
    # Zero-initialised output layers would make every prediction 0: give every weight a value.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def prompts(n: int) -> torch.Tensor:
    texts = ["frontal AP chest x-ray, female, 60s: pleural effusion", "frontal PA chest x-ray, male, 30s",
             "frontal AP chest x-ray, male, 70s: cardiomegaly, support devices"]
    return VOCAB.encode_batch([texts[i % len(texts)] for i in range(n)])


def test_linear_schedule_matches_product_of_alphas():
    s = NoiseSchedule("linear", 1000)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    abar = 1.0
    for i, b in enumerate(betas):
        abar *= 1 - b
        if i in (0, 10, 500, 999):
            assert s.alphas_cumprod[i].item() == pytest.approx(abar, rel=1e-10)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_short_schedules_stay_valid_for_sampling(kind):
    s = NoiseSchedule(kind, 10)
    assert bool((s.betas > 0).all() and (s.betas < 1).all())
    for i, t in enumerate(timestep_sequence(s, 10).tolist()):
        coefs = step_coefficients(s, t, t - 1, eta=1.0)
        assert all(math.isfinite(v) for v in coefs.values())


def test_cosine_schedule_matches_formula_before_clipping():
    T, s_off = 1000, 0.008
    s = NoiseSchedule("cosine", T)
    f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-8)


def test_q_sample_and_targets_round_trip():
    s = NoiseSchedule("cosine", 1000)
    x0, eps = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randn(5, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 400, 800, 999])
    x_t = q_sample(x0, t, eps, s)
    abar = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, atol=1e-6)
    for param in ("eps", "v"):
        target = target_for(x0, eps, t, s, param)
        # The schedule is stored in float64 but handed out as float32 per sample: 1e-5 tolerance.
        assert torch.allclose(eps_from_prediction(target, x_t, t, s, param), eps, atol=1e-4)


def test_min_snr_weights():
    s = NoiseSchedule("linear", 1000)
    t = torch.tensor([0, 500, 999])
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    w_eps = loss_weights(t, s, "eps", 5.0)
    w_v = loss_weights(t, s, "v", 5.0)
    assert torch.allclose(w_eps.double(), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr, rtol=1e-5)
    assert torch.allclose(w_v.double(), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1), rtol=1e-5)
    assert loss_weights(t, s, "eps", None) is None


def test_ddim_eta1_on_the_full_chain_is_the_ddpm_posterior():
    """DDIM with eta = 1 and unit stride must reproduce Ho et al.'s posterior q(x_{t-1} | x_t, x0)."""
    s = NoiseSchedule("linear", 1000)
    betas, abar = s.betas, s.alphas_cumprod
    for t in (1, 50, 999):
        c = step_coefficients(s, t, t - 1, eta=1.0)
        posterior_var = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]
        assert c["sigma"] ** 2 == pytest.approx(posterior_var.item(), rel=1e-9)
        # mean = coef_x0 * x0 + coef_xt * x_t; DDIM writes it as sqrt_ab_prev*x0 + dir*eps with
        # eps = (x_t - sqrt_ab_t x0)/sqrt_1mab_t, so the two must agree coefficient by coefficient.
        coef_x0 = abar[t - 1].sqrt() * betas[t] / (1 - abar[t])
        coef_xt = (1 - betas[t]).sqrt() * (1 - abar[t - 1]) / (1 - abar[t])
        ddim_xt = c["sqrt_1mab_prev_dir"] / c["sqrt_1mab_t"]
        ddim_x0 = c["sqrt_ab_prev"] - c["sqrt_1mab_prev_dir"] * c["sqrt_ab_t"] / c["sqrt_1mab_t"]
        assert ddim_xt == pytest.approx(coef_xt.item(), rel=1e-7)
        assert ddim_x0 == pytest.approx(coef_x0.item(), rel=1e-7)


def test_timestep_sequence_endpoints_and_bad_steps():
    s = NoiseSchedule("linear", 1000)
    ts = timestep_sequence(s, 50)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and bool((ts[:-1] > ts[1:]).all())
    with pytest.raises(ValueError, match="steps"):
        timestep_sequence(s, 0)


def manual_attention(q, k, v, mask):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


def test_sdpa_attention_equals_manual_softmax_attention():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.tensor([[True] * 7, [True, True, False, False, False, False, False]])
    assert torch.allclose(attention(q, k, v, mask), manual_attention(q, k, v, mask), atol=1e-5)
    assert torch.allclose(attention(q, k, v), manual_attention(q, k, v, None), atol=1e-5)


def test_xformers_backend_falls_back_to_sdpa_with_one_log_line(caplog, monkeypatch):
    monkeypatch.setattr(attention_module, "_xformers_checked", False)
    monkeypatch.setattr(attention_module, "_xformers_ops", None)
    import builtins
    real_import = builtins.__import__

    def no_xformers(name, *a, **kw):
        if name.startswith("xformers"):
            raise ImportError("xformers is not installed")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_xformers)
    q = torch.randn(1, 2, 4, 8)
    with caplog.at_level(logging.WARNING):
        out1 = attention(q, q, q, backend="xformers")
        out2 = attention(q, q, q, backend="xformers")
    assert torch.allclose(out1, manual_attention(q, q, q, None), atol=1e-5) and torch.equal(out1, out2)
    assert sum("falling back to SDPA" in r.message for r in caplog.records) == 1


def test_null_prompt_has_its_own_embedding_and_context_is_differentiable():
    model = tiny_model()
    tokens = prompts(2)
    null = torch.full_like(tokens, PAD_ID)
    null[:, 0] = NULL_ID
    ctx, mask = model.encode(tokens)
    ctx_null, mask_null = model.encode(null)
    assert mask_null.sum(1).tolist() == [1, 1] and not torch.allclose(ctx[:, 0], ctx_null[:, 0])
    ctx = ctx.detach().requires_grad_(True)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    model.denoise(x, t, ctx, mask).pow(2).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    # Padding positions are masked out of cross-attention and pooling: no gradient reaches them.
    assert ctx.grad[~mask].abs().max() == 0


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, tok = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), prompts(2)
    grads = []
    for ckpt in (False, True):
        model = tiny_model(seed=1, grad_checkpointing=ckpt).train()
        model(x, t, tok).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_export_and_load_round_trip_is_bitwise(tmp_path):
    model = tiny_model(seed=2)
    export_model(tmp_path / "export", model, DiffusionConfig(schedule="cosine", parameterization="v"), VOCAB,
                 metadata={"run": "test"})
    loaded = load_model(tmp_path)  # a run dir holding export/
    assert loaded.diffusion_config.parameterization == "v" and loaded.schedule.kind == "cosine"
    assert loaded.vocab == VOCAB and loaded.metadata == {"run": "test"}
    x, t, tok = torch.randn(2, 1, 16, 16), torch.tensor([5, 900]), prompts(2)
    with torch.no_grad():
        assert torch.equal(model(x, t, tok), loaded.model(x, t, tok))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)
    export_model(tmp_path, tiny_model(), DiffusionConfig(), VOCAB)
    (tmp_path / "model_config.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="model_config.json: format 99"):
        load_model(tmp_path)


def test_sampler_single_branch_equals_two_branches_at_w1_and_is_seeded():
    model = tiny_model(seed=3)
    s = NoiseSchedule("linear", 1000)
    tok = prompts(3)
    noise = seeded_noise([7, 8, 9], (1, 16, 16))
    a = sample(model, tok, noise, s, steps=8, guidance=1.0, record_norms=False)
    b = sample(model, tok, noise, s, steps=8, guidance=1.0, record_norms=True)
    assert a.norms_raw.numel() == 0 and b.norms_raw.shape == (8, 3)
    assert torch.allclose(a.images, b.images, atol=1e-4)  # batch size 2B vs B changes float summation order
    assert torch.allclose(b.norms_rms, b.norms_raw / 16, atol=1e-6)
    c = sample(model, tok, seeded_noise([7, 8, 9], (1, 16, 16)), s, steps=8, guidance=1.0, record_norms=False)
    assert torch.equal(a.images, c.images)


def test_ddpm_sampler_uses_its_generator():
    model = tiny_model(seed=4)
    s = NoiseSchedule("linear", 1000)
    tok, noise = prompts(2), seeded_noise([1, 2], (1, 16, 16))
    run = lambda seed: sample(model, tok, noise, s, steps=5, guidance=2.0, sampler="ddpm",  # noqa: E731
                              generator=torch.Generator().manual_seed(seed)).images
    assert torch.equal(run(0), run(0)) and not torch.allclose(run(0), run(1))
