"""memdiff's DDIM against an independent implementation: diffusers' DDIMScheduler driven by the same
model, step by step (test-only dependency; skipped with a message when diffusers is not importable),
and the noise rule of engine.audit.noise_generations against known answers."""
import numpy as np
import pytest
import torch

from data_pipeline.vocab import Vocabulary
from engine.audit.noise_generations import coherence, noise_share, noise_threshold
from engine.diffusion.guidance import null_tokens_like, predict_cond_uncond
from engine.diffusion.sampling import sample, step_coefficients, timestep_sequence
from engine.diffusion.schedule import NoiseSchedule
from engine.model.unet import ConditionalUNet, UNetConfig
from kernels.guided_step import guided_step

VOCAB = Vocabulary.default()


def tiny_model() -> ConditionalUNet:
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                     num_heads=2, vocab_size=len(VOCAB), max_tokens=VOCAB.max_len, context_dim=16, encoder_layers=1,
                     encoder_heads=2)
    model = ConditionalUNet(cfg)
    with torch.no_grad():   # zero-initialised output layers would make every prediction 0: randomise
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def diffusers_ddim(model, tokens, noise, timesteps, guidance, clipped_eps):
    """DDIM through diffusers' scheduler, the guidance done as memdiff does it (one formula, outside).
    clipped_eps=False is diffusers' DDIM pipeline default (x0 clipped, the network's eps kept)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed: the DDIM cross-check needs it")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                    clip_sample=True, set_alpha_to_one=True, timestep_spacing="linspace")
    # diffusers takes the previous timestep as t - T // num_inference_steps. memdiff's sequence
    # (linspace 999 -> 0 in 10 steps) is evenly spaced by 111 = 1000 // 9, so with 9 "inference steps"
    # diffusers visits exactly memdiff's timesteps and ends at t = 0 -> alpha = 1 (set_alpha_to_one).
    sched.set_timesteps(9)
    sched.timesteps = timesteps.clone()
    context, mask = model.encode(tokens)
    null_context, null_mask = model.encode(null_tokens_like(tokens))
    x, trajectory = noise.clone(), []
    for t in timesteps.tolist():
        tt = torch.full((x.shape[0],), t, dtype=torch.long)
        with torch.no_grad():
            e_c = model.denoise(x, tt, context, mask)
            e_u = model.denoise(x, tt, null_context, null_mask)
        eps = e_u + guidance * (e_c - e_u)
        x = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=clipped_eps).prev_sample
        trajectory.append(x.clone())
    return trajectory


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_memdiff_ddim_matches_diffusers_step_by_step(guidance):
    model, schedule = tiny_model(), NoiseSchedule("linear", 1000)
    timesteps = timestep_sequence(schedule, 10)
    assert timesteps.tolist() == list(range(999, -1, -111))
    tokens = VOCAB.encode_batch(["frontal AP chest x-ray, female, 60s: edema"] * 2)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = sample(model, tokens, noise, schedule, steps=10, guidance=guidance, sampler="ddim", record_norms=False)
    reference = diffusers_ddim(model, tokens, noise, timesteps, guidance, clipped_eps=False)
    # memdiff's trajectory step by step: sample()'s loop body (its coefficients and its guided step)
    x, steps = noise.clone(), []
    cond, null = model.encode(tokens), model.encode(null_tokens_like(tokens))
    for i, t in enumerate(timesteps.tolist()):
        t_prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
        with torch.no_grad():
            pred = predict_cond_uncond(model, x, t, cond, null, schedule)
        x, _, _ = guided_step(pred, x, None, guidance=guidance, clip_x0=True, **step_coefficients(schedule, t, t_prev, 0.0))
        steps.append(x.clone())
        assert torch.allclose(x, reference[i], atol=2e-5), f"step {i} (t = {t}): {float((x - reference[i]).abs().max())}"
    assert torch.allclose(out.images, steps[-1].clamp(-1, 1), atol=1e-6)   # sample() is that loop
    # eps re-derived from the clipped x0 (guided-diffusion; memdiff before) is a different sampler
    rederived = diffusers_ddim(model, tokens, noise, timesteps, guidance, clipped_eps=True)
    assert not torch.allclose(rederived[-1], reference[-1], atol=1e-3)


def test_noise_rule_known_answers():
    rng = np.random.default_rng(0)
    white = rng.integers(0, 256, (50, 32, 32)).astype(np.uint8)
    assert np.abs(coherence(white)).max() < 0.15
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = np.stack([(127 + 100 * np.sin(xx / (3 + k) + yy / 5)).astype(np.uint8) for k in range(5)])
    assert coherence(smooth).min() > 0.9
    assert coherence(np.full((1, 8, 8), 40, np.uint8))[0] == 0.0
    # exact values: a ramp's neighbours are perfectly correlated; a checkerboard's perfectly anti-correlated
    assert coherence(np.tile(np.arange(3.0), (3, 1))[None])[0] == pytest.approx(1.0)
    assert coherence(((yy + xx) % 2 * 255).astype(np.uint8)[None])[0] == pytest.approx(-1.0)
    # independent noise at SNR 1 halves an image's coherence (the rule's definition of "noise")
    big = (127 + 60 * np.sin(xx / 6.0 + yy / 9.0))[None].repeat(200, 0)
    big = np.kron(big, np.ones((1, 4, 4)))                               # [200, 128, 128]
    noisy = big + rng.normal(0, big[0].std(), big.shape)
    assert coherence(noisy).mean() == pytest.approx(coherence(big[:1])[0] / 2, abs=0.01)
    threshold = noise_threshold(smooth)
    assert threshold == pytest.approx(coherence(smooth).min() / 2)
    assert noise_threshold(smooth, snr=4.0) == pytest.approx(coherence(smooth).min() * 0.8)
    share = noise_share(np.concatenate([white[:3], smooth]), threshold)
    assert share["noise"] == 3 and share["n"] == 8 and share["ci95"][0] < 3 / 8 < share["ci95"][1]
