"""DP-SGD step vs the non-private step on the CPU demo model: time per step and the overhead ratio.

    pytest bench/bench_dp.py --benchmark-only
    python bench/bench_dp.py            # prints the ratios without pytest

Variants (batch 16, 32 px, the model of configs/demo_cpu.json when present):
  nonprivate   forward + backward of the mean loss
  dp_ghost     engine.training.dp_sgd.DPSGD with per-sample norms from activations and output gradients
               (kernels.dp_clip: direct or Gram "ghost" rule per layer, no per-sample gradients)
  dp_vmap      the exact torch.func (vmap of grad) per-sample gradients, for comparison
  *_k4         the same with noise multiplicity K = 4 (four noise draws per image, 64 network rows)
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

from data_pipeline.config_schema import build  # noqa: E402
from engine.diffusion.schedule import NoiseSchedule  # noqa: E402
from engine.model.unet import ConditionalUNet, UNetConfig  # noqa: E402
from engine.training.diffusion_loss import diffusion_loss_fn, make_dp_batch  # noqa: E402
from engine.training.dp_sgd import DPSGD, DPConfig  # noqa: E402

warnings.filterwarnings("ignore", message=".*batching rule.*")
BATCH, SIZE = 16, 32
DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo_cpu.json")


def demo_model_config() -> UNetConfig:
    if os.path.isfile(DEMO):
        model = dict(json.load(open(DEMO)).get("model", {}))
        model["image_size"] = SIZE
        return build(UNetConfig, model, "model")
    return UNetConfig(image_size=SIZE, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                      attention_resolutions=(8,), context_dim=64, encoder_layers=2, vocab_size=96, max_tokens=32)


VARIANTS = ["nonprivate", "dp_ghost", "dp_vmap", "nonprivate_k4", "dp_ghost_k4", "dp_vmap_k4"]


def setup(variant: str):
    k = 4 if variant.endswith("_k4") else 1
    variant = variant.removesuffix("_k4")
    torch.manual_seed(0)
    cfg = demo_model_config()
    model = ConditionalUNet(cfg)
    schedule = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(BATCH, 1, SIZE, SIZE, generator=g) * 2 - 1
    tokens = torch.randint(2, cfg.vocab_size, (BATCH, cfg.max_tokens), generator=g)
    batch = make_dp_batch(x0, tokens, torch.arange(BATCH), schedule, seed=0, step=0, multiplicity=k)
    loss_fn = diffusion_loss_fn(schedule)
    if variant == "nonprivate":
        def step():
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).mean().backward()
        return step
    resolved = DPConfig(enabled=True, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=BATCH,
                        noise_multiplicity=k,
                        norm_method="ghost" if variant == "dp_ghost" else "vmap").resolve(100 * BATCH, 1000)
    dp = DPSGD(model, resolved, seed=0)
    return lambda: dp.backward(loss_fn, batch, 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dp_step_time(benchmark, variant):
    torch.set_num_threads(1)
    step = setup(variant)
    step()  # warm-up (and the auto fallback decision)
    benchmark.pedantic(step, rounds=3, iterations=1)
    benchmark.extra_info["batch"] = BATCH
    benchmark.extra_info["image_size"] = SIZE


def main() -> None:
    torch.set_num_threads(1)
    times = {}
    for variant in VARIANTS:
        step = setup(variant)
        step()
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        times[variant] = (time.perf_counter() - t0) / 3
    for variant, t in times.items():
        base = times["nonprivate_k4" if variant.endswith("_k4") else "nonprivate"]
        print(f"{variant:14s} {t * 1000:8.1f} ms/step  x{t / base:.2f} of the non-private step")


if __name__ == "__main__":
    main()
