"""The trainer end to end under DeepSpeed on CPU (gloo): two-rank ZeRO 2 with kill-and-resume,
one-process ZeRO 0 against ZeRO 3, and a non-finite loss stop.

Every run is a subprocess (`deepspeed --num_gpus 2 engine/train.py` or `python engine/train.py`)
with a tiny 32 px model for a handful of steps. The first DeepSpeed start on a fresh machine
JIT-builds its shared-memory comm op (about a minute); later starts reuse the build.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
if not PYTHON.exists():
    PYTHON = Path(sys.executable)
DEEPSPEED = PYTHON.parent / "deepspeed"

TINY = {
    "deepspeed": {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                  "optimizer": {"type": "AdamW", "params": {"lr": 0.002, "weight_decay": 0.01}},
                  "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.002,
                                                               "warmup_num_steps": 3}},
                  "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0},
    "model": {"image_size": 32, "base_channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
              "attention_resolutions": [8], "num_heads": 2, "context_dim": 16, "encoder_layers": 1,
              "encoder_heads": 2, "dropout": 0.1},
    "diffusion": {"min_snr_gamma": 5.0},
    "conditioning": {"p_uncond": 0.5},
    "training": {"steps": 4, "log_every": 1, "sample_every": 0, "checkpoint_every": 2, "loader": "torch",
                 "ema_decay": 0.9},
    "logging": {"tensorboard": False, "progress": False, "sample_steps": 2, "sample_prompts": 2,
                "sample_seeds": [0], "sample_guidance": [1.0, 3.0]},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    from data_pipeline.synthetic import make_synthetic_chexpert
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_chexpert(str(root / "chexpert"), 48, seed=1, image_size=32, progress=False)
    return {"format": "synthetic", "root": str(root / "chexpert"), "image_size": 32,
            "cache_dir": str(root / "cache")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, data: dict, **sections) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["data"] = data
    cfg.update(sections)
    path.write_text(json.dumps(cfg))
    return path


def train(config: Path, *args: str, procs: int = 1, check: bool = True,
          env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    if procs == 1:
        cmd = [str(PYTHON), "engine/train.py"]
    else:
        cmd = [str(DEEPSPEED), "--num_gpus", str(procs), "--master_port", str(_free_port()), "engine/train.py"]
    result = subprocess.run(cmd + ["--config", str(config), *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def final_params(run: Path) -> dict[str, torch.Tensor]:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    return state["module"]


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs (max |diff| {(a[name] - b[name]).abs().max()})"


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_two_ranks_zero2_kill_and_resume_is_bitwise(tmp_path, dataset):
    """deepspeed launcher, 2 ranks, ZeRO 2, accumulation 2, dropout, Min-SNR, warm-up: 4 steps straight
    equal 2 steps + kill + resume + 2 steps, bit for bit (weights, EMA, export, logged losses)."""
    straight = write_config(tmp_path / "a.json", dataset, output_dir=str(tmp_path / "straight"))
    split = write_config(tmp_path / "b.json", dataset, output_dir=str(tmp_path / "split"))
    train(straight, procs=2)
    first = train(split, "--stop-at", "2", procs=2)
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert "steps 0 -> 2" in first.stdout
    second = train(split, "--resume", "auto", procs=2)
    assert "resumed from" in second.stdout and "step_00000002" in second.stdout

    a, b = tmp_path / "straight", tmp_path / "split"
    assert_bitwise(final_params(a), final_params(b))
    tag = "step_00000004"
    assert_bitwise(load_file(str(a / "checkpoints" / tag / "ema.safetensors")),
                   load_file(str(b / "checkpoints" / tag / "ema.safetensors")))
    assert_bitwise(load_file(str(a / "export" / "model.safetensors")), load_file(str(b / "export" / "model.safetensors")))
    assert losses(a) == losses(b) and sorted(losses(a)) == [1, 2, 3, 4]
    # The EMA really averages: it is not the final weights (decay 0.9 over 4 steps).
    ema = load_file(str(a / "checkpoints" / tag / "ema.safetensors"))
    params = final_params(a)
    assert any(not torch.equal(ema[n], params[n].float()) for n in ema)
    # Sample grids at the end, one panel per guidance weight, and the run's artefacts.
    assert (a / "samples" / "step_00000004.png").is_file()
    assert (a / "loss_curve.png").is_file() and (a / "vocab.json").is_file() and (a / "config.json").is_file()



def test_one_process_zero0_and_zero3_train_alike_and_export(tmp_path, dataset):
    """Plain `python engine/train.py` (a one-rank gloo group): ZeRO 0 and ZeRO 3 (parameters
    partitioned, EMA read through GatheredParameters) follow the same trajectory, and export the
    same EMA snapshot (training.export_every)."""
    from engine.model.export import load_model
    runs = {}
    for stage in (0, 3):
        cfg = write_config(tmp_path / f"z{stage}.json", dataset, output_dir=str(tmp_path / f"z{stage}"),
                           deepspeed={**TINY["deepspeed"], "zero_optimization": {"stage": stage}},
                           training={**TINY["training"], "steps": 3, "sample_every": 3, "checkpoint_every": 0,
                                     "export_every": 2})
        result = train(cfg)
        assert f"1 rank(s) on cpu, ZeRO stage {stage}" in result.stdout
        runs[stage] = tmp_path / f"z{stage}"
    rows = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 and r["images_per_s"] > 0 for r in rows)
    for step in (1, 2, 3):
        assert abs(losses(runs[0])[step] - losses(runs[3])[step]) < 1e-5
    ema0, ema3 = (load_file(str(runs[s] / "export" / "model.safetensors")) for s in (0, 3))
    for name in ema0:
        torch.testing.assert_close(ema3[name], ema0[name], rtol=1e-4, atol=1e-6, msg=name)
    assert load_model(runs[3]).metadata["step"] == 3
    # training.export_every: the EMA model of step 2 kept under exports/step_2, alike for both stages
    assert sorted(os.listdir(runs[0] / "exports")) == ["step_2"]
    snap0, snap3 = (load_file(str(runs[s] / "exports" / "step_2" / "model.safetensors")) for s in (0, 3))
    for name in snap0:
        torch.testing.assert_close(snap3[name], snap0[name], rtol=1e-4, atol=1e-6, msg=name)
    assert load_model(runs[0] / "exports" / "step_2").metadata["step"] == 2
    assert any(not torch.equal(snap0[name], ema0[name]) for name in snap0)   # step 3 trained on
    # Starting again into the same directory without --resume is refused in one line.
    again = train(tmp_path / "z0.json", check=False)
    assert again.returncode == 3 and "already holds checkpoints" in again.stderr
    assert len([ln for ln in again.stderr.splitlines() if ln.startswith("error:")]) == 1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, dataset):
    # lr 1e30: the first step is computed from sane weights, the second from ~1e30 weights (inf/nan).
    cfg = write_config(tmp_path / "nan.json", dataset, output_dir=str(tmp_path / "nan"),
                       deepspeed={**TINY["deepspeed"], "zero_optimization": {"stage": 0}, "scheduler": None,
                                  "optimizer": {"type": "AdamW", "params": {"lr": 1e30}}},
                       training={**TINY["training"], "steps": 6, "checkpoint_every": 1})
    result = train(cfg, check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    message = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(message) == 1 and "non-finite loss at step 2" in message[0]
    ckpt = tmp_path / "nan" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000001"
    assert not (ckpt / "step_00000002").exists()
    assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "step_00000001" / "ema.safetensors")).values())


def test_training_through_triton_kernels_follows_the_reference_loss_curve(tmp_path, dataset):
    """The trainer's noising and fused loss dispatched to the Triton kernels (run by Triton's CPU
    interpreter here, compiled on CUDA) against the PyTorch references: same noise from the same
    (seed, offset), so the same loss curve and weights up to float rounding."""
    runs = {}
    for mode in ("reference", "triton"):
        cfg = write_config(tmp_path / f"{mode}.json", dataset, output_dir=str(tmp_path / mode),
                           deepspeed={**TINY["deepspeed"], "zero_optimization": {"stage": 0},
                                      "gradient_accumulation_steps": 1},
                           model={**TINY["model"], "dropout": 0.0},
                           training={**TINY["training"], "steps": 4, "checkpoint_every": 0})
        result = train(cfg, env_extra={"MEMDIFF_KERNELS": mode, "TRITON_INTERPRET": "1"})
        assert f"noising/loss kernels: {'Triton' if mode == 'triton' else 'PyTorch reference'}" in result.stdout
        runs[mode] = tmp_path / mode
    ref, tri = losses(runs["reference"]), losses(runs["triton"])
    assert sorted(ref) == sorted(tri) == [1, 2, 3, 4]
    for step in ref:
        assert abs(ref[step] - tri[step]) <= 1e-4 * abs(ref[step]), (step, ref[step], tri[step])
    a, b = (load_file(str(runs[m] / "export" / "model.safetensors")) for m in ("reference", "triton"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5, msg=name)


def test_dp_sgd_under_the_launcher_two_ranks_equal_one_process(tmp_path, dataset):
    """DP-SGD through `deepspeed --num_gpus 2` against plain `python engine/train.py`: the same global
    Poisson batches, each rank clipping its own share, the noise added once after the all-reduce from
    the same seed -> the same weights (up to summation order) and the same privacy spent."""
    # Bit-level agreement across process layouts needs the noise drawn from the public seed, which voids
    # the guarantee; by default the noise is keyed by an OS secret and no two runs share it.
    dp = {"enabled": True, "clip_norm": 0.5, "noise_multiplier": 1.0, "expected_batch_size": 8, "delta": 1e-5,
          "reproducible_noise_voids_guarantee": True}
    runs = {}
    for procs in (1, 2):
        cfg = write_config(tmp_path / f"dp{procs}.json", dataset, output_dir=str(tmp_path / f"dp{procs}"),
                           deepspeed={**TINY["deepspeed"], "zero_optimization": {"stage": 0},
                                      "gradient_accumulation_steps": 1, "gradient_clipping": 0.0},
                           model={**TINY["model"], "dropout": 0.0},
                           training={**TINY["training"], "steps": 3, "checkpoint_every": 0}, dp=dp)
        result = train(cfg, procs=procs)
        assert f"{procs} rank(s) on cpu" in result.stdout
        runs[procs] = tmp_path / f"dp{procs}"
    one, two = final_params(runs[1]), final_params(runs[2])
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    rows = {p: [json.loads(line) for line in (runs[p] / "metrics.jsonl").read_text().splitlines()] for p in (1, 2)}
    eps = {p: [r[k] for r in rows[p] for k in r if k.startswith("dp/epsilon")] for p in (1, 2)}
    assert eps[1] and eps[1] == pytest.approx(eps[2])
    assert eps[1] == sorted(eps[1]) and eps[1][-1] > 0


def test_srun_style_start_forms_the_same_two_rank_job_as_the_deepspeed_launcher(tmp_path, dataset):
    """Two plain `python engine/train.py` processes with only srun's variables (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST) join one two-rank group and train exactly as
    `deepspeed --num_gpus 2` does on the same config (without the mapping each would train alone)."""
    training = {**TINY["training"], "steps": 2, "checkpoint_every": 0}
    launched = write_config(tmp_path / "ds.json", dataset, output_dir=str(tmp_path / "ds"), training=training)
    train(launched, procs=2)
    srun_cfg = write_config(tmp_path / "srun.json", dataset, output_dir=str(tmp_path / "srun"), training=training)
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                   SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="42", MASTER_PORT=port)
        procs.append(subprocess.Popen([str(PYTHON), "engine/train.py", "--config", str(srun_cfg)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    assert "2 rank(s) on cpu" in outputs[0]
    assert_bitwise(final_params(tmp_path / "ds"), final_params(tmp_path / "srun"))
    assert losses(tmp_path / "ds") == losses(tmp_path / "srun")
