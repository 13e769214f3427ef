"""Where the time goes in memdiff's training step, DP-SGD step and scan (and in their peers), on
this machine: a phase breakdown by function (cProfile, cumulative time of the functions that make
up a step) and the top operators by self CPU time (torch.profiler).

    python bench/profile_steps.py                 # all three, 1 thread
    python bench/profile_steps.py --only dp --calls 5 --top 20

The phases are named functions of the engine, kernels and peers; a phase's time includes the
phases it calls (e.g. 'PerSampleNormHooks.clipped_backward' includes 'PerSampleNormHooks.sq_norms').
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.peers import demo_unet_config, fixed_batch  # noqa: E402
from bench.train_step import MemdiffTrainStep  # noqa: E402
from data_pipeline.vocab import Vocabulary  # noqa: E402
from engine.diffusion.schedule import NoiseSchedule  # noqa: E402
from engine.model.unet import ConditionalUNet  # noqa: E402


def _phases() -> list[tuple[object, str]]:
    """(function, label) of the functions that make up the steps; optional peers when installed."""
    import kernels.dp_clip as dp_clip  # noqa: PLC0415
    import kernels.noising as noising  # noqa: PLC0415
    from engine.audit.wen_detector import detect  # noqa: PLC0415
    from engine.diffusion.guidance import predict_cond_uncond  # noqa: PLC0415
    from engine.diffusion.sampling import sample  # noqa: PLC0415
    from engine.model.prompt_encoder import PromptEncoder  # noqa: PLC0415
    from engine.training import diffusion_loss, dp_sgd  # noqa: PLC0415
    from kernels.guided_step import guided_step  # noqa: PLC0415
    from kernels.philox import randn_like_triton  # noqa: PLC0415

    phases = [
        (noising.noised_input, "noising: noised_input"),
        (noising.noise_prediction_loss, "noising: noise_prediction_loss"),
        (randn_like_triton, "Philox reference (randn_like_triton), all callers"),
        (ConditionalUNet.forward, "model forward (ConditionalUNet.forward)"),
        (ConditionalUNet.denoise, "  of which U-Net (ConditionalUNet.denoise)"),
        (PromptEncoder.forward, "  of which prompt encoder (PromptEncoder.forward)"),
        (torch.Tensor.backward, "backward (Tensor.backward)"),
        (torch.autograd.grad, "autograd.grad (DP norm pass)"),
        (torch.optim.AdamW.step, "optimizer (AdamW.step)"),
        (diffusion_loss.make_dp_batch, "DP: make_dp_batch (per-example t, eps, CFG drop)"),
        (diffusion_loss.diffusion_loss_fn, None),
        (dp_sgd.DPSGD.backward, "DP: DPSGD.backward (all of the private backward)"),
        (dp_sgd._vmap_clipped_sum, "DP: torch.func per-sample gradients (_vmap_clipped_sum)"),
        (dp_clip.PerSampleNormHooks.clipped_backward, "DP: PerSampleNormHooks.clipped_backward"),
        (dp_clip.PerSampleNormHooks._norm_pass, "DP:   norm pass (autograd.grad to layer outputs + rules)"),
        (dp_clip.PerSampleNormHooks._layer_sq_norms, "DP:   per-layer norm rules"),
        (dp_clip.conv2d_weight_sq_norms, "DP:     conv rule (patches or grouped, per-sample product)"),
        (dp_clip.conv_patches, "DP:       of which conv patches (strided-view copy)"),
        (dp_clip.conv2d_per_sample_weight_grads, "DP:     grouped conv rule (per-sample weight gradients, kept)"),
        (dp_clip.linear_weight_sq_norms, "DP:     linear rule"),
        (dp_clip.layer_param_grads, "DP:   clipped sum layer by layer (book-keeping)"),
        (dp_clip.add_noise_and_scale_, "DP: add_noise_and_scale_ (Philox noise, scale)"),
        (detect, "scan: detect"),
        (sample, "scan: sample"),
        (predict_cond_uncond, "scan: predict_cond_uncond (network)"),
        (guided_step, "scan: guided_step"),
    ]
    try:
        from opacus.grad_sample.grad_sample_module import GradSampleModule  # noqa: PLC0415
        from opacus.optimizers.optimizer import DPOptimizer  # noqa: PLC0415
        phases += [(DPOptimizer.pre_step, "Opacus: DPOptimizer.pre_step (clip, sum, noise)"),
                   (GradSampleModule.capture_backprops_hook, "Opacus: per-sample gradient hook")]
    except ImportError:
        pass
    try:
        from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: PLC0415
        phases += [(DDIMScheduler.step, "diffusers DDIMScheduler.step"),
                   (UNet2DConditionModel.forward, "diffusers UNet2DConditionModel.forward")]
    except ImportError:
        pass
    out = []
    for fn, label in phases:
        code = getattr(getattr(fn, "__wrapped__", fn), "__code__", None)
        if label and code is not None:
            out.append(((code.co_filename, code.co_firstlineno, code.co_name), label))
    return out


def phase_table(stats: pstats.Stats, calls: int) -> list[tuple[str, float]]:
    """(label, ms per step) of every phase that ran, in the order of _phases()."""
    rows = []
    for key, label in _phases():
        if key in stats.stats:
            rows.append((label, stats.stats[key][3] / calls * 1e3))
    return rows


def profile_case(name: str, step, calls: int, top: int) -> None:
    step()
    step()   # warm-up
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt / calls * 1e3
    print(f"\n=== {name}: {total:.1f} ms per step (cProfile, {calls} steps; profiling overhead included) ===")
    for label, ms in phase_table(stats, calls):
        print(f"  {ms:9.1f} ms  {100 * ms / total:5.1f}%  {label}")
    with profile(activities=[ProfilerActivity.CPU]) as prof_t:
        for _ in range(calls):
            step()
    print(f"  -- top {top} operators by self CPU time (torch.profiler, per step) --")
    events = sorted(prof_t.key_averages(), key=lambda e: -e.self_cpu_time_total)
    all_self = sum(e.self_cpu_time_total for e in events)
    for e in events[:top]:
        print(f"  {e.self_cpu_time_total / calls / 1e3:9.2f} ms  {100 * e.self_cpu_time_total / all_self:5.1f}%  "
              f"{e.count // calls:5d} calls  {e.key}")


def train_cases():
    from bench.peer_diffusers import DiffusersPair, DiffusersTrainStep  # noqa: PLC0415
    vocab = Vocabulary.default()
    cfg = demo_unet_config()
    x0, tokens, null = fixed_batch(32, cfg.image_size, vocab)
    torch.manual_seed(0)
    m = ConditionalUNet(cfg).train()
    yield "memdiff train step (demo U-Net, batch 32, 32 px)", MemdiffTrainStep(
        m, torch.optim.AdamW(m.parameters(), lr=1e-3), NoiseSchedule("linear", 1000), x0, tokens, null)
    torch.manual_seed(0)
    d = DiffusersPair(cfg).train()
    yield "diffusers train step (same size)", DiffusersTrainStep(d, torch.optim.AdamW(d.parameters(), lr=1e-3),
                                                                 x0, tokens, null)


def dp_cases():
    from bench.peer_opacus import opacus_step  # noqa: PLC0415
    from engine.training.diffusion_loss import diffusion_loss_fn, make_dp_batch
    from engine.training.dp_sgd import DPSGD, DPConfig  # noqa: PLC0415
    warnings.filterwarnings("ignore")
    vocab, cfg, b = Vocabulary.default(), demo_unet_config(), 16
    x0, tokens, _ = fixed_batch(b, cfg.image_size, vocab, seed=1)
    schedule = NoiseSchedule("linear", 1000)
    loss_fn = diffusion_loss_fn(schedule)
    for method in ("ghost", "vmap"):   # the two exact paths ('auto' runs the faster of them)
        torch.manual_seed(0)
        model = ConditionalUNet(cfg).train()
        dp = DPSGD(model, DPConfig(enabled=True, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=b,
                                   norm_method=method).resolve(100 * b, 1000), seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(dp=dp, opt=opt, s=iter(range(10**9))) -> None:
            i = next(s)
            dp.backward(loss_fn, make_dp_batch(x0, tokens, torch.arange(b), schedule, seed=0, step=i, p_uncond=0.5), i)
            opt.step()
        yield f"memdiff DP step, norm_method {method} (batch {b})", step
    torch.manual_seed(0)
    yield "Opacus hooks DP step (same model/batch)", opacus_step(ConditionalUNet(cfg).train(), "opacus_hooks", x0, tokens,
                                                                 schedule, noise_multiplier=1.0, clip_norm=1.0, lr=1e-3,
                                                                 p_uncond=0.5)


def scan_cases():
    from bench.wen_loop import wen_loop_norms  # noqa: PLC0415
    from engine.audit.wen_detector import DetectorSettings, detect
    from engine.diffusion.seeds import prompt_seeds  # noqa: PLC0415
    vocab, cfg = Vocabulary.default(), demo_unet_config()
    torch.manual_seed(0)
    model = ConditionalUNet(cfg).eval()
    schedule = NoiseSchedule("linear", 1000)
    _, tokens, _ = fixed_batch(64, cfg.image_size, vocab)
    seeds = prompt_seeds(range(64), 0)
    shape = (1, cfg.image_size, cfg.image_size)

    def first_step() -> None:
        for s in range(0, 64, 16):
            detect(model, schedule, tokens[s:s + 16], seeds[s:s + 16], DetectorSettings(steps=1), image_shape=shape)
    yield "memdiff scan, first-step score, 64 prompts in batches of 16", first_step
    yield "Wen loop, 50 DDIM steps, 1 prompt", lambda: wen_loop_norms(model, tokens[:1], seeds[:1], image_shape=shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--only", default="train,dp,scan")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()}")
    sections = {"train": train_cases, "dp": dp_cases, "scan": scan_cases}
    for key in args.only.split(","):
        for name, step in sections[key.strip()]():
            profile_case(name, step, args.calls, args.top)


if __name__ == "__main__":
    main()
