"""The sections of one prepared GPU session; bench/gpu_session.sh runs each as its own process
under its own time limit and then merges their results.

    python bench/gpu_session.py SECTION --work DIR --deadline EPOCH_S [--dry-run]
    python bench/gpu_session.py merge --work DIR --out DIR

Sections (each writes DIR/SECTION.json after every measurement, so a section stopped at its time
limit keeps what it finished):
  env       device, versions, optional packages; the two ceilings: device-to-device copy GB/s and
            bf16 matrix-product TFLOP/s (8192^3, random data), the references for the rest
  kernels   the Triton kernels (noised input, noise-prediction loss + gradient, guided DDIM step,
            DP direct per-sample norm, DP noise) compiled on the device, checked against their
            PyTorch references on fresh random inputs with NaN-poisoned outputs, then timed
            (median, triton.testing.do_bench) as GB/s against the copy bandwidth
  train64   the configs/cfg.json U-Net (98.8M parameters) at 64 px, batch 64, bf16 autocast, memdiff's
            training step (bench/train_step.py) eager and torch.compile'd: images/s and model FLOP
            utilisation against the measured bf16 rate and the datasheet's 989 TFLOP/s
  train128  the same network at 128 px (attention resolutions doubled: the same layers, 4x the pixels)
  scan      Wen's detector on the cfg.json U-Net at 64 px: memdiff's batched layout (32 prompts per
            forward), the per-prompt loop layout, and the first-step mode; prompts/s
  peers     train_step vs diffusers and dp_step vs opacus on the device when their wheels were carried
            (bench/fetch_wheels.sh), and memdiff's DP step against its non-private step either way

No DeepSpeed, DALI, open_clip, diffusers or Opacus is needed (the device image has none of them);
the training step is the trainer's step with DeepSpeed's engine replaced by the module and a fused
torch AdamW. `--dry-run` runs every section on the CPU at tiny sizes (Triton kernels through the
interpreter, torch.compile with the 'eager' backend) to prove the script works.
"""
from __future__ import annotations

