"""Candidate speed-ups of memdiff's training and DP-SGD steps, measured before anyone implements
them: each variant patches the step for its own calls only and alternates, round by round, with the
unchanged step; the figure is the median of the per-round time ratios (paired, so load changes on a
shared machine cancel), and the peer (diffusers / Opacus) is measured the same way. Nothing here
changes the engine.

    python bench/what_if.py                 # train and dp, 1 thread
    python bench/what_if.py --only dp --rounds 7

Variants and what each would change if adopted:
  randn_noise     eps (training) / the DP noise drawn by torch.randn from a generator seeded with the
                  step's seed instead of the Philox reference: another random stream on the CPU (the
                  CUDA kernels keep Philox), so CPU runs stop matching GPU runs draw for draw
  channels_last   the model and x_t in channels-last memory format (training.channels_last exists)
  fused_adamw     torch.optim.AdamW(fused=True) on the CPU: the same update up to rounding
  bf16            the network under CPU bf16 autocast: different rounding, a different model
  vmap            DP per-sample norms from the exact torch.func path instead of the norm hooks
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kernels.dp_clip as dp_clip  # noqa: E402
import kernels.noising as noising  # noqa: E402
from bench.measure import interleaved, machine, median  # noqa: E402
from bench.peers import demo_unet_config, dp_step_cases, fixed_batch, say  # noqa: E402
from bench.train_step import MemdiffTrainStep  # noqa: E402
from data_pipeline.vocab import Vocabulary  # noqa: E402
from engine.diffusion.schedule import NoiseSchedule  # noqa: E402
from engine.model.unet import ConditionalUNet  # noqa: E402


def _randn_like_torch(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    g = torch.Generator(device=offsets.device).manual_seed(int(seed) & (2**63 - 1))
    return torch.randn(offsets.shape, generator=g, device=offsets.device)


@contextlib.contextmanager
def patched(variant: str):
    saved = []

    def swap(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)
    if variant == "randn_noise":
        swap(noising, "noise_for", lambda x0, seed: _randn_like_torch(seed, torch.empty(x0.shape, dtype=torch.int64)))
        swap(dp_clip, "randn_like_triton", _randn_like_torch)
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def with_patch(variant: str, step):
    def run() -> None:
        with patched(variant):
            step()
    return run


def paired(base, peer_name: str, peer, variants: dict, rounds: int, calls: int, batch: int, title: str) -> None:
    """Each variant (and the peer) against the unchanged step, in alternating rounds of its own: the
    per-round time ratio variant/base is paired, so a load change during the run cancels."""
    print(f"\n{title}: time of each against memdiff as is, paired per round (median [min-max] of {rounds} rounds)")
    base_times = []
    for name, step in {peer_name: peer, **variants}.items():
        times = interleaved({"memdiff": base, name: step}, rounds, calls, warmup=1, say=say)
        base_times += times["memdiff"]
        ratios = sorted(v / b for v, b in zip(times[name], times["memdiff"]))
        med = median(ratios)
        print(f"  {name:28s} x{med:.3f} [{ratios[0]:.3f}-{ratios[-1]:.3f}] of memdiff's time ({100 * (med - 1):+5.1f}%)",
              flush=True)
    print(f"  (memdiff as is: {median(base_times) * 1e3:.0f} ms per step over all rounds = "
          f"{batch / median(base_times):.0f} images/s)")


def train_variants(rounds: int, calls: int) -> None:
    from bench.peer_diffusers import DiffusersPair, DiffusersTrainStep  # noqa: PLC0415
    vocab, cfg, b = Vocabulary.default(), demo_unet_config(), 32
    x0, tokens, null = fixed_batch(b, cfg.image_size, vocab)

    def memdiff(channels_last=False, fused=None, dtype=torch.float32):
        torch.manual_seed(0)
        model = ConditionalUNet(cfg).train()
        x = x0
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x0.contiguous(memory_format=torch.channels_last)
        return MemdiffTrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused),
                                NoiseSchedule("linear", 1000), x, tokens, null, compute_dtype=dtype)
    torch.manual_seed(0)
    peer_model = DiffusersPair(cfg).train()
    peer = DiffusersTrainStep(peer_model, torch.optim.AdamW(peer_model.parameters(), lr=1e-3), x0, tokens, null)
    variants = {"randn_noise": with_patch("randn_noise", memdiff()), "channels_last": memdiff(channels_last=True), "fused_adamw": memdiff(fused=True),
                "bf16": memdiff(dtype=torch.bfloat16),
                "randn+fused+channels_last": with_patch("randn_noise", memdiff(channels_last=True, fused=True))}
    paired(memdiff(), "diffusers", peer, variants, rounds, calls, b, "train step (demo U-Net, batch 32, 32 px)")


def dp_variants(rounds: int, calls: int) -> None:
    cfg = demo_unet_config()

    def fresh(name: str, opacus=()):
        return dp_step_cases(cfg, 16, opacus_variants=opacus)[0][name]
    variants = {"nonprivate": fresh("nonprivate"), "vmap": fresh("memdiff_torch_func"),
                "randn_noise": with_patch("randn_noise", fresh("memdiff")),
                "vmap+randn_noise": with_patch("randn_noise", fresh("memdiff_torch_func"))}
    paired(fresh("memdiff"), "opacus_hooks", fresh("opacus_hooks", ("opacus_hooks",)), variants, rounds, calls, 16,
           "DP step (demo U-Net, batch 16, 32 px; memdiff = dp.norm_method auto, 'vmap' = torch.func configured)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="train,dp")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m = machine()
    print(f"{m['cpu']}, {m['cores']} cores, load average {m['load_average_1_5_15']}, {args.threads} thread(s), "
          f"torch {torch.__version__}, {m['date']}")
    if "train" in args.only:
        train_variants(args.rounds, args.calls)
    if "dp" in args.only:
        dp_variants(args.rounds, args.calls)
    print(f"\nload average at the end {machine()['load_average_1_5_15']}")


if __name__ == "__main__":
    main()
