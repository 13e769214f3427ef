"""Training config validation: every shipped config loads, and every kind of mistake is reported
in one line naming the file and the key before any work starts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.training.config import ConfigError, apply_overrides, config_from_dict, load_config, resolved_json

REPO = Path(__file__).resolve().parents[1]
DATA = {"format": "synthetic", "root": "/nonexistent/synthetic", "image_size": 32}
MODEL = {"image_size": 32, "base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [16]}


def base(**sections) -> dict:
    return {"data": dict(DATA), "model": dict(MODEL), **sections}


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.json")))
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.model.image_size == cfg.data.image_size
    # The resolved config round-trips through the validator unchanged.
    assert resolved_json(config_from_dict(json.loads(resolved_json(cfg)))) == resolved_json(cfg)


def test_cfg_and_nocfg_differ_only_in_guidance_training():
    cfg, nocfg = (json.loads((REPO / "configs" / n).read_text()) for n in ("cfg.json", "nocfg.json"))
    assert cfg["conditioning"]["p_uncond"] == 0.5 and nocfg["conditioning"]["p_uncond"] == 0.0
    cfg.pop("conditioning"), nocfg.pop("conditioning"), cfg.pop("output_dir"), nocfg.pop("output_dir")
    assert cfg == nocfg


@pytest.mark.parametrize("raw, message", [
    (base(training={"steps": -3}), "x.json: training.steps: expected int > 0, got -3"),
    (base(training={"steps": "10"}), 'x.json: training.steps: expected int, got "10"'),
    (base(training={"stepz": 10}), "x.json: training.stepz: unknown key (expected one of: steps,"),
    (base(trainin={"steps": 10}), "x.json: trainin: unknown key (expected one of: output_dir,"),
    (base(conditioning={"p_uncond": 1.5}), "x.json: conditioning.p_uncond: expected float in [0, 1], got 1.5"),
    (base(training={"ema_decay": 1.0}), "x.json: training.ema_decay: expected float in [0, 1), got 1.0"),
    (base(deepspeed={"zero_optimization": {"stage": 4}}),
     "x.json: deepspeed.zero_optimization.stage: expected int in 0..3, got 4"),
    (base(deepspeed={"zero_optimization": {"stage": 2, "overlap_comms": True}}),
     "x.json: deepspeed.zero_optimization.overlap_comms: Extra inputs are not permitted"),
    (base(deepspeed={"optimizer": {"type": "SGD"}}), 'x.json: deepspeed.optimizer.type: expected one of "AdamW", got "SGD"'),
    (base(deepspeed={"optimizer": {"params": {"lr": 0}}}), "x.json: deepspeed.optimizer.params.lr: expected float > 0, got 0"),
    (base(deepspeed={"optimizer": {"params": {"betas": [0.9]}}}),
     "x.json: deepspeed.optimizer.params.betas: expected 2 values, got 1"),
    (base(deepspeed={"bf16": {"enabled": "yes"}}), 'x.json: deepspeed.bf16.enabled: expected bool, got "yes"'),
    (base(compile={"enabled": 1}), "x.json: compile.enabled: expected bool or null, got 1"),
    (base(logging={"sample_seeds": []}), "x.json: logging.sample_seeds: expected a non-empty list of ints >= 0, got []"),
    (base(model={**MODEL, "channel_mult": [1, "2"]}), 'x.json: model.channel_mult[1]: expected int, got "2"'),
    (base(model={**MODEL, "image_size": 4}), "x.json: model.image_size: expected int in [8, 4096], got 4"),
    (base(model={**MODEL, "widht": 3}), "x.json: model.widht: unknown key"),
    (base(diffusion={"schedule": "quadratic"}), "x.json: diffusion.schedule: expected one of"),
    (base(diffusion={"min_snr_gamma": -1}), "x.json: diffusion.min_snr_gamma: expected float > 0 or null, got -1"),
    (base(augment={"rotation_p": 2}), "x.json: augment.rotation_p: expected float in [0, 1], got 2"),
    ({**base(), "data": {**DATA, "image_size": 64}}, "x.json: model.image_size: expected data.image_size (64), got 32"),
    ({**base(), "data": {**DATA, "planted": {"k": 0, "copies": 3}}}, "x.json: data.planted.k: expected int >= 1, got 0"),
    ({**base(), "data": {k: v for k, v in DATA.items() if k != "root"}}, "x.json: data.root: missing (expected a directory path)"),
    ({"model": dict(MODEL)}, "x.json: data.root: missing (expected a directory path)"),
    ({**base(), "data": {**DATA, "views": []}}, "x.json: data.views: expected a non-empty list of frontal/lateral, got []"),
    ({**base(), "data": {**DATA, "views": ["side"]}}, 'x.json: data.views[0]: expected one of "frontal", "lateral", got "side"'),
    (base(model={**MODEL, "image_size": 33}), "x.json: model.image_size: expected a multiple of 2 (2 channel_mult levels), got 33"),
    (base(dp={"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 2.0, "sample_rate": 0.1}),
     "x.json: dp.noise_multiplier: give exactly one of noise_multiplier and target_epsilon"),
])
def test_errors_are_one_line_naming_the_key(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, "x.json")
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_overrides_set_single_values_as_json_or_string(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(base()))
    cfg = load_config(path, ["training.steps=7", "data.root=/data/CheXpert-v1.0-small", "compile.enabled=null",
                             "deepspeed.zero_optimization.stage=3", "logging.sample_guidance=[1, 2.5]"])
    assert cfg.training.steps == 7 and cfg.data.root == "/data/CheXpert-v1.0-small"
    assert cfg.compile.enabled is None and cfg.deepspeed.zero_optimization.stage == 3
    assert cfg.logging.sample_guidance == (1.0, 2.5)
    assert cfg.deepspeed.to_deepspeed()["zero_optimization"] == {"stage": 3}
    with pytest.raises(ConfigError, match=r"c.json: training.steps: expected int > 0, got 0$"):
        load_config(path, ["training.steps=0"])
    with pytest.raises(ConfigError, match=r"--set training: expected key.sub=value"):
        load_config(path, ["training"])
    with pytest.raises(ConfigError, match=r"--set training.steps.x=1: training.steps is not an object"):
        apply_overrides({"training": {"steps": 3}}, ["training.steps.x=1"])


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"missing.json: cannot read"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"training": {"steps": 3,}}')
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON \(line 1, column 26"):
        load_config(bad)


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(base(training={"steps": -3})))
    result = subprocess.run([sys.executable, "engine/train.py", "--config", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {path}: training.steps: expected int > 0, got -3"]
