"""Classifier-free guidance in the sampler against independent computations: two separate
(unbatched) forwards and the guidance formula written out; and batching invariance of the grids."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.vocab import Vocabulary
from engine.diffusion.generate import generate
from engine.diffusion.guidance import noise_magnitude, null_tokens_like, predict_cond_uncond
from engine.diffusion.sampling import sample
from engine.diffusion.schedule import NoiseSchedule
from engine.diffusion.seeds import seeded_noise
from engine.model.unet import ConditionalUNet, UNetConfig

VOCAB = Vocabulary.default()
PROMPTS = ["frontal AP chest x-ray, female, 60s: pleural effusion", "frontal PA chest x-ray, male, 30s",
           "frontal AP chest x-ray, male, 70s: cardiomegaly, support devices"]


def model(scale: float = 0.03) -> ConditionalUNet:
    torch.manual_seed(0)
    net = ConditionalUNet(UNetConfig(image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                     attention_resolutions=(8,), num_heads=2, vocab_size=len(VOCAB),
                                     max_tokens=VOCAB.max_len, context_dim=16, encoder_layers=1, encoder_heads=2))
    with torch.no_grad():  # zero-initialised output layers would make every prediction 0
        for name, p in net.named_parameters():
            # small weights keep predictions moderate; strong prompt pathways make the prompt matter
            strong = "token_embedding" in name or "pooled_proj" in name or "cross_kv" in name
            p.normal_(0, 1.0 if strong else scale)
    return net.eval()


def short_schedule(T: int = 10) -> NoiseSchedule:
    """A T-step schedule whose last abar is ~0.77, so one DDIM step lands on a moderate x0 estimate."""
    schedule = NoiseSchedule("linear", 1000)
    schedule.betas = torch.linspace(1e-3, 0.05, T, dtype=torch.float64)
    schedule.alphas_cumprod = torch.cumprod(1 - schedule.betas, dim=0)
    schedule.num_timesteps = T
    return schedule


def separate_eps(net, x, t, tokens):
    """eps_cond and eps_uncond from two forward passes of batch B each (no [cond; uncond] stacking)."""
    null = VOCAB.null_tokens(tokens.shape[0])
    tt = torch.full((x.shape[0],), t, dtype=torch.long)
    with torch.no_grad():
        return net(x, tt, tokens), net(x, tt, null)


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, 7.5])
def test_one_ddim_step_uses_guided_epsilon(w):
    net, schedule = model(), short_schedule()
    tokens = VOCAB.encode_batch(PROMPTS)
    x = 0.2 * seeded_noise([1, 2, 3], (1, 16, 16))
    out = sample(net, tokens, x, schedule, steps=1, guidance=w, clip_x0=False)
    t = schedule.num_timesteps - 1
    eps_c, eps_u = separate_eps(net, x, t, tokens)
    eps_c, eps_u = eps_c.double(), eps_u.double()
    eps = eps_u + w * (eps_c - eps_u)
    abar = schedule.alphas_cumprod[t].item()
    x0 = (x.double() - (1 - abar) ** 0.5 * eps) / abar ** 0.5   # one DDIM step to t = -1 is the x0 estimate
    assert x0.abs().max() < 1, "the final clamp to [-1, 1] must not hide the comparison"
    torch.testing.assert_close(out.images.double(), x0, rtol=1e-4, atol=2e-6)
    # Wen et al.'s magnitude at that step is ||eps_c - eps_u|| over C*H*W, per sample.
    assert (eps_c - eps_u).abs().max() > 1e-4  # guidance changes the result, so w is really tested
    raw = (eps_c - eps_u).flatten(1).norm(dim=1)
    torch.testing.assert_close(out.norms_raw[0].double(), raw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.norms_rms[0].double(), raw / 16, rtol=1e-4, atol=1e-6)
    # the one primitive the scanner, token significance and screening use gives the same numbers
    p_raw, p_rms = noise_magnitude(eps_c, eps_u)
    torch.testing.assert_close(p_raw, raw, rtol=1e-12, atol=0)
    torch.testing.assert_close(p_rms, raw / 16, rtol=1e-12, atol=0)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_cond_uncond_prediction_at_one_step_equals_per_sample_steps(parameterization):
    """Sampling passes one step (int), screening each sample's own step (tensor): same epsilon."""
    net, schedule = model(0.2), NoiseSchedule("linear", 1000)
    tokens = VOCAB.encode_batch(PROMPTS)
    x = seeded_noise([4, 5, 6], (1, 16, 16))
    with torch.no_grad():
        cond, null = net.encode(tokens), net.encode(null_tokens_like(tokens))
        at_int = predict_cond_uncond(net, x, 700, cond, null, schedule, parameterization)
        at_tensor = predict_cond_uncond(net, x, torch.full((3,), 700), cond, null, schedule, parameterization)
        raw_pred = net.denoise(torch.cat([x, x]), torch.full((6,), 700), torch.cat([cond[0], null[0]]),
                               torch.cat([cond[1], null[1]]))
    torch.testing.assert_close(at_int, at_tensor, rtol=1e-6, atol=1e-6)
    if parameterization == "v":   # eps = sqrt(1 - abar) x + sqrt(abar) v, written out
        abar = schedule.alphas_cumprod[700].item()
        raw_pred = (1 - abar) ** 0.5 * torch.cat([x, x]) + abar ** 0.5 * raw_pred
    torch.testing.assert_close(at_int, raw_pred, rtol=1e-6, atol=1e-6)


def test_cond_and_uncond_in_one_batch_equal_separate_forwards():
    net = model(0.2)
    tokens = VOCAB.encode_batch(PROMPTS)
    x = seeded_noise([4, 5, 6], (1, 16, 16))
    t = torch.tensor([500, 500, 500])
    with torch.no_grad():
        context, mask = net.encode(tokens)
        null_context, null_mask = net.encode(VOCAB.null_tokens(3))
        both = net.denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null_context]),
                           torch.cat([mask, null_mask]))
        eps_c, eps_u = both.chunk(2)
        for i in range(3):  # batch of one each: no cross-sample leakage
            alone_c = net(x[i:i + 1], t[i:i + 1], tokens[i:i + 1])
            alone_u = net(x[i:i + 1], t[i:i + 1], VOCAB.null_tokens(1))
            torch.testing.assert_close(eps_c[i:i + 1], alone_c, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(eps_u[i:i + 1], alone_u, rtol=1e-4, atol=1e-5)
    assert (eps_c - eps_u).abs().max() > 1e-3  # the prompt matters, so the comparison means something


def test_grid_generation_is_independent_of_batching():
    net = model(0.05)
    schedule = NoiseSchedule("linear", 50)
    tokens = VOCAB.encode_batch(PROMPTS)
    seeds = [0, 7]
    whole = generate(net, schedule, tokens, seeds, guidance=3.0, steps=4, batch_size=64)
    pieces = generate(net, schedule, tokens, seeds, guidance=3.0, steps=4, batch_size=1)
    torch.testing.assert_close(whole, pieces, rtol=1e-4, atol=1e-5)
    # Image (p, n) starts from seed n's noise whatever the prompt: one prompt alone reproduces its row.
    row = generate(net, schedule, tokens[1:2], seeds, guidance=3.0, steps=4)
    torch.testing.assert_close(row[0], whole[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(whole[0, 0], whole[0, 1])
