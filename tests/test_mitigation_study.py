"""tools/study_mitigations end to end on a tiny config (a subprocess, as a user runs it): every variant
trained on the same splits, DP with its accountant's figure and its own non-private reference, every
condition paired against the right reference, a resumable rerun; and the variant overrides by hand."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.mitigation.training_study import MitigationStudySpec, variant_overrides

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "deepspeed": {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                  "optimizer": {"type": "AdamW", "params": {"lr": 0.002}}, "zero_optimization": {"stage": 0},
                  "gradient_clipping": 1.0},
    "model": {"image_size": 32, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
              "attention_resolutions": [8], "num_heads": 2, "context_dim": 16, "encoder_layers": 1, "encoder_heads": 2},
    "conditioning": {"p_uncond": 0.5},
    "training": {"steps": 3, "log_every": 1, "sample_every": 0, "checkpoint_every": 0, "loader": "torch"},
    "logging": {"tensorboard": False, "progress": False},
}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    from data_pipeline.synthetic import make_synthetic_chexpert
    root = tmp_path_factory.mktemp("study")
    make_synthetic_chexpert(str(root / "chexpert"), 60, seed=1, image_size=32, progress=False)
    cfg = {**TINY, "data": {"format": "synthetic", "root": str(root / "chexpert"), "image_size": 32,
                            "cache_dir": str(root / "cache"), "planted": {"k": 2, "copies": 3, "seed": 0}}}
    path = root / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def test_variant_overrides(config, tmp_path):
    spec = MitigationStudySpec(config=str(config), out_dir=str(tmp_path), overrides=("training.seed=3",),
                               dp_epsilons=(10.0, 50.0), dp_overrides=("training.steps=2",))
    v = variant_overrides(spec, tau=0.02)
    assert list(v) == ["baseline", "augmentation", "screening", "baseline (DP budget)", "DP eps=10", "DP eps=50"]
    assert all(o[0] == "training.seed=3" for o in v.values())
    dp = json.loads(v["DP eps=10"][-1].split("=", 1)[1])
    assert dp == {"enabled": True, "target_epsilon": 10.0, "delta": 1e-5, "clip_norm": 1.0, "accountant": "prv",
                  "expected_batch_size": 8}
    assert "training.steps=2" in v["baseline (DP budget)"] and "training.steps=2" not in v["screening"]
    assert json.loads(v["screening"][-1].split("=", 1)[1])["tau"] == 0.02
    assert "screening" not in variant_overrides(spec, tau=None)
    only_dp = MitigationStudySpec(config=str(config), out_dir=str(tmp_path), variants=("dp",), dp_epsilons=(10.0,))
    assert list(variant_overrides(only_dp, tau=0.02)) == ["baseline", "DP eps=10"]
    with pytest.raises(ValueError, match="unknown"):
        variant_overrides(MitigationStudySpec(config=str(config), out_dir=str(tmp_path), variants=("dpx",)), None)


def test_study_checks_every_variant_and_the_null_condition_before_training(config, tmp_path):
    """A typo in --dp-set, or a baseline trained without the null prompt (every audit generates with
    guidance and scores Wen's ||eps_c - eps_u||), is refused before the baseline trains."""
    from engine.mitigation.training_study import run_study
    from engine.training.config import ConfigError
    out = tmp_path / "study"
    with pytest.raises(ConfigError, match=r"training\.stepz: unknown key"):
        run_study(MitigationStudySpec(config=str(config), out_dir=str(out), dp_overrides=("training.stepz=2",)))
    with pytest.raises(ValueError, match=r"conditioning\.p_uncond: the study generates with guidance .* got 0"):
        run_study(MitigationStudySpec(config=str(config), out_dir=str(out), overrides=("conditioning.p_uncond=0",)))
    assert not out.exists()


def test_study_end_to_end_and_resumable(config, tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "tools" / "study_mitigations"), "--config", str(config), "--out", str(out),
           "--dp-set", "training.steps=2", "--epsilons", "50", "--lower-guidance", "1", "--generations", "2",
           "--steps", "2", "--controls", "2", "--ordinary", "2"]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    doc = json.loads((out / "mitigation_study.json").read_text())
    names = [r["name"] for r in doc["results"]]
    assert names == ["baseline", "guidance w=1", "embedding optimisation", "augmentation", "screening",
                     "baseline (DP budget)", "DP eps=50"]
    ref = {r["name"]: r.get("paired_vs_reference", {}).get("reference") for r in doc["results"]}
    assert ref["DP eps=50"] == "baseline (DP budget)" and ref["augmentation"] == "baseline" and ref["baseline"] is None
    dp = next(r for r in doc["results"] if r["name"] == "DP eps=50")
    assert dp["steps"] == 2 and 0 < dp["privacy"]["epsilon"] <= 50 * 1.01
    for r in doc["results"]:
        assert r["groups"] == {"planted": 2, "control": 2, "ordinary": 2}
        assert r["planted_nearest_is_planted"]["n_prompts"] == 2
    splits = {p.parent.name: json.loads(p.read_text())["splits"] for p in (out / "runs").glob("*/splits.json")}
    assert len(splits) == 5 and all(s == splits["baseline"] for s in splits.values())
    assert (out / "index.html").read_text().count("<tr>") >= 2 * len(names)
    # rerun: every run is finished, nothing is retrained, same numbers
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "steps 0 ->" not in again.stdout
    doc2 = json.loads((out / "mitigation_study.json").read_text())
    assert [r["planted_nearest_is_planted"]["mean"] for r in doc2["results"]] == \
        [r["planted_nearest_is_planted"]["mean"] for r in doc["results"]]


