"""Training-time screening drops exactly the samples whose ||eps_cond - eps_uncond|| exceeds tau,
checked against a slow one-sample-at-a-time computation."""
from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.vocab import NULL_ID
from engine.diffusion.schedule import NoiseSchedule, q_sample
from engine.model.unet import ConditionalUNet, UNetConfig
from engine.training.screening import ScreeningConfig, screen, screening_magnitude

SCHEDULE = NoiseSchedule("cosine", 200)


def setup():
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_heads=2, vocab_size=20, max_tokens=6, context_dim=16,
                     encoder_layers=1, encoder_heads=2)
    model = ConditionalUNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    b = 10
    x0 = torch.rand(b, 1, 16, 16, generator=g) * 2 - 1
    t = torch.randint(0, 200, (b,), generator=g)
    x_t = q_sample(x0, t, torch.randn(x0.shape, generator=g), SCHEDULE)
    tokens = torch.randint(2, 20, (b, 6), generator=g)
    tokens[:, 3:] = 0
    return model, x_t, t, tokens


def slow_magnitude(model, x_t, t, tokens, parameterization):
    out = []
    with torch.no_grad():
        for i in range(x_t.shape[0]):
            null = torch.zeros_like(tokens[i:i + 1])
            null[0, 0] = NULL_ID
            pc = model(x_t[i:i + 1], t[i:i + 1], tokens[i:i + 1])
            pu = model(x_t[i:i + 1], t[i:i + 1], null)
            if parameterization == "v":  # eps = sqrt(1-abar) x_t + sqrt(abar) v: the x_t terms cancel
                pc, pu = pc * SCHEDULE.sqrt_ab(t[i:i + 1]), pu * SCHEDULE.sqrt_ab(t[i:i + 1])
            out.append(float((pc - pu).norm()))
    return torch.tensor(out)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("units", ["raw", "rms"])
def test_screen_drops_exactly_samples_above_tau(parameterization, units):
    model, x_t, t, tokens = setup()
    ref = slow_magnitude(model, x_t, t, tokens, parameterization)
    if units == "rms":
        ref = ref / math.sqrt(16 * 16)
    srt = ref.sort().values
    tau = float(srt[5] + srt[6]) / 2  # between two samples: 6 kept, 4 dropped
    res = screen(model, x_t, t, tokens, ScreeningConfig(enabled=True, tau=tau, units=units), SCHEDULE,
                 parameterization)
    torch.testing.assert_close(res.magnitude, ref, rtol=1e-4, atol=1e-6)
    assert torch.equal(res.keep, ref <= tau)
    assert res.keep.sum() == 6


def test_reusing_the_conditional_prediction_gives_the_same_magnitudes():
    model, x_t, t, tokens = setup()
    with torch.no_grad():
        pred_cond = model(x_t, t, tokens)
    both = screening_magnitude(model, x_t, t, tokens, SCHEDULE)
    reused = screening_magnitude(model, x_t, t, tokens, SCHEDULE, pred_cond=pred_cond)
    torch.testing.assert_close(both[0], reused[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[1], both[0] / 16.0)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"^screening\.units"):
        ScreeningConfig(enabled=True, tau=1.0, units="db")
    with pytest.raises(ValueError, match=r"^screening\.tau"):
        ScreeningConfig(enabled=True, tau=0.0)


def test_magnitude_profile_is_the_slow_per_example_magnitude_at_its_drawn_t():
    """The tau-calibration profile (tools/screening_threshold): for each example and draw, L at the
    returned t equals the slow two-forward computation on the same x_t; chunking changes nothing."""
    from engine.training.screening import magnitude_profile
    model, _, _, tokens = setup()
    x0 = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    ts, mag = magnitude_profile(model, SCHEDULE, x0, tokens, draws=3, seed=7, batch_size=4)
    assert ts.shape == mag.shape == (10, 3) and ts.min() >= 0 and ts.max() < 200
    gen = torch.Generator().manual_seed(7)           # the documented draw order: t, then noise
    torch.randint(0, 200, (10, 3), generator=gen)
    noise = torch.randn((3, 10, 1, 16, 16), generator=gen)
    for d in range(3):
        x_t = q_sample(x0, ts[:, d], noise[d], SCHEDULE)
        ref = slow_magnitude(model, x_t, ts[:, d], tokens, "eps") / 16.0
        torch.testing.assert_close(mag[:, d], ref, rtol=1e-4, atol=1e-6)
    again = magnitude_profile(model, SCHEDULE, x0, tokens, draws=3, seed=7, batch_size=256)
    torch.testing.assert_close(again[1], mag)
    assert torch.equal(again[0], ts)