import argparse
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SECTIONS = ("env", "kernels", "train64", "train128", "scan", "peers")
DATASHEET_BF16_TFLOPS = 989.4   # H100/H200 SXM dense bf16 (vendor datasheet; a lead, the measured rate is below)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Section:
    """Results of one section, written to DIR/<name>.json after every `put`."""

    def __init__(self, work: str, name: str, deadline: float, dry_run: bool) -> None:
        self.path = os.path.join(work, f"{name}.json")
        self.name, self.deadline, self.dry_run = name, deadline, dry_run
        self.data: dict = {"section": name, "status": "running", "dry_run": dry_run, "items": {}}
        self.started = time.time()
        self.flush()

    def put(self, key: str, value) -> None:
        self.data["items"][key] = value
        self.flush()
        print(f"[{self.name}] {key}: {json.dumps(value, default=str)[:400]}", flush=True)

    def left(self) -> float:
        return self.deadline - time.time()

    def flush(self) -> None:
        self.data["seconds"] = round(time.time() - self.started, 1) if hasattr(self, "started") else 0.0
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def device_of(dry_run: bool):
    import torch
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_session: no CUDA device (use --dry-run on a CPU)")
    return torch.device("cuda")


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, reps: int, warmup: int = 2) -> float:
    """Median milliseconds per call: CUDA events (triton.testing.do_bench) on the GPU, a host clock on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))


def ceilings(work: str) -> dict:
    try:
        with open(os.path.join(work, "env.json")) as f:
            items = json.load(f)["items"]
        return {"copy_GBps": items.get("copy", {}).get("GBps"), "bf16_TFLOPs": items.get("bf16_matmul", {}).get("TFLOPs")}
    except (OSError, KeyError, ValueError):
        return {"copy_GBps": None, "bf16_TFLOPs": None}


# ----------------------------------------------------------------------------- env

def section_env(s: Section, device) -> None:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": str(device)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, sm_count=p.multi_processor_count, memory_GiB=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", l2_MB=round(getattr(p, "L2_cache_size", 0) / 1e6, 1))
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit,temperature.gpu",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["nvidia_smi"] = f"failed: {e}"
    s.put("env", info)
    packages = {}   # looked up, not imported: importing DeepSpeed or DALI would be slow or fail
    for name, dist in (("diffusers", "diffusers"), ("opacus", "opacus"), ("deepspeed", "deepspeed"),
                       ("nvidia.dali", "nvidia-dali-cuda130"), ("open_clip", "open_clip_torch")):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        version = None
        if found:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = "present"
        packages[name] = version or "absent"
    s.put("packages", packages)

    # copy bandwidth: bytes read + written over a copy several times the L2 (2 GiB on the GPU)
    n = (16 << 20) if s.dry_run else (2 << 30)
    buffers = [torch.randn(n // 4, device=device), torch.empty(n // 4, device=device)]
    ms = time_ms(lambda: buffers[1].copy_(buffers[0]), device, reps=5)
    s.put("copy", {"bytes": 2 * n, "ms": ms, "GBps": 2 * n / ms / 1e6})
    buffers.clear()
    # bf16 matrix product on random data (zeros run faster and would flatter every MFU below)
    m = 256 if s.dry_run else 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device, reps=3)
    s.put("bf16_matmul", {"n": m, "ms": ms, "TFLOPs": 2 * m ** 3 / ms / 1e9,
                          "datasheet_TFLOPs": DATASHEET_BF16_TFLOPS})


# ----------------------------------------------------------------------------- kernels

class _Poisoned:
    """Swap a kernel module's `_alloc` for a NaN-filled one: an unwritten output element stays NaN."""

    def __init__(self, *modules) -> None:
        self.modules, self.saved = modules, []

    def __enter__(self):
        import torch

        def nan_alloc(shape, dtype, device):
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        for m in self.modules:
            self.saved.append(m._alloc)
            m._alloc = nan_alloc
        return self

    def __exit__(self, *exc) -> None:
        for m, fn in zip(self.modules, self.saved):
            m._alloc = fn


