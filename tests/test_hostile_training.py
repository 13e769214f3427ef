"""Training and data on hostile or careless input (issue 11): what must never happen (code from a
checkpoint runs, a user's file is deleted or overwritten, a wrong number is reported silently)
and what must happen instead (one line naming the file, row or key; a resume from the newest
intact checkpoint that continues bit for bit; epsilon as the accountant computes it for the steps
actually taken).

Each end-to-end case is a `python engine/train.py` subprocess on a 48-image synthetic set with a
tiny 32 px model (a few seconds of training; most of the time is DeepSpeed's start-up). One genuine
run (`genuine`, 4 steps, checkpoints at 2 and 4) is copied and damaged by the cases that need one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.vocab import Vocabulary
from engine.training.checkpointing import (
    MANIFEST,
    STATE,
    choose_checkpoint,
    save_checkpoint,
    verify,
)
from engine.training.config import ConfigError, config_from_dict
from engine.training.ema import EMA

sys.path.insert(0, str(Path(__file__).parent))
from test_train_deepspeed import TINY, assert_bitwise, train, write_config  # noqa: E402

ZERO0 = {**TINY["deepspeed"], "zero_optimization": {"stage": 0}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from data_pipeline.synthetic import make_synthetic_chexpert
    root = tmp_path_factory.mktemp("hostile")
    make_synthetic_chexpert(str(root / "chexpert"), 48, seed=1, image_size=32, progress=False)
    return {"format": "synthetic", "root": str(root / "chexpert"), "image_size": 32, "cache_dir": str(root / "cache")}


@pytest.fixture(scope="module")
def genuine(tmp_path_factory, data) -> Path:
    """A real 4-step run (ZeRO 0, one process): checkpoints step 2 and step 4, export of step 4."""
    where = tmp_path_factory.mktemp("genuine")
    cfg = write_config(where / "run.json", data, output_dir=str(where / "run"), deepspeed=ZERO0)
    train(cfg)
    return where / "run"


def copy_run(genuine: Path, tmp_path: Path, data: dict, **training) -> tuple[Path, Path]:
    """A copy of the genuine run and a config pointing at it (same sections; `training` overrides)."""
    run = tmp_path / "run"
    shutil.copytree(genuine, run)
    cfg = write_config(tmp_path / "run.json", data, output_dir=str(run), deepspeed=ZERO0,
                       training={**TINY["training"], **training})
    return run, cfg


def error_lines(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]


def warning_lines(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]


def rewrite_digest(folder: Path, name: str) -> None:
    """What an attacker does: make the manifest match the file they planted."""
    manifest = json.loads((folder / MANIFEST).read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / MANIFEST).write_text(json.dumps(manifest))


class PlantsMarker:
    """A pickle that, when loaded by a full unpickler, creates a file (stands in for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


# ----------------------------------------------------------------------------- code never runs

def test_crafted_pickle_in_model_states_is_refused_on_resume_and_never_runs(genuine, tmp_path, data):
    run, cfg = copy_run(genuine, tmp_path, data, steps=6)
    marker = tmp_path / "code_ran"
    folder = run / "checkpoints" / "step_00000004"
    states = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)
    states["extra"] = PlantsMarker(marker)
    torch.save(states, folder / "mp_rank_00_model_states.pt")
    rewrite_digest(folder, "mp_rank_00_model_states.pt")   # the digests do not stop a crafted folder
    assert verify(folder) is None
    result = train(cfg, "--resume", "auto", check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    assert error_lines(result) == [
        f"error: {folder / 'mp_rank_00_model_states.pt'}: refused to load, it asks for os.makedirs (only tensors "
        f"and DeepSpeed's optimizer records are read from checkpoints)"]
    assert not marker.exists()


def test_weights_only_loads_refuse_any_global_beyond_deepspeeds_records(tmp_path):
    from engine.training.weights_only import UnsafeCheckpointFile, weights_only_loads
    marker = tmp_path / "code_ran"
    torch.save({"w": torch.ones(2), "x": PlantsMarker(marker)}, tmp_path / "evil.pt")
    torch.save({"w": torch.ones(2), "betas": (0.9, 0.99)}, tmp_path / "plain.pt")
    with weights_only_loads():
        with pytest.raises(UnsafeCheckpointFile, match=r"evil.pt: refused to load, it asks for os.makedirs"):
            torch.load(tmp_path / "evil.pt", weights_only=False)   # DeepSpeed's own call, overridden
        assert torch.equal(torch.load(tmp_path / "plain.pt", weights_only=False)["w"], torch.ones(2))
    assert not marker.exists()
    assert torch.load.__module__ == "torch.serialization"   # restored after the block


# ----------------------------------------------------------------------------- damaged checkpoints

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, named", [
    (lambda f: _truncate(f / "mp_rank_00_model_states.pt"), "mp_rank_00_model_states.pt"),
    (lambda f: _truncate(f / "ema.safetensors"), "ema.safetensors"),
    (lambda f: (f / STATE).write_text('{"step": 4'), STATE),
    (lambda f: (f.parent / "latest").write_text(""), "latest"),
])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(genuine, tmp_path, capsys, damage, named):
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(genuine / "checkpoints", ckpt)
    damage(ckpt / "step_00000004")
    if named == "latest":   # nothing damaged but the pointer: the newest intact checkpoint is step 4
        assert choose_checkpoint(ckpt) == "step_00000004"
    else:
        assert choose_checkpoint(ckpt) == "step_00000002"
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: ") and named in warning[0], warning