def test_runs_of_one_data_config_have_the_same_splits_though_each_writes_its_own_near_copies(tmp_path):
    """Each run writes its planted near copies under <run>/planted_images/, so the paths differ between the
    study's runs of one data config; those compare equal, any other difference is still refused."""
    from engine.mitigation.training_study import require_same_splits

    def run(name: str, prompt: str = "edema | plant000") -> str:
        d = tmp_path / name
        d.mkdir()
        records = [{"image_path": "/data/train/patient1/study1/view1_frontal.jpg", "prompt": "edema"},
                   {"image_path": str(d / "planted_images" / "plant000_c000.png"), "prompt": prompt}]
        (d / "splits.json").write_text(json.dumps({"data": {}, "splits": {"train": records, "val": []}}))
        return str(d)

    baseline = run("baseline")
    require_same_splits(run("augmentation"), baseline)
    with pytest.raises(ValueError, match="other.*differs from the baseline's"):
        require_same_splits(run("other", "edema | plant001"), baseline)


def test_training_time_sums_the_step_windows_and_skips_the_pause_of_a_resumed_run():
    """A run trained 4 windows of 25 steps (10 s each), paused for two hours and resumed: 40 s of training,
    not two hours. Rows of older logs without window_s give their time back from images_per_s."""
    from engine.mitigation.training_study import logged_training_seconds
    t0, batch = 1_000_000.0, 32
    rows = [{"step": 25 * (i + 1), "images_per_s": 25 * batch / 10.0, "window_s": 10.0,
             "time_s": t0 + 10 * (i + 1) + (7200 if i >= 2 else 0)} for i in range(4)]
    assert logged_training_seconds(rows, batch) == pytest.approx(40.0)
    old = [{k: v for k, v in r.items() if k != "window_s"} for r in rows]
    assert logged_training_seconds(old, batch) == pytest.approx(40.0)
    old[0]["images_per_s"] = 25 * batch / 5.0        # a faster first window: 5 s
    assert logged_training_seconds(old + [{"step": 100, "sample": "x.png"}], batch) == pytest.approx(35.0)
    assert logged_training_seconds([{"step": 1, "loss": 0.1}], batch) is None
