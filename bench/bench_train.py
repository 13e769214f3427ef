"""Training throughput (images/s) of one optimizer step, eager vs torch.compile, on this machine's
device: the 0.5M-parameter CPU demo model (32 px) and a mid-size model (64 px).

One step = the trainer's step without DeepSpeed: CFG drop, kernels.noising.noised_input, forward,
noise_prediction_loss, backward, AdamW. Run: pytest bench/bench_train.py --benchmark-only
(the compiled cases spend their first warm-up rounds compiling).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipeline.vocab import Vocabulary
from engine.diffusion.schedule import NoiseSchedule
from engine.model.unet import ConditionalUNet, UNetConfig, count_parameters
from kernels.noising import noise_prediction_loss, noised_input

REPO = Path(__file__).resolve().parents[1]
VOCAB = Vocabulary.default()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def demo_config() -> tuple[UNetConfig, int]:
    model = json.loads((REPO / "configs" / "demo_cpu.json").read_text())["model"]
    model = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}
    return UNetConfig(**model), 32


MODELS = {
    "demo_32px": demo_config,
    "mid_64px": lambda: (UNetConfig(image_size=64, base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                                    attention_resolutions=(16, 8), num_heads=4, context_dim=128, encoder_layers=2,
                                    encoder_heads=4), 8 if DEVICE == "cpu" else 128),
}


def make_step(cfg: UNetConfig, batch: int, compiled: bool):
    torch.manual_seed(0)
    model = ConditionalUNet(cfg).to(DEVICE).train()
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = NoiseSchedule("linear", 1000)
    x0 = torch.rand(batch, 1, cfg.image_size, cfg.image_size, device=DEVICE) * 2 - 1
    prompts = ["frontal AP chest x-ray, female, 60s: pleural effusion", "frontal PA chest x-ray, male, 30s"]
    tokens = VOCAB.encode_batch([prompts[i % 2] for i in range(batch)]).to(DEVICE)
    null = VOCAB.null_tokens(batch).to(DEVICE)
    counter = iter(range(10**9))

    def step() -> None:
        seed = next(counter)
        gen = torch.Generator().manual_seed(seed)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(DEVICE)
        drop = (torch.rand(batch, generator=gen) < 0.5).to(DEVICE)
        tok = torch.where(drop[:, None], null, tokens)
        sab, s1mab = schedule.sqrt_ab(t), schedule.sqrt_1mab(t)
        pred = forward(noised_input(x0, sab, s1mab, seed), t, tok)
        loss = noise_prediction_loss(pred, x0, sab, s1mab, seed).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return model, step


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", list(MODELS))
def test_train_step_images_per_second(benchmark, name, compiled):
    cfg, batch = MODELS[name]()
    model, step = make_step(cfg, batch, compiled)
    benchmark.extra_info.update(params_M=round(count_parameters(model) / 1e6, 3), batch=batch, device=DEVICE,
                                image_size=cfg.image_size)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=3 if compiled else 1)
    benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats.stats.median, 1)