def test_resume_past_a_truncated_checkpoint_continues_bitwise_replaces_it_and_keeps_foreign_files(
        genuine, tmp_path, data):
    """The latest checkpoint's model states are truncated: the run resumes from step 2 with one
    warning, re-trains steps 3-4 bit for bit as the genuine run did, rewrites step 4 whole, and
    pruning step 2 (keep 1) leaves the user's file there. data.cache_dir may change on resume."""
    run, cfg = copy_run(genuine, tmp_path, data, keep_checkpoints=1)
    _truncate(run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt")
    thesis = run / "checkpoints" / "step_00000002" / "thesis.tex"
    thesis.write_text("\\chapter{mine}")
    result = train(cfg, "--resume", "auto", "--set", f"data.cache_dir={tmp_path / 'elsewhere'}")
    warnings = warning_lines(result)
    assert len(warnings) == 2, result.stderr[-2000:]
    assert "step_00000004/mp_rank_00_model_states.pt" in warnings[0] and "truncated" in warnings[0]
    assert "resuming from" in warnings[0] and warnings[0].endswith("step_00000002 instead")
    assert "step_00000002: kept, it holds files memdiff did not write (thesis.tex)" in warnings[1]
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert verify(run / "checkpoints" / "step_00000004") is None
    assert_bitwise(load_file(str(run / "export" / "model.safetensors")),
                   load_file(str(genuine / "export" / "model.safetensors")))
    assert thesis.read_text() == "\\chapter{mine}"
    assert sorted(p.name for p in thesis.parent.iterdir()) == ["thesis.tex"]


def test_pruning_deletes_only_what_our_manifest_lists(tmp_path):
    from test_train_units import FakeEngine
    ema = EMA(torch.nn.Linear(2, 2), decay=0.9)
    ckpt = tmp_path / "checkpoints"
    save_checkpoint(FakeEngine(), ckpt, 1, ema, {}, keep=1, rank=0)
    (ckpt / "step_00000001" / "thesis.tex").write_text("mine")
    (ckpt / "step_00000007").mkdir()                          # not ours: no manifest
    (ckpt / "step_00000007" / "notes.txt").write_text("mine too")
    save_checkpoint(FakeEngine(), ckpt, 2, ema, {}, keep=1, rank=0)
    assert sorted(p.name for p in (ckpt / "step_00000001").iterdir()) == ["thesis.tex"]
    assert (ckpt / "step_00000007" / "notes.txt").read_text() == "mine too"
    # A damaged step folder that keeps a user's file is refilled around it, not deleted.
    (ckpt / "step_00000001" / "ema.safetensors").write_text("junk")
    save_checkpoint(FakeEngine(), ckpt, 1, ema, {}, keep=5, rank=0)
    assert verify(ckpt / "step_00000001") is None and (ckpt / "step_00000001" / "thesis.tex").is_file()


# ----------------------------------------------------------------------------- folders that are not ours

def test_a_folder_that_is_not_a_memdiff_run_is_refused_untouched(tmp_path, data):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("\\chapter{mine}")
    (out / "config.json").write_text('{"mine": true}')
    (out / "metrics.jsonl").write_text('{"step": 99}\n')
    cfg = write_config(tmp_path / "c.json", data, output_dir=str(out), deepspeed=ZERO0)
    for args in ((), ("--resume", "auto")):
        result = train(cfg, *args, check=False)
        assert result.returncode == 3
        assert error_lines(result) == [f"error: {out}: output_dir holds files that are not from a memdiff run "
                                       f"(config.json, metrics.jsonl, thesis.tex; no memdiff_run.json); train "
                                       f"into a new or empty folder"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "thesis.tex"]
    assert (out / "config.json").read_text() == '{"mine": true}'
    assert (out / "metrics.jsonl").read_text() == '{"step": 99}\n'


def test_a_data_root_that_holds_no_such_dataset_is_one_line_before_deepspeed_starts(tmp_path, data):
    """Checked before the process group (DeepSpeed's start-up lines) and the run folder; the study's
    variants train through the same loop, so tools/study_mitigations refuses it the same way."""
    empty, out = tmp_path / "not_nih", tmp_path / "run"
    empty.mkdir()
    cfg = write_config(tmp_path / "c.json", {**data, "format": "nih", "root": str(empty)}, output_dir=str(out),
                       deepspeed=ZERO0)
    result = train(cfg, check=False)
    assert result.returncode == 3                     # engine/train.py: bad input found while running
    assert result.stderr.strip().splitlines() == [
        f"error: {empty}: neither an NIH table (Data_Entry_2017.csv / Data_Entry_2017_v2020.csv) nor a CheXpert "
        f"train.csv found"]
    assert result.stdout.strip() == ""                # nor DeepSpeed's "Setting accelerator to CPU" notice
    assert not out.exists()


# ----------------------------------------------------------------------------- silent wrong results

def test_a_diverging_run_stops_keeping_the_last_good_checkpoint_and_export(tmp_path, data):
    """lr 50 without clipping: loss 0.96 at step 1, ~6e4 at step 2 (finite, so the old guard let it
    train on and export). Stopped at step 2; step 1 stays the checkpoint and the export."""
    cfg = write_config(tmp_path / "c.json", data, output_dir=str(tmp_path / "run"),
                       deepspeed={**ZERO0, "scheduler": None, "gradient_clipping": 0.0,
                                  "optimizer": {"type": "AdamW", "params": {"lr": 50.0}}},
                       training={**TINY["training"], "steps": 8, "checkpoint_every": 1})
    result = train(cfg, check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    [line] = error_lines(result)
    assert line.startswith("error: training diverged: loss ") and " at step 2 is " in line
    assert "(training.divergence_factor 100)" in line and line.endswith(
        f"last good checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step_00000001'} (its model is in "
        f"{tmp_path / 'run' / 'export'})")
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000001" and not (ckpt / "step_00000002").exists()
    exported = json.loads((tmp_path / "run" / "export" / "model_config.json").read_text())
    assert exported["metadata"]["step"] == 1


def test_a_non_finite_gradient_norm_or_weights_stop_the_run():
    """The decision itself (the end-to-end path is the test above): an infinite gradient norm with a
    finite loss, or non-finite EMA weights, stop the run; a loss within the factor does not."""
    from types import SimpleNamespace

    from engine.training.trainer import Diverged, TrainLoop

    def loop(norm):
        return SimpleNamespace(step_type=SimpleNamespace(watched_norm=lambda: norm), recent_losses=[1.0, 1.2],
                               cfg=SimpleNamespace(training=SimpleNamespace(divergence_factor=100.0)),
                               _last_good=lambda: "ckpt")
    with pytest.raises(Diverged, match=r"non-finite gradient norm \(inf\) at step 7; stopped without saving it"):
        TrainLoop._check_divergence(loop(math.inf), 7, 1.0, False)
    with pytest.raises(Diverged, match="non-finite weights at step 7"):
        TrainLoop._check_divergence(loop(1.0), 7, 1.0, True)
    with pytest.raises(Diverged, match=r"loss 120 at step 7 is 109x its running level 1.1"):
        TrainLoop._check_divergence(loop(None), 7, 120.0, False)
    ok = loop(5.0)
    TrainLoop._check_divergence(ok, 7, 50.0, False)
    assert ok.recent_losses == [1.0, 1.2, 50.0]


@pytest.mark.parametrize("section, message", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
      "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3}}},
     "x.json: deepspeed.scheduler.params.warmup_max_lr: 0.001 contradicts deepspeed.optimizer.params.lr = 0.0001"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": math.inf}}},
     "x.json: deepspeed.optimizer.params.lr: expected a finite number, got Infinity"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": math.nan}}},
     "x.json: deepspeed.scheduler.params.warmup_num_steps: expected a finite number, got NaN"),
])
def test_one_learning_rate_and_only_finite_numbers(section, message):
    raw = {"data": {"root": "/x", "image_size": 32}, "model": {"image_size": 32}, "deepspeed": section}
    with pytest.raises(ConfigError) as info:
        config_from_dict(json.loads(json.dumps(raw)), "x.json")   # through JSON: Infinity and NaN as parsed
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    cfg = config_from_dict({**raw, "deepspeed": {"scheduler": {"type": "WarmupDecayLR",
                                                               "params": {"total_num_steps": 9}}}})
    # DeepSpeed's default peak (0.001) would silently replace the optimizer's lr: ours is filled in
    assert cfg.deepspeed.to_deepspeed()["scheduler"]["params"]["warmup_max_lr"] == cfg.deepspeed.optimizer.params.lr