def _rel(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not bool(out.isfinite().all()):
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def section_kernels(s: Section, device) -> None:
    """Each kernel on fresh random inputs: relative error against its reference in fp64 (outputs
    NaN-poisoned first), then its median time as GB/s of the bytes it must move."""
    import torch

    peak = ceilings(os.path.dirname(s.path))["copy_GBps"]
    gen = torch.Generator().manual_seed(int(time.time()))   # fresh inputs every session (METHOD.md)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    b, side = (4, 16) if s.dry_run else (2048, 128)   # 2048 x 128 x 128 fp32 = 134 MB, over twice the 60 MB L2

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def timed(fn):
        return None if s.dry_run else time_ms(fn, device, 3)

    def report(name: str, rel: float, tol: float, ms: float | None, nbytes: int, **extra) -> None:
        item = {"rel_err": rel, "tolerance": tol, "passed": bool(rel <= tol), "ms": ms, "bytes": nbytes, **extra}
        if ms:
            item["GBps"] = nbytes / ms / 1e6
            if peak:
                item["fraction_of_copy_bw"] = item["GBps"] / peak
        s.put(name, item)

    for check in (_check_noising, _check_guided_step, _check_direct_norms, _check_dp_noise):
        check(rnd, timed, report, seed, b, side, device, gen)


def _check_noising(rnd, timed, report, seed, b, side, device, gen) -> None:
    import torch

    import kernels.noising as noising
    from engine.diffusion.schedule import NoiseSchedule
    sched = NoiseSchedule("linear", 1000)
    t = torch.randint(0, 1000, (b,), generator=gen)
    x0, pred = rnd(b, 1, side, side), rnd(b, 1, side, side)
    sab, s1 = sched.sqrt_ab(t).to(device), sched.sqrt_1mab(t).to(device)
    # x_t = sqrt_ab x0 + sqrt_1mab eps(seed): read x0, write x_t
    with _Poisoned(noising):
        out = noising.noised_input_triton(x0, sab, s1, seed)
    ref = noising.noised_input_reference(x0.double(), sab.double(), s1.double(), seed)
    report("noised_input fp32", _rel(out, ref), 1e-5, timed(lambda: noising.noised_input_triton(x0, sab, s1, seed)),
           2 * x0.numel() * 4, shape=list(x0.shape))
    # loss + gradient in one pass: read pred, write d loss / d pred (and per-block partial sums)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        p = pred.to(dtype)
        with _Poisoned(noising):
            loss, grad = noising._loss_and_grad_triton(p, x0, sab, s1, seed, None, "eps", True)
        loss_ref, grad_ref = noising._loss_and_grad_torch(p.double(), x0.double(), sab.double(), s1.double(), seed,
                                                          None, "eps", True)   # the same inputs, in fp64
        ms = timed(lambda: noising._loss_and_grad_triton(p, x0, sab, s1, seed, None, "eps", True))
        report(f"noise_prediction_loss+grad {str(dtype).removeprefix('torch.')} pred",
               max(_rel(loss, loss_ref), _rel(grad, grad_ref)), tol, ms, 2 * p.numel() * p.element_size())


def _check_guided_step(rnd, timed, report, seed, b, side, device, gen) -> None:
    import kernels.guided_step as guided
    # read eps_c, eps_u, x_t; write x_prev (norm partials are B x blocks floats)
    xt, eps = rnd(b, 1, side, side), rnd(2 * b, 1, side, side)
    coefs = dict(guidance=7.5, sqrt_ab_t=0.3, sqrt_1mab_t=math.sqrt(1 - 0.09), sqrt_ab_prev=0.5,
                 sqrt_1mab_prev_dir=math.sqrt(1 - 0.25), sigma=0.0, clip_x0=True)
    with _Poisoned(guided):
        out, nraw, _ = guided.guided_step_triton(eps, xt, None, **coefs)
    ref, nref, _ = guided.guided_step_reference(eps.double(), xt.double(), None, **coefs)
    report("guided_step fp32", max(_rel(out, ref), _rel(nraw, nref)), 1e-5,
           timed(lambda: guided.guided_step_triton(eps, xt, None, **coefs)), 4 * xt.numel() * 4)


def _check_direct_norms(rnd, timed, report, seed, b, side, device, gen) -> None:
    import kernels.dp_clip as dp_clip
    # sum((A_i^T B_i)^2) per sample; the shape of a 3x3 conv 128->128 at 64x64 in the cfg.json model
    bb, tt, pp, qq = (2, 64, 36, 8) if b < 64 else (16, 4096, 1152, 128)
    a, g = rnd(bb, tt, pp), rnd(bb, tt, qq)
    with _Poisoned(dp_clip):
        norms = dp_clip.direct_sq_norms_triton(a, g)
    ref = dp_clip.direct_sq_norms_reference(a.double(), g.double())
    ms = timed(lambda: dp_clip.direct_sq_norms_triton(a, g))
    report("dp direct_sq_norms fp32 (ieee)", _rel(norms, ref), 1e-4, ms, 4 * bb * tt * (pp + qq),
           shape_B_T_P_Q=[bb, tt, pp, qq], TFLOPs=(2 * bb * tt * pp * qq / ms / 1e9) if ms else None)


def _check_dp_noise(rnd, timed, report, seed, b, side, device, gen) -> None:
    import kernels.dp_clip as dp_clip
    # g <- (g + sigma C z(seed)) / (q N): one read and one write per element
    n = 4096 if b < 64 else 98_750_849   # the cfg.json model's parameter count
    grads = [rnd(n)]
    ref = [grads[0].double()]
    if device.type == "cuda":
        dp_clip.add_noise_and_scale_(grads, 1.0, 1.0, 64.0, seed)
    else:
        _noise_triton_cpu(dp_clip, grads, seed)
    dp_clip.add_noise_and_scale_reference_(ref, 1.0, 1.0, 64.0, seed)
    report("dp add_noise_and_scale_ fp32", _rel(grads[0], ref[0]), 1e-5,
           timed(lambda: dp_clip.add_noise_and_scale_(grads, 1.0, 1.0, 64.0, seed)), 2 * n * 4, elements=n)


def _noise_triton_cpu(dp_clip, grads, seed) -> None:
    """The Triton noise kernel under the interpreter (the dispatch picks the reference on CPU tensors)."""
    import triton
    g = grads[0]
    dp_clip._noise_scale_kernel[(triton.cdiv(g.numel(), 1024),)](g, g.numel(), 0, int(seed), 1.0, 1.0 / 64.0,
                                                                  BLOCK=1024)


# ----------------------------------------------------------------------------- training

def cfg_json_unet(image_size: int, dry_run: bool):
    """configs/cfg.json's U-Net at `image_size` (attention resolutions scaled with it); tiny for --dry-run."""
    from data_pipeline.config_schema import build
    from engine.model.unet import UNetConfig
    with open(os.path.join(REPO, "configs", "cfg.json")) as f:
        model = json.load(f)["model"]
    scale = image_size // model["image_size"]
    if dry_run:   # a quarter of the side, two levels, one attention resolution (scaled like the real one)
        model.update(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, context_dim=32, encoder_layers=1,
                     attention_resolutions=[8])
        image_size //= 4
    model["attention_resolutions"] = [r * scale for r in model["attention_resolutions"]]
    model["image_size"] = image_size
    model["dropout"] = model.get("dropout", 0.0)
    return build(UNetConfig, model, "model")


def section_train(s: Section, device, image_size: int) -> None:
    import torch

    from bench.peers import fixed_batch, flops_per_image
    from bench.train_step import MemdiffTrainStep
    from data_pipeline.vocab import Vocabulary
    from engine.diffusion.schedule import NoiseSchedule
    from engine.model.unet import ConditionalUNet, count_parameters

    cfg = cfg_json_unet(image_size, s.dry_run)
    batch = 2 if s.dry_run else 64
    steps = 3 if s.dry_run else (300 if image_size <= 64 else 200)
    flops_img = flops_per_image(ConditionalUNet, cfg)
    ceil = ceilings(os.path.dirname(s.path))
    s.put("config", {"image_size": cfg.image_size, "batch": batch, "attention_resolutions": list(cfg.attention_resolutions),
                     "model_GFLOP_per_image_fwd_bwd": flops_img / 1e9, "dtype": "bf16 autocast"})
    vocab = Vocabulary.default()
    x0, tokens, null = fixed_batch(batch, cfg.image_size, vocab, device=device)
    # the dry run compiles once (train64): the 128 px section runs the same code
    for mode in ("eager",) if s.dry_run and image_size > 64 else ("eager", "compiled"):
        if s.left() < (20 if mode == "eager" else 60) and not s.dry_run:
            s.put(mode, {"skipped": f"{s.left():.0f} s left in the section"})
            continue
        torch.manual_seed(0)
        model = ConditionalUNet(cfg).to(device).train()
        forward = model
        if mode == "compiled":
            forward = torch.compile(model, backend="eager" if s.dry_run else "inductor")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
        step = MemdiffTrainStep(model, opt, NoiseSchedule("linear", 1000), x0, tokens, null, p_uncond=0.5,
                                compute_dtype=torch.bfloat16, forward=forward)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(3):   # warm-up (the compiled forward and backward are built in the first step)
            step()
        sync(device)
        warm_s = time.perf_counter() - start
        first_loss = float(step.last_loss)
        done, start = 0, time.perf_counter()
        budget = (0.35 if mode == "eager" else 1.0) * s.left() - 10   # eager leaves room for the compile
        while done < steps and (done == 0 or time.perf_counter() - start < budget):
            step()
            done += 1
            if done % 25 == 0:
                sync(device)
        sync(device)
        elapsed = time.perf_counter() - start
        rate = done * batch / elapsed
        item = {"steps": done, "seconds": elapsed, "warmup_and_compile_s": warm_s, "images_per_s": rate,
                "loss_first": first_loss, "loss_last": float(step.last_loss),
                "parameters_M": count_parameters(model) / 1e6,
                "model_TFLOPs": rate * flops_img / 1e12}
        if ceil["bf16_TFLOPs"]:
            item["MFU_vs_measured_bf16"] = rate * flops_img / (ceil["bf16_TFLOPs"] * 1e12)
        item["MFU_vs_datasheet_bf16"] = rate * flops_img / (DATASHEET_BF16_TFLOPS * 1e12)
        if device.type == "cuda":
            item["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        s.put(mode, item)
        del model, opt, step, forward
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- scan

def section_scan(s: Section, device) -> None:
    import torch

    from bench.peers import PROMPTS
    from data_pipeline.vocab import Vocabulary
    from engine.audit.wen_detector import DetectorSettings, detect
    from engine.diffusion.schedule import NoiseSchedule
    from engine.diffusion.seeds import prompt_seeds
    from engine.model.unet import ConditionalUNet

    cfg = cfg_json_unet(64, s.dry_run)
    torch.manual_seed(0)
    model = ConditionalUNet(cfg).to(device).eval()
    with torch.no_grad():   # an untrained net has a zero output layer: give it weights, speed only
        model.conv_out.weight.normal_(0, 0.02)
    schedule = NoiseSchedule("linear", 1000)
    vocab = Vocabulary.default()
    n = 4 if s.dry_run else 64
    tokens = vocab.encode_batch([PROMPTS[i % len(PROMPTS)] for i in range(n)])
    seeds = prompt_seeds(range(n), 0)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    steps = 2 if s.dry_run else 50
    # cheapest first, so that a section cut short by its limit still has the comparisons that matter
    layouts = [("first_step_batched_32_bf16", 32, 1, True, n), ("batched_32_bf16", 32, steps, True, n),
               ("loop_1_bf16", 1, steps, True, 2 if s.dry_run else 8),
               ("loop_1_fp32", 1, steps, False, 2 if s.dry_run else 8),
               ("batched_32_fp32", 32, steps, False, min(n, 32))]
    for name, per_batch, n_steps, bf16, n_prompts in layouts:
        if s.left() < 15 and not s.dry_run:
            s.put(name, {"skipped": f"{s.left():.0f} s left in the section"})
            continue
        settings = DetectorSettings(generations=4, steps=n_steps, guidance=7.5, bf16=bf16)

        def run() -> None:
            for b0 in range(0, n_prompts, per_batch):
                detect(model, schedule, tokens[b0:b0 + per_batch], seeds[b0:b0 + per_batch], settings,
                       image_shape=shape)
        detect(model, schedule, tokens[:1], seeds[:1], settings, image_shape=shape)   # warm-up (Triton compile)
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        elapsed = time.perf_counter() - start
        s.put(name, {"prompts": n_prompts, "prompts_per_batch": per_batch, "steps": n_steps, "generations": 4,
                     "bf16": bf16, "seconds": elapsed, "prompts_per_s": n_prompts / elapsed})


# ----------------------------------------------------------------------------- peers

def section_peers(s: Section, device) -> None:
    import torch

    from bench.measure import interleaved, median
    from bench.peers import auto_norm_choice, dp_step_cases, train_step_cases

    have = {name: importlib.util.find_spec(name) is not None for name in ("diffusers", "opacus")}
    cfg = cfg_json_unet(64, s.dry_run)
    rounds, calls = (1, 1) if s.dry_run else (5, 4)
    do_sync = lambda: sync(device)   # noqa: E731
    if have["diffusers"]:
        batch = 2 if s.dry_run else 64
        cases, info = train_step_cases(cfg, batch, device=str(device), compute_dtype=torch.bfloat16, lr=1e-4)
        times = interleaved(cases, rounds, calls, warmup=2, sync=do_sync)
        s.put("train_step_vs_diffusers", {"ratio_memdiff_over_diffusers": median(times["diffusers"]) / median(times["memdiff"]),
                                          "images_per_s": {k: batch / median(v) for k, v in times.items()},
                                          "info": info})
    else:
        s.put("train_step_vs_diffusers", {"skipped": "diffusers is not importable on this machine: carry the wheels "
                                                     "(bench/fetch_wheels.sh, then run with carry=['.whl'])"})
    if s.left() < 30 and not s.dry_run:
        s.put("dp_step", {"skipped": f"{s.left():.0f} s left in the section"})
        return
    batch = 2 if s.dry_run else 16
    variants = ("opacus_hooks", "opacus_ghost") if have["opacus"] else ()
    cases, info = dp_step_cases(cfg, batch, device=str(device), opacus_variants=variants)
    times = interleaved(cases, 1 if s.dry_run else 3, 1 if s.dry_run else 2, warmup=1, sync=do_sync)
    med = {k: median(v) for k, v in times.items()}
    item = {"ms_per_step": {k: v * 1e3 for k, v in med.items()},
            "memdiff_over_nonprivate_time": med["memdiff"] / med["nonprivate"], "info": info,
            "auto_norm_choice": auto_norm_choice(cases["memdiff"])}
    if have["opacus"]:
        item["ratio_memdiff_over_opacus_hooks"] = med["opacus_hooks"] / med["memdiff"]
    else:
        item["opacus"] = "not importable: carry the wheels (bench/fetch_wheels.sh)"
    s.put("dp_step", item)


# ----------------------------------------------------------------------------- merge

def merge(work: str, out: str) -> None:
    """DIR/*.json -> OUT/results.json and OUT/summary.md (the short table a person reads first)."""
    sections = {}
    for path in sorted(glob.glob(os.path.join(work, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        sections[data["section"]] = data
    status_path = os.path.join(work, "status.txt")
    statuses = {}
    if os.path.exists(status_path):
        for line in open(status_path):
            name, _, text = line.strip().partition(" ")
            statuses[name] = text
    for name, text in statuses.items():   # the driver's word (ok / timed out / failed / skipped) wins,
        sec = sections.setdefault(name, {"section": name, "items": {}})   # with the section's own error kept
        own = str(sec.get("status", ""))
        sec["status"] = text + (f" -- {own}" if own.startswith("failed") and text != "ok" else "")
    with open(os.path.join(out, "results.json.tmp"), "w") as f:
        json.dump(sections, f, indent=1, default=str)
    os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))
    lines = ["# GPU session summary", "", f"session: {statuses.get('session', 'in progress')}", ""]
    for name in SECTIONS:
        sec = sections.get(name)
        if sec is None:
            lines.append(f"- {name}: not run")
            continue
        lines.append(f"## {name}: {sec.get('status', '?')} ({sec.get('seconds', '?')} s)")
        for key, value in sec.get("items", {}).items():
            lines.append(f"- {key}: {_short(value)}")
        lines.append("")
    with open(os.path.join(out, "summary.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out, "summary.md.tmp"), os.path.join(out, "summary.md"))


def _short(value) -> str:
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if isinstance(v, float):
                v = f"{v:.4g}"
            elif isinstance(v, (dict, list)):
                v = json.dumps(v, default=str)[:160]
            parts.append(f"{k} {v}")
        return "; ".join(parts)
    return str(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("section", choices=SECTIONS + ("merge",))
    p.add_argument("--work", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds by which the section must end")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    if args.section == "merge":
        merge(args.work, args.out or args.work)
        return
    deadline = args.deadline if args.deadline is not None else time.time() + 600
    s = Section(args.work, args.section, deadline, args.dry_run)
    try:
        device = device_of(args.dry_run)
        run = {"env": section_env, "kernels": section_kernels, "scan": section_scan, "peers": section_peers,
               "train64": lambda s_, d: section_train(s_, d, 64), "train128": lambda s_, d: section_train(s_, d, 128)}
        run[args.section](s, device)
        s.data["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded for the session's report, then the exit code says it failed
        s.data["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        s.data["traceback"] = traceback.format_exc()
        s.flush()
        traceback.print_exc()
        raise SystemExit(1)
    s.flush()


if __name__ == "__main__":
    main()
