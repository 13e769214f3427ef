"""Prompts/s of the batched scanner (many prompts per forward) vs a Wen-style loop (one prompt x 4
generations per forward), 50 DDIM steps, on the same small 32 px model. CPU by default; CUDA if present.

    .venv/bin/python -m pytest bench/bench_scan.py --benchmark-only -s
"""
import pytest
import torch

from data_pipeline.vocab import Vocabulary
from engine.audit.wen_detector import DetectorSettings, detect
from engine.diffusion.schedule import NoiseSchedule
from engine.diffusion.seeds import prompt_seeds
from engine.model.unet import ConditionalUNet, UNetConfig, count_parameters

VOCAB = Vocabulary.default()
N_PROMPTS = 8
SETTINGS = DetectorSettings(generations=4, steps=50, guidance=7.5)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def small_model() -> ConditionalUNet:
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=32, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_heads=2, vocab_size=len(VOCAB), max_tokens=VOCAB.max_len,
                     context_dim=64, encoder_layers=1, encoder_heads=2)
    model = ConditionalUNet(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval().to(DEVICE)


@pytest.fixture(scope="module")
def setup():
    texts = [f"frontal AP chest x-ray, {sex}, {age}: {f}" for sex in ("female", "male")
             for age in ("20s", "40s", "60s", "80s") for f in ("edema", "cardiomegaly")]
    tokens = VOCAB.encode_batch(texts[:N_PROMPTS])
    return small_model(), NoiseSchedule("linear", 1000), tokens, prompt_seeds(range(N_PROMPTS), 0)


def _report(benchmark, name, seconds_per_run, model):
    rate = N_PROMPTS / seconds_per_run
    benchmark.extra_info.update({"prompts_per_s": rate, "params": count_parameters(model), "device": DEVICE})
    print(f"\n{name}: {rate:.2f} prompts/s ({N_PROMPTS} prompts x 4 generations x 50 steps, "
          f"{count_parameters(model) / 1e6:.2f}M params, {DEVICE})")


@pytest.mark.parametrize("batch_prompts", [8])
def test_batched_scanner(benchmark, setup, batch_prompts):
    model, schedule, tokens, seeds = setup

    def run():
        for b in range(0, N_PROMPTS, batch_prompts):
            detect(model, schedule, tokens[b:b + batch_prompts], seeds[b:b + batch_prompts], SETTINGS,
                   image_shape=(1, 32, 32))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    _report(benchmark, f"scanner, {batch_prompts} prompts per forward", benchmark.stats.stats.mean, model)


def test_wen_style_loop(benchmark, setup):
    model, schedule, tokens, seeds = setup

    def run():
        for p in range(N_PROMPTS):   # the reference implementation's shape: one prompt per pipeline call
            detect(model, schedule, tokens[p:p + 1], seeds[p:p + 1], SETTINGS, image_shape=(1, 32, 32))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    _report(benchmark, "Wen-style loop, 1 prompt per forward", benchmark.stats.stats.mean, model)