# ----------------------------------------------------------------------------- data

NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"


def nih_root(tmp_path: Path, rows: list[str]) -> Path:
    from PIL import Image
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    for row in rows:
        Image.new("L", (40, 40), 128).save(root / "images" / row.split(",")[0])
    (root / "Data_Entry_2017.csv").write_text("\n".join([NIH_HEADER, *rows]) + "\n")
    return root


def test_nih_blank_age_is_unknown_and_unusable_tables_are_one_line_errors(tmp_path):
    from data_pipeline.nih import read_nih
    root = nih_root(tmp_path / "a", ["a.png,Hernia,0,1,,F,PA", "b.png,No Finding,0,2,58,M,AP"])
    records = read_nih(str(root)).records
    assert [r.age for r in records] == [None, 58]
    root = nih_root(tmp_path / "b", ["a.png,Dragon,0,1,40,F,PA", "b.png,Unicorn|Hernia,0,2,58,M,AP"])
    with pytest.raises(ValueError) as info:
        read_nih(str(root))
    assert str(info.value) == (f"{root / 'Data_Entry_2017.csv'}: none of its 2 rows is usable (first: "
                               f"{root / 'Data_Entry_2017.csv'}:2: a.png: unknown finding 'Dragon')")
    root = nih_root(tmp_path / "c", [])
    with pytest.raises(ValueError, match=r"Data_Entry_2017.csv: no data rows \(only a header\)$"):
        read_nih(str(root))


def test_vocabulary_file_with_a_token_outside_the_pattern_is_refused(tmp_path):
    vocab = Vocabulary.default(["plant000"]).to_dict()
    for bad in ("plant 000", "<img src=x>", "tok\n", "x" * 65):
        path = tmp_path / "vocab.json"
        path.write_text(json.dumps({**vocab, "tokens": vocab["tokens"][:-1] + [bad]}))
        with pytest.raises(ValueError, match=r"vocab.json: vocabulary: extra token .* must match"):
            Vocabulary.load(str(path))
    path.write_text(json.dumps({**vocab, "tokens": ["<pad>", "<null>", "<b>lateral</b>"] + vocab["tokens"][3:]}))
    with pytest.raises(ValueError, match=r"vocab.json: vocabulary id 2 is '<b>lateral</b>'"):
        Vocabulary.load(str(path))


def _all_corrupt(tmp_path: Path, data: dict) -> tuple[dict, str]:
    root = tmp_path / "corrupt"
    shutil.copytree(data["root"], root)
    for jpg in root.rglob("*.jpg"):
        jpg.write_bytes(b"not a jpeg")
    return {**data, "root": str(root), "cache_dir": str(tmp_path / "cache")}, f"error: {root}: none of its "


def _non_utf8(tmp_path: Path, data: dict) -> tuple[dict, str]:
    root = tmp_path / "latin1"
    shutil.copytree(data["root"], root)
    csv = root / "train.csv"
    csv.write_bytes(csv.read_bytes().replace(b"Female", b"F\xe9male", 1))
    return {**data, "root": str(root)}, f"error: {csv}: not UTF-8 text (byte 0xe9 at row "


def _missing_column(tmp_path: Path, data: dict) -> tuple[dict, str]:
    root = tmp_path / "nocol"
    shutil.copytree(data["root"], root)
    csv = root / "train.csv"
    csv.write_text(csv.read_text().replace("Frontal/Lateral", "View", 1))
    return {**data, "root": str(root)}, f"error: {csv}: missing required columns: Frontal/Lateral"


def _escaping_path(tmp_path: Path, data: dict) -> tuple[dict, str]:
    root = tmp_path / "escape"
    shutil.copytree(data["root"], root)
    csv = root / "train.csv"
    lines = csv.read_text().splitlines()
    lines[1] = "../../../etc/passwd" + lines[1][lines[1].index(","):]
    csv.write_text("\n".join(lines) + "\n")
    return {**data, "root": str(root)}, (f"error: {csv}:2: refused image path '../../../etc/passwd': it resolves "
                                         f"outside the dataset root {root}")


def _synthetic_into_a_full_folder(tmp_path: Path, data: dict) -> tuple[dict, str]:
    root = tmp_path / "documents"
    root.mkdir()
    (root / "letter.txt").write_text("mine")
    return {**data, "root": str(root)}, f"error: data.root: {root} holds files but no train.csv"


def _huge_model(tmp_path: Path, data: dict) -> tuple[dict, str]:
    return data, "error: model: "


@pytest.mark.parametrize("make", [_all_corrupt, _non_utf8, _missing_column, _escaping_path,
                                  _synthetic_into_a_full_folder, _huge_model])
def test_bad_data_and_impossible_models_are_one_line_errors_before_training(tmp_path, data, make):
    data_section, expected = make(tmp_path, data)
    model = {**TINY["model"], "base_channels": 8192, "channel_mult": [1, 2, 4]} if make is _huge_model else TINY["model"]
    cfg = write_config(tmp_path / "c.json", data_section, output_dir=str(tmp_path / "run"), deepspeed=ZERO0,
                       model=model)
    result = train(cfg, check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    [line] = error_lines(result)
    assert line.startswith(expected), line
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "checkpoints").exists()
    if make is _synthetic_into_a_full_folder:
        assert sorted(p.name for p in Path(data_section["root"]).iterdir()) == ["letter.txt"]
    if make is _huge_model:
        assert "GiB per rank" in line and "model.base_channels" in line
        assert not (tmp_path / "run").exists()   # refused before the output folder is touched


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path, data):
    """A read-only parent (as root, which writes anyway, a parent that is a file: the same check)
    fails on the run marker, the first write, before the data is read or cached."""
    parent = tmp_path / "parent"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        parent.write_text("a file")
        expected = f"error: {parent / 'run'}: Not a directory"
    else:
        parent.mkdir(mode=0o555)
        expected = f"error: {parent / 'run'}: Permission denied"
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "c.json", {**data, "cache_dir": str(cache)}, output_dir=str(parent / "run"),
                       deepspeed=ZERO0)
    try:
        result = train(cfg, check=False)
    finally:
        parent.chmod(0o755)
    assert result.returncode == 3
    assert error_lines(result) == [expected]
    assert not cache.exists()   # nothing was read or cached


# ----------------------------------------------------------------------------- the privacy guarantee

def test_dp_resume_with_fewer_steps_reports_the_accountants_epsilon_for_the_steps_taken(tmp_path, data):
    """sigma is solved for 6 planned steps; the run stops at 2 and is resumed with training.steps 3.
    The resumed run keeps the original sigma and history: privacy.json's epsilon is the accountant's
    figure for 3 steps at that sigma (re-solving for 3 steps would have charged a smaller sigma to
    all of them). With a planted image of 3 copies (4 rows), the group guarantee is stated."""
    from engine.training.privacy import epsilon_for, group_guarantee, solve_noise_multiplier
    dp = {"enabled": True, "clip_norm": 1.0, "target_epsilon": 8.0, "expected_batch_size": 8, "delta": 1e-5,
          "accountant": "rdp"}
    data_section = {**data, "planted": {"k": 1, "copies": 3}}
    cfg = write_config(tmp_path / "dp.json", data_section, output_dir=str(tmp_path / "dp"), dp=dp,
                       deepspeed={**ZERO0, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0},
                       training={**TINY["training"], "steps": 6})
    first = train(cfg, "--stop-at", "2")
    assert "noise keyed by a secret from the OS" in first.stdout
    second = train(cfg, "--resume", "auto", "--set", "training.steps=3")
    assert "kept from the checkpoint" in second.stdout
    privacy = json.loads((tmp_path / "dp" / "privacy.json").read_text())
    n_train = len(json.loads((tmp_path / "dp" / "splits.json").read_text())["splits"]["train"])
    q = 8 / n_train
    sigma = solve_noise_multiplier(8.0, q, 6, 1e-5, "rdp")
    assert privacy["noise_multiplier"] == pytest.approx(sigma, rel=1e-12)
    assert privacy["steps"] == 3 and privacy["history"] == [[pytest.approx(sigma), pytest.approx(q), 3]]
    assert privacy["epsilon"] == pytest.approx(epsilon_for(sigma, q, 3, 1e-5, "rdp"), rel=1e-9)
    assert privacy["epsilon"] < 8.0
    assert privacy["guarantee_void"] is False and "operating system" in privacy["noise_seed"]
    group = privacy["group_privacy"]
    assert group["largest_image_group"] == 4   # the planted image: its original row + 3 copies
    row = next(r for r in group["by_group_size"] if r["k"] == 4)
    assert (row["epsilon"], row["delta"]) == pytest.approx(group_guarantee(privacy["epsilon"], 1e-5, 4))
    assert row["epsilon"] == pytest.approx(4 * privacy["epsilon"])
    assert row["delta"] == pytest.approx(min(1.0, 4 * math.exp(3 * privacy["epsilon"]) * 1e-5))
    exported = json.loads((tmp_path / "dp" / "export" / "model_config.json").read_text())
    assert exported["metadata"]["privacy"]["epsilon"] == pytest.approx(privacy["epsilon"])
    assert exported["metadata"]["privacy"]["guarantee_void"] is False


def test_dp_checkpoint_without_accountant_state_cannot_be_continued(tmp_path):
    from types import SimpleNamespace

    from engine.training.steps import DPStep
    cfg = config_from_dict({"data": {"root": "/x", "image_size": 32}, "model": {"image_size": 32},
                            "deepspeed": {"zero_optimization": {"stage": 0}, "gradient_clipping": 0.0},
                            "dp": {"enabled": True, "noise_multiplier": 1.0, "expected_batch_size": 4}})
    split = SimpleNamespace(images=torch.zeros(10, 32, 32, dtype=torch.uint8), tokens=torch.zeros(10, 4),
                            records=[])
    with pytest.raises(ValueError, match="the checkpoint holds no privacy accountant state"):
        DPStep(SimpleNamespace(), split, None, cfg, rank=0, world=1, start_step=5, device=torch.device("cpu"))
    saved = {"noise_multiplier": 1.0, "sample_rate": 0.4, "delta": 1e-5, "accountant": "prv", "history": [[1.0, 0.4, 4]]}
    with pytest.raises(ValueError, match=r"does not match this run \(q 0.4, step 5\)"):
        DPStep(SimpleNamespace(), split, None, cfg, rank=0, world=1, start_step=5, device=torch.device("cpu"),
               saved_privacy=saved)
