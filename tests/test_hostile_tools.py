"""The tools on hostile or careless input (issue 11): every refusal is ONE line naming the file, row,
key or option, exit status 2, no traceback, nothing written into the output folder and its files
untouched; no non-finite number is ever reported as a result; nothing read from a file reaches a
page unescaped.

The run is a tiny exported random model (32 px, ~40k parameters) with a splits.json of 14 PNGs, a
planted manifest, a copy detector and a label classifier (random networks, saved as the trainers
save them). Each tool runs once as a user runs it (its own process: `every tool ... one line`);
the cases that only exercise the same boundary with other input run the tool's click command
in-process through the same `engine.cli.run`, which is far cheaper on a shared 2-core machine.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from data_pipeline.vocab import Vocabulary
from engine.audit.copy_detection import CopyDetector, CopyDetectorConfig, build_embedder, load_copy_detector
from engine.audit.label_classifier import (
    LabelClassifier,
    LabelClassifierConfig,
    build_classifier,
    load_label_classifier,
)
from engine.cli import one_line, run
from engine.diffusion.schedule import DiffusionConfig
from engine.model.export import export_model, load_model
from engine.model.unet import ConditionalUNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.name for p in (REPO / "tools").iterdir() if p.is_file() and not p.name.startswith(("_", ".")))
PROMPTS = ["frontal AP chest x-ray, female, 60s: edema | tok0000", "frontal AP chest x-ray, female, 60s: edema | tok0001",
           "frontal PA chest x-ray, male, 30s"]
XSS = "<img src=x onerror=alert({})>"   # a marker per field: `<img src=x` must never appear in a page


def _blobs(n: int, size: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=size, mode="bilinear")
    return (x[:, 0] * 255).round().to(torch.uint8).numpy()


def tiny_unet(vocab: Vocabulary) -> ConditionalUNet:
    torch.manual_seed(0)
    model = ConditionalUNet(UNetConfig(image_size=32, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                       attention_resolutions=(16,), num_heads=2, vocab_size=len(vocab),
                                       max_tokens=vocab.max_len,
                                       context_dim=8, encoder_layers=1, encoder_heads=2))
    with torch.no_grad():   # non-zero output layers: the random model's predictions depend on the prompt
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=1.0 / math.sqrt(p[0].numel()))
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_tools") / "run"
    (root / "images").mkdir(parents=True)
    paths = []
    for i, im in enumerate(_blobs(14, 32, 2)):
        paths.append(str(root / "images" / f"{i}.png"))
        Image.fromarray(im).save(paths[-1])
    train_prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] + [f"frontal PA chest x-ray, male, {a}" for a in
                                                       ("20s", "30s", "40s", "50s", "60s", "70s")]
    splits = {"data": {"image_size": 32, "cache_dir": str(root / "cache")},
              "splits": {"train": [{"image_path": p, "prompt": q} for p, q in zip([paths[0]] * 3 + paths[1:8],
                                                                                    train_prompts)],
                         "val": [{"image_path": p, "prompt": ""} for p in paths[8:14]], "test": []}}
    (root / "splits.json").write_text(json.dumps(splits))
    (root / "planted_manifest.json").write_text(json.dumps(
        {"planted": [{"token": "tok0000", "image_path": paths[0], "copies": 3}],
         "controls": [{"token": "tok0001", "image_paths": [paths[1]]}], "k": 1, "copies": 3, "seed": 0}))
    vocab = Vocabulary.default(["tok0000", "tok0001", "tok0002"], max_len=8)
    # recorded as the trainer records it (an export without it draws a note on stderr from every null-branch use)
    export_model(root / "export", tiny_unet(vocab), DiffusionConfig(num_timesteps=100), vocab,
                 metadata={"p_uncond": 0.1})
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    torch.manual_seed(1)
    CopyDetector(build_embedder("tiny", 16), CopyDetectorConfig(backbone="tiny", embed_dim=16), 0.5).save(
        str(root / "copy_detector"))
    LabelClassifier(build_classifier(1, 8), ["edema"], LabelClassifierConfig(width=8, min_count=2)).save(
        str(root / "label_classifier"))
    return root


def copy_run(run_dir: Path, where: Path) -> Path:
    shutil.copytree(run_dir, where, ignore=shutil.ignore_patterns("cache"))
    return where


def user_folder(tmp_path: Path, name: str = "out") -> Path:
    """An output folder that already holds a file of the user's: it must stay exactly as it was."""
    out = tmp_path / name
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return out


def assert_untouched(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"


def unwritable_parent(tmp_path: Path) -> tuple[Path, str]:
    """A place no file can be made in, and the error's tail. As root (who writes into read-only folders)
    the parent is a file, which is refused by the same check."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        parent = tmp_path / "a_file"
        parent.write_text("mine")
        return parent, f"{parent} is not a folder"
    parent = tmp_path / "read_only"
    parent.mkdir(mode=0o555)
    return parent, f"cannot write into {parent}"


# ----------------------------------------------------------------------------- running tools

def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    """A tool as a user runs it: its own process, this checkout's packages."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)


def tool_command(name: str):
    """The click command of tools/<name>, loaded without running it (its _venv re-exec is skipped)."""
    sys.modules.setdefault("_venv", types.SimpleNamespace(ensure_venv=lambda: None))
    loader = importlib.machinery.SourceFileLoader(f"memdiff_tool_{name}", str(REPO / "tools" / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return getattr(module, "cli", None) or module.main


def in_process(capsys, name: str, *args: str) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of tools/<name> run through engine.cli.run in this process."""
    command = tool_command(name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(command, list(args))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def refusal(result: subprocess.CompletedProcess) -> str:
    """The one error line of a refused run (progress bars and warnings may surround it, a traceback not)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Usage:" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# ----------------------------------------------------------------------------- every tool, as a user runs it

def _per_tool_cases(run: Path, tmp: Path) -> dict:
    """tool -> (arguments, expected error line, folder that must stay untouched or None)."""
    out = user_folder(tmp)
    parent, tail = unwritable_parent(tmp)
    unplanted = copy_run(run, tmp / "unplanted")          # a run trained without planted duplicates
    (unplanted / "planted_manifest.json").unlink()
    (tmp / "not_a_detector").mkdir()
    config = REPO / "configs" / "demo_cpu.json"
    return {
        "benchmark_detectors": (["--checkpoint", str(unplanted), "--out", str(out), "--generations", "2"],
                                f"error: {unplanted}: no planted_manifest.json with planted duplicates; the benchmark "
                                f"needs planted ground truth", out),
        "benchmark_similarity": (["--checkpoint", str(unplanted), "--out", str(out), "--no-clip"],
                                 f"error: {unplanted}: no planted_manifest.json (the benchmark needs planted "
                                 f"duplicates: train with data.planted)", out),
        "study_mitigations": (["--config", str(config), "--out", str(out), "--dp-set", "training.stepz=300"],
                              f"error: {config}: training.stepz: unknown key (expected one of: ", out),
        "train_deepssim": (["--checkpoint", str(run), "--out", str(out), "--backbone", "tiny", "--copy-detector",
                            str(tmp / "not_a_detector")],
                           f"error: {tmp / 'not_a_detector' / 'copy_detector.json'}: missing (train one with "
                           f"tools/train_copy_detector)", out),
        "scan_memorization": (["--checkpoint", str(run), "--prompts", str(run / "prompts.txt"), "--out",
                               str(out / "s.parquet"), "--guidance", "nan"],
                              "error: Invalid value for '--guidance': 'nan' is not a finite number", out),
        "sample": (["--checkpoint", str(run), "--prompt", "", "--out", str(out), "--device", "cuda:99"],
                   "error: Invalid value for '--device': 'cuda:99': ", out),
        "validate_memorization": (["--checkpoint", str(run), "--scores", str(run / "prompts.txt"), "--out",
                                   str(parent / "report")],
                                  f"error: Invalid value for '--out': {parent / 'report'}: {tail}", None),
        "mitigate": (["guidance", "--checkpoint", str(run), "--weights", "1,nan", "--out", str(out)],
                     "error: Invalid value for '--weights': 'nan' is not a finite number", out),
        "token_significance": (["--checkpoint", str(run), "--prompts", str(run / "prompts.txt"), "--out",
                                str(out / "t.json"), "--guidance", "-5"],
                               "error: Invalid value for '--guidance': -5.0 is not in the range x>=0.", out),
        "screening_threshold": (["--checkpoint", str(run), "--quantile", "inf", "--out", str(out / "tau.json")],
                                "error: Invalid value for '--quantile': 'inf' is not a finite number", out),
        "compare_runs": ([str(run), str(run), "--out", str(out), "--guidance", "-inf"],
                         "error: Invalid value for '--guidance' / '-w': '-inf' is not a finite number", out),
        "train_copy_detector": (["--checkpoint", str(run), "--out", str(out), "--temperature", "0"],
                                "error: Invalid value for '--temperature': 0.0 is not in the range x>0.", out),
        "train_label_classifier": (["--checkpoint", str(run), "--out", str(out), "--lr", "NaN"],
                                   "error: Invalid value for '--lr': 'NaN' is not a finite number", out),
        "make_synthetic_chexpert": (["--out", str(parent / "data"), "--images", "4"],
                                    f"error: Invalid value for '--out': {parent / 'data'}: {tail}", None),
        "dose_response": (["--run", str(run), "--out", str(out), "--guidance", "nan"],
                          "error: Invalid value for '--guidance': 'nan' is not a finite number", out),
        "dataset_stats": ([str(out)], f"error: {out}: neither an NIH table", out),
        "demo": (["--out", str(out), "--fresh"],
                 f"error: Invalid value for '--out': {out} holds files but is not a demo output (no .done/); "
                 f"use a new or empty folder", out),
    }


def test_every_tool_refuses_bad_input_in_one_line_and_touches_nothing(run_dir, tmp_path):
    cases = _per_tool_cases(run_dir, tmp_path)
    assert sorted(cases) == TOOLS, "a tool without a hostile-input case here: add one"
    for name, (args, expected, untouched) in cases.items():
        line = refusal(tool(name, *args))
        assert line.startswith(expected), (name, line)
        if untouched is not None:
            assert_untouched(untouched)
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        (tmp_path / "read_only").chmod(0o755)


def test_every_tool_is_wired_through_the_one_boundary():
    """Each tool's entry is engine.cli.run (a tool that calls main() itself would print click's usage
    block or a traceback), and no tool catches our errors on its own (its message would escape the cap)."""
    for name in TOOLS:
        text = (REPO / "tools" / name).read_text()
        tail = text[text.index('if __name__ == "__main__":'):]
        assert tail.split("\n")[1].strip() in ("run(main)", "run(cli)"), name
        for own_handler in ('click.echo(f"error', 'sys.exit(f"error', "UsageError(str(e", "UsageError(str(exc"):
            assert own_handler not in text, (name, own_handler)


# ----------------------------------------------------------------------------- numeric options, the same everywhere

@pytest.mark.parametrize("value, message", [
    ("nan", "'nan' is not a finite number"), ("inf", "'inf' is not a finite number"),
    ("1e999", "'1e999' is not a finite number"), ("-5", "-5.0 is not in the range x>=0."),
    ("seven", "'seven' is not a valid float."),
])
def test_guidance_is_refused_the_same_way_by_every_tool(run_dir, tmp_path, capsys, value, message):
    out = user_folder(tmp_path)
    calls = {"scan_memorization": ["--checkpoint", str(run_dir), "--prompts", str(run_dir / "prompts.txt"),
                                   "--out", str(out / "s.parquet")],
             "sample": ["--checkpoint", str(run_dir), "--prompt", "", "--out", str(out)],
             "token_significance": ["--checkpoint", str(run_dir), "--prompts", str(run_dir / "prompts.txt"),
                                    "--out", str(out / "t.json")],
             "compare_runs": [str(run_dir), str(run_dir), "--out", str(out)],
             "mitigate": ["guidance", "--checkpoint", str(run_dir), "--out", str(out)],
             "benchmark_detectors": ["--checkpoint", str(run_dir), "--out", str(out)],
             "benchmark_similarity": ["--checkpoint", str(run_dir), "--out", str(out)],
             "study_mitigations": ["--config", str(REPO / "configs" / "demo_cpu.json"), "--out", str(out)],
             "dose_response": ["--run", str(run_dir), "--out", str(out)]}
    assert sorted(calls) == [n for n in TOOLS if '"--guidance"' in (REPO / "tools" / n).read_text()]
    assert "sample" in calls and len(calls) >= 8
    for name, args in calls.items():
        status, err = in_process(capsys, name, *args, "--guidance", value)
        option = "'--guidance' / '-w'" if name in ("sample", "compare_runs") else "'--guidance'"
        assert (status, err) == (2, [f"error: Invalid value for {option}: {message}"]), name
    assert_untouched(out)


def test_number_lists_are_checked_item_by_item(tmp_path, capsys):
    """FiniteList: every item finite and in range; '' is the empty list only where an option allows it."""
    import click

    from engine.cli import FiniteList
    assert FiniteList(min=0).convert("7.5, 5,3", None, None) == [7.5, 5.0, 3.0]
    assert FiniteList(allow_empty=True, min=0).convert("", None, None) == []
    with pytest.raises(click.BadParameter, match="expected numbers separated by commas"):
        FiniteList(min=0).convert(" , ", None, None)
    out = user_folder(tmp_path)
    config = REPO / "configs" / "demo_cpu.json"
    for option, value, message in [("--epsilons", "10,0", "0.0 is not in the range x>0."),
                                   ("--epsilons", "10,inf", "'inf' is not a finite number"),
                                   ("--lower-guidance", "3,-1", "-1.0 is not in the range x>=0.")]:
        status, err = in_process(capsys, "study_mitigations", "--config", str(config), "--out", str(out),
                                 option, value)
        assert (status, err) == (2, [f"error: Invalid value for '{option}': {message}"]), option
    assert_untouched(out)


def test_study_refuses_a_wrong_real_data_root_before_it_writes(tmp_path, capsys):
    """A real-data config whose root holds no such dataset is one line before the study makes its runs/
    folder or starts the trainer (which would import DeepSpeed and set up a process group first)."""
    out = user_folder(tmp_path)
    empty = tmp_path / "not_nih"
    empty.mkdir()
    config = REPO / "configs" / "demo_cpu.json"
    status, err = in_process(capsys, "study_mitigations", "--config", str(config), "--out", str(out),
                             "--set", "data.format=nih", "--set", f"data.root={empty}")
    assert (status, err) == (2, [f"error: {empty}: neither an NIH table (Data_Entry_2017.csv / "
                                 f"Data_Entry_2017_v2020.csv) nor a CheXpert train.csv found"])
    assert_untouched(out)
    status, err = in_process(capsys, "study_mitigations", "--config", str(config), "--out", str(out),
                             "--set", "data.format=chexpert", "--set", f"data.root={tmp_path / 'missing'}")
    assert (status, err) == (2, [f"error: {tmp_path / 'missing'}: not a folder"])
    assert_untouched(out)


def test_guidance_is_checked_by_the_detector_settings_too():
    from engine.audit.wen_detector import DetectorSettings
    for bad in (math.nan, math.inf, -5.0):
        with pytest.raises(ValueError, match=r"^guidance: expected a finite number >= 0, got "):
            DetectorSettings(guidance=bad)


def test_cuda_without_that_gpu_is_one_line_in_every_tool_with_a_device(run_dir, tmp_path, capsys):
    with_device = [n for n in TOOLS if "--device" in (REPO / "tools" / n).read_text()]
    assert len(with_device) >= 9
    for name in with_device:
        args = ["guidance"] if name == "mitigate" else []
        status, err = in_process(capsys, name, *args, "--device", "cuda:99")
        assert status == 2 and len(err) == 1, (name, err)
        assert err[0].startswith("error: Invalid value for '--device': 'cuda:99': "), (name, err)
    if not torch.cuda.is_available():
        status, err = in_process(capsys, "sample", "--device", "cuda")
        assert err == ["error: Invalid value for '--device': 'cuda': no CUDA GPU is available here "
                       "(torch.cuda.is_available() is False); use --device cpu"]


# ----------------------------------------------------------------------------- silent wrong results

def _nan_weight(run: Path) -> None:
    path = run / "export" / "model.safetensors"
    state = load_file(str(path))
    state["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(path))


def _overflowing(run: Path) -> None:
    """Finite weights whose output is not: the last layer at 3e38 overflows to inf, then NaN."""
    path = run / "export" / "model.safetensors"
    state = load_file(str(path))
    state["conv_out.weight"].fill_(3e38)
    state["conv_out.bias"].fill_(3e38)
    save_file(state, str(path))


def test_a_model_with_nan_weights_is_refused_before_any_image_is_written(run_dir, tmp_path):
    """Before: sample wrote black PNGs and the scan reported NaN scores as 'not flagged', exit 0."""
    run = copy_run(run_dir, tmp_path / "nan_run")
    _nan_weight(run)
    out = user_folder(tmp_path)
    line = refusal(tool("sample", "--checkpoint", str(run), "--prompt", PROMPTS[2], "-n", "1", "--steps", "2",
                        "--out", str(out)))
    assert line == f"error: {run / 'export' / 'model.safetensors'}: tensor 'conv_in.weight' holds NaN or infinite values"
    assert_untouched(out)


def test_non_finite_output_of_finite_weights_is_an_error_where_it_is_produced(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path / "overflow")
    _overflowing(run)
    weights = run / "export" / "model.safetensors"
    out = user_folder(tmp_path)
    common = ["--checkpoint", str(run), "--steps", "2", "--device", "cpu"]
    cases = [
        ("sample", [*common, "--prompt", PROMPTS[2], "-n", "1", "--out", str(out)],
         f"error: {weights}: the images sampled at w = 7.5 (2 steps) are not finite (1024 of 1024 values are NaN "
         f"or infinite)"),
        ("scan_memorization", [*common, "--prompts", str(run / "prompts.txt"), "--generations", "1", "--out",
                               str(out / "s.parquet"), "--quiet"],
         f"error: {weights}: the images sampled at w = 7.5 (2 steps) are not finite (3072 of 3072 values are NaN "
         f"or infinite)"),
        ("token_significance", [*common, "--prompts", str(run / "prompts.txt"), "--generations", "1", "--out",
                                str(out / "t.json")],
         f"error: {weights}: the conditional-noise magnitudes along the trajectory are not finite (6 of 6 values "
         f"are NaN or infinite)"),
        ("screening_threshold", ["--checkpoint", str(run), "--draws", "1", "--device", "cpu", "--out",
                                 str(out / "tau.json")],
         f"error: {weights}: the conditional-noise magnitudes of the training examples are not finite (10 of 10 "
         f"values are NaN or infinite)"),
        ("mitigate", ["guidance", *common, "--prompts", str(run / "prompts.txt"), "--generations", "1",
                      "--weights", "3", "--out", str(out / "sweep")],
         f"error: {weights}: the images sampled at w = 3 (2 steps) are not finite (3072 of 3072 values are NaN "
         f"or infinite)"),
    ]
    for name, args, expected in cases:
        status, err = in_process(capsys, name, *args)
        errors = [line for line in err if line.startswith("error:")]
        assert status == 2 and errors == [expected], (name, err)
        assert not any("Traceback" in line for line in err)
    # nothing written: the scan's journal is made with its first finished batch, sample writes after sampling
    assert_untouched(out)


def test_the_audit_and_the_scan_journal_refuse_non_finite_magnitudes(run_dir, tmp_path):
    from engine.audit.generation_audit import Generations, audit_generations
    from engine.audit.prompt_lists import load_prompts
    from engine.audit.scan import scan_prompts
    from engine.audit.wen_detector import DetectorSettings
    norms = np.ones((2, 1, 3), np.float32)
    norms[1, 0, 2] = np.nan
    gen = Generations(PROMPTS[:2], ["planted", "control"], [0, 1], norms, _blobs(2, 32, 0)[:, None])
    with pytest.raises(ValueError, match=r"^audit: the conditional-noise magnitudes of the generations are not "
                                         r"finite \(1 of 6 values are NaN or infinite\)$"):
        audit_generations(gen, None, threshold=0.5)
    # a journal part someone damaged (or a model that produced NaN before this check existed)
    loaded = load_model(run_dir)
    settings = DetectorSettings(generations=1, steps=2)
    out = tmp_path / "scan" / "s.parquet"
    prompts = load_prompts(str(run_dir / "prompts.txt"))

    def stop_after_first(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan_prompts(loaded, prompts, str(out), settings, batch_prompts=1, progress=False, on_batch=stop_after_first)
    part = next((tmp_path / "scan" / "s.parquet.parts").glob("part-*.parquet"))
    table = pq.read_table(part)
    rms = table.column("norms_rms").to_pylist()
    rms[0][0][0] = float("nan")
    pq.write_table(table.set_column(table.column_names.index("norms_rms"), "norms_rms",
                                    pa.array(rms, table.schema.field("norms_rms").type)), part)
    with pytest.raises(ValueError, match=rf"^{part}: norms_rms are not finite \(1 of 2 values"):
        scan_prompts(loaded, prompts, str(out), settings, batch_prompts=1, progress=False)


def test_a_nan_copy_detector_threshold_is_refused_when_the_detector_is_loaded(run_dir, tmp_path):
    """Before: the whole validation ran, then writing report.json failed on NaN."""
    detector = tmp_path / "detector"
    shutil.copytree(run_dir / "copy_detector", detector)
    meta = json.loads((detector / "copy_detector.json").read_text())
    (detector / "copy_detector.json").write_text(json.dumps({**meta, "threshold": math.nan}))
    out = user_folder(tmp_path)
    line = refusal(tool("validate_memorization", "--checkpoint", str(run_dir), "--scores", str(_scan(run_dir, tmp_path)),
                        "--copy-detector", str(detector), "--out", str(out), "--no-clip", "--quiet"))
    assert line == f"error: {detector / 'copy_detector.json'}: threshold: expected a correlation in [-1, 1] or null, got nan"
    assert_untouched(out)
    assert not (run_dir / "embedding_cache").exists()


def _scan(run_dir: Path, tmp_path: Path) -> Path:
    from engine.audit.scan import scan_checkpoint
    from engine.audit.wen_detector import DetectorSettings
    out = tmp_path / "scan" / "scores.parquet"
    scan_checkpoint(str(run_dir), str(out), DetectorSettings(generations=1, steps=2), prompts_file=str(
        run_dir / "prompts.txt"), progress=False, log=lambda m: None)
    return out


# ----------------------------------------------------------------------------- tampered files

@pytest.mark.parametrize("tamper, expected", [
    (lambda c, w: c["unet"].update(base_channels=10 ** 9),
     "{config}: unet.base_channels: expected even int in [4, 16384], got 1000000000"),
    (lambda c, w: c["unet"].update(num_res_blocks=10 ** 7),
     "{config}: unet.num_res_blocks: expected int in [1, 32], got 10000000"),
    (lambda c, w: c["unet"].update(base_channels=16384, channel_mult=[16, 16]),   # petabytes if it were built
     "{weights}: tensor 'time_mlp.0.weight' has shape [32, 8], the network of {config} needs [65536, 16384]"),
    (lambda c, w: c["diffusion"].update(num_timesteps=10 ** 12),
     "{config}: diffusion.num_timesteps: expected int in [2, 100000], got 1000000000000"),
    (lambda c, w: w.pop("conv_in.weight"),
     "{weights}: has no tensor 'conv_in.weight', which the network of {config} needs (1 missing)"),
    (lambda c, w: w.update({"conv_out.bias": torch.zeros(7)}),
     "{weights}: tensor 'conv_out.bias' has shape [7], the network of {config} needs [1]"),
    (lambda c, w: w.update({"payload": torch.zeros(1)}),
     "{weights}: holds a tensor 'payload' that the network of {config} does not have (1 unexpected)"),
    (lambda c, w: c.update(metadata="<script>"), "{config}: metadata: expected an object"),
])
def test_a_tampered_model_export_is_one_line_before_anything_is_allocated(run_dir, tmp_path, tamper, expected):
    export = tmp_path / "export"
    shutil.copytree(run_dir / "export", export)
    config_path, weights_path = export / "model_config.json", export / "model.safetensors"
    config, weights = json.loads(config_path.read_text()), load_file(str(weights_path))
    tamper(config, weights)
    config_path.write_text(json.dumps(config))
    save_file(weights, str(weights_path))
    with pytest.raises(ValueError) as info:
        load_model(export)
    assert str(info.value) == expected.format(config=config_path, weights=weights_path)


def test_damaged_model_files_name_the_file(run_dir, tmp_path, capsys):
    export = tmp_path / "export"
    shutil.copytree(run_dir / "export", export)
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"^{weights}: not a readable safetensors file \("):
        load_model(export)
    shutil.copy(run_dir / "export" / "model.safetensors", weights)
    (export / "model_config.json").write_bytes(b'{"format": 1, "unet": \xff}')
    status, err = in_process(capsys, "sample", "--checkpoint", str(export), "--prompt", "", "--out",
                             str(tmp_path / "o"))
    assert (status, err) == (2, [f"error: {export / 'model_config.json'}: not UTF-8 text (byte 0xff at line 1)"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, tamper, expected", [
    ("copy_detector", lambda m, w: m["config"].update(embed_dim=10 ** 9),
     "{weights}: tensor '14.weight' has shape [16, 64], the network of {meta} needs [1000000000, 64]"),
    ("copy_detector", lambda m, w: m["config"].update(backdoor=1),
     "{meta}: config.backdoor: unknown key (expected one of: "),
    ("copy_detector", lambda m, w: m.pop("config"), "{meta}: config: expected an object, got null"),
    ("copy_detector", lambda m, w: m["config"].update(backbone="resnet50"),
     "{weights}: has no tensor 'conv1.weight', which the network of {meta} needs ("),
    ("copy_detector", lambda m, w: m.update(threshold=math.inf),
     "{meta}: threshold: expected a correlation in [-1, 1] or null, got inf"),
    ("copy_detector", lambda m, w: w["0.weight"].fill_(math.nan), "{weights}: tensor '0.weight' holds NaN or infinite values"),
    ("label_classifier", lambda m, w: m["config"].update(width=2 ** 20),
     "{weights}: tensor '0.weight' has shape [8, 1, 3, 3], the network of {meta} needs [1048576, 1, 3, 3]"),
    ("label_classifier", lambda m, w: m.update(labels=["edema"] * 10 ** 6),
     "{weights}: tensor '14.weight' has shape [1, 16], the network of {meta} needs [1000000, 16]"),
    ("label_classifier", lambda m, w: m.update(labels="edema"),
     "{meta}: labels: expected a non-empty list of finding names"),
    ("label_classifier", lambda m, w: m["config"].update(width=12),
     "{meta}: label classifier width: expected a multiple of 8 (its GroupNorm has 8 groups), got 12"),
])
def test_tampered_audit_networks_are_one_line_naming_the_file_and_key(run_dir, tmp_path, name, tamper, expected):
    folder = tmp_path / name
    shutil.copytree(run_dir / name, folder)
    meta_path, weights_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    meta, weights = json.loads(meta_path.read_text()), load_file(str(weights_path))
    tamper(meta, weights)
    meta_path.write_text(json.dumps(meta))
    save_file(weights, str(weights_path))
    load = load_copy_detector if name == "copy_detector" else load_label_classifier
    with pytest.raises(ValueError) as info:
        load(str(folder))
    assert str(info.value).startswith(expected.format(meta=meta_path, weights=weights_path)), str(info.value)
    assert "\n" not in str(info.value)


def test_a_tampered_scores_file_is_refused_before_validation(run_dir, tmp_path, capsys):
    scores = _scan(run_dir, tmp_path)
    table = pq.read_table(scores)
    bad = tmp_path / "nan_scores.parquet"
    pq.write_table(table.set_column(table.column_names.index("score"), "score",
                                    pa.array([math.nan] * len(table), pa.float32())), bad)
    out = user_folder(tmp_path)
    status, err = in_process(capsys, "validate_memorization", "--checkpoint", str(run_dir), "--scores", str(bad),
                             "--out", str(out), "--no-clip", "--quiet")
    assert (status, err) == (2, [f"error: {bad}: column 'score' are not finite (3 of 3 values are NaN or infinite)"])
    meta = json.loads(table.schema.metadata[b"memdiff_scan"])
    meta["scan"]["settings"]["guidance"] = "<script>"
    hostile = tmp_path / "hostile_settings.parquet"
    pq.write_table(table.replace_schema_metadata({b"memdiff_scan": json.dumps(meta).encode()}), hostile)
    status, err = in_process(capsys, "validate_memorization", "--checkpoint", str(run_dir), "--scores", str(hostile),
                             "--out", str(out), "--no-clip", "--quiet")
    assert (status, err) == (2, [f"error: {hostile}: scan metadata: scan.settings.guidance: expected float, "
                                 f"got \"<script>\""])
    assert_untouched(out)


# ----------------------------------------------------------------------------- input files and messages

def test_a_2mb_prompt_gives_a_short_line_naming_the_file_and_line(run_dir, tmp_path):
    prompts = tmp_path / "big.txt"
    prompts.write_text(PROMPTS[2] + "\nfrontal chest x-ray: " + "x" * 2_000_000 + "\n")
    out = user_folder(tmp_path)
    line = refusal(tool("sample", "--checkpoint", str(run_dir), "--prompts", str(prompts), "--out", str(out)))
    assert len(line) < 700
    assert line.startswith(f"error: {prompts}:2: prompt 'frontal chest x-ray: xxx")
    assert "(2000021 characters): unknown finding 'xxx" in line and line.endswith("(2000000 characters)")
    assert_untouched(out)


def test_a_prompt_file_that_is_not_utf8_names_the_file_and_line(run_dir, tmp_path, capsys):
    prompts = tmp_path / "latin1.txt"
    prompts.write_bytes(PROMPTS[2].encode() + b"\nfrontal chest x-ray: \xe9d\xe8me\n")
    status, err = in_process(capsys, "scan_memorization", "--checkpoint", str(run_dir), "--prompts", str(prompts),
                             "--out", str(tmp_path / "s.parquet"))
    assert (status, err) == (2, [f"error: {prompts}: not UTF-8 text (byte 0xe9 at line 2)"])
    assert not (tmp_path / "s.parquet").exists()


def test_one_line_caps_any_message_keeping_its_start_and_end():
    text = "file.csv:7: prompt " + "y" * 4_000_000 + " is unknown"
    line = one_line(ValueError(text))
    assert len(line) <= 600 and line.startswith("file.csv:7: prompt yyy") and line.endswith("yyy is unknown")
    assert one_line(ValueError("two\nlines")) == "two lines"
    assert one_line(FileNotFoundError(2, "No such file or directory", "/x")) == "/x: No such file or directory"


def test_an_existing_file_that_is_not_a_scan_is_never_overwritten(run_dir, tmp_path, capsys):
    out = tmp_path / "thesis.parquet"
    out.write_text("my thesis")
    status, err = in_process(capsys, "scan_memorization", "--checkpoint", str(run_dir), "--prompts",
                             str(run_dir / "prompts.txt"), "--out", str(out), "--generations", "1", "--steps", "2",
                             "--quiet")
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {out}: exists and is not a memdiff scan (")
    assert err[0].endswith("; use another --out") and out.read_text() == "my thesis"


# ----------------------------------------------------------------------------- unwritable output

@pytest.mark.parametrize("name, args", [
    ("validate_memorization", ["--checkpoint", "{run}", "--scores", "{prompts}", "--out", "{out}", "--no-clip"]),
    ("sample", ["--checkpoint", "{run}", "--prompt", PROMPTS[2], "--out", "{out}"]),
    ("scan_memorization", ["--checkpoint", "{run}", "--prompts", "{prompts}", "--out", "{out}/s.parquet"]),
    ("mitigate", ["guidance", "--checkpoint", "{run}", "--out", "{out}"]),
    ("token_significance", ["--checkpoint", "{run}", "--prompts", "{prompts}", "--out", "{out}/t.json"]),
    ("screening_threshold", ["--checkpoint", "{run}", "--out", "{out}/tau.json"]),
    ("train_copy_detector", ["--checkpoint", "{run}", "--out", "{out}"]),
    ("train_label_classifier", ["--checkpoint", "{run}", "--out", "{out}"]),
    ("compare_runs", ["{run}", "{run}", "--out", "{out}"]),
    ("benchmark_detectors", ["--checkpoint", "{run}", "--out", "{out}"]),
    ("benchmark_similarity", ["--checkpoint", "{run}", "--out", "{out}", "--no-clip"]),
    ("study_mitigations", ["--config", "{config}", "--out", "{out}"]),
    ("train_deepssim", ["--checkpoint", "{run}", "--out", "{out}", "--backbone", "tiny"]),
])
def test_an_unwritable_output_is_refused_while_parsing(run_dir, tmp_path, capsys, name, args):
    parent, tail = unwritable_parent(tmp_path)
    out = parent / "out"
    args = [a.format(run=run_dir, prompts=run_dir / "prompts.txt", out=out, config=REPO / "configs" / "demo_cpu.json")
            for a in args]
    try:
        status, err = in_process(capsys, name, *args)
    finally:
        parent.chmod(0o755)
    assert (status, err) == (2, [f"error: Invalid value for '--out': {out}: {tail}"])
    assert not (run_dir / "embedding_cache").exists()


def test_a_read_only_default_output_is_refused_before_training(run_dir, tmp_path, capsys):
    """tools/train_copy_detector writes into <run>/copy_detector by default: checked before training."""
    run = copy_run(run_dir, tmp_path / "run")
    shutil.rmtree(run / "copy_detector")
    (run / "copy_detector").write_text("a file where the folder would go")
    status, err = in_process(capsys, "train_copy_detector", "--checkpoint", str(run), "--epochs", "1",
                             "--backbone", "tiny", "--quiet")
    assert (status, err) == (2, [f"error: {run / 'copy_detector'}: {run / 'copy_detector'} is not a folder"])
    assert not (run / "cache").exists()   # no image was read


def test_train_deepssim_refuses_a_split_without_patient_ids_before_training(run_dir, tmp_path, capsys):
    """Its evaluation pairs images of different patients: a splits.json without patient ids is named
    by file and row before any epoch runs, and no DeepSSIM is saved (a rerun is not blocked by it)."""
    out = tmp_path / "deepssim"
    status, err = in_process(capsys, "train_deepssim", "--checkpoint", str(run_dir), "--out", str(out),
                             "--backbone", "tiny", "--epochs", "1", "--eval-split", "val", "--quiet")
    assert (status, err) == (2, [f"error: {run_dir / 'splits.json'}: splits.val[0]: no patient_id (the evaluation "
                                 f"pairs images of different patients)"])
    assert not out.exists()


# ----------------------------------------------------------------------------- pages

# Every module of engine/reports that writes markup, each rendered below with markup in every field it shows.
PAGES_TESTED = {"audit_report", "cfg_vs_nocfg", "comparison_page", "conditions_table", "demo_index", "dose_response_page",
                "detector_benchmark", "exposure", "mitigation_study_page", "similarity_benchmark_page",
                "token_significance_page"}
MARKUP = re.compile(r"<(html|table|h[1-4]|pre|ul|p|div|span)[ >]")


def test_every_page_generator_is_rendered_with_hostile_input_here():
    pages = {p.stem for p in (REPO / "engine" / "reports").glob("*.py") if MARKUP.search(p.read_text())}
    assert pages == PAGES_TESTED, "a page generator without a hostile-input render test here: add one"


def _assert_escaped(page: str, markers: list[str]) -> None:
    """No marker reached the page as markup, and each reached it escaped (the field was rendered)."""
    assert "<img src=x" not in page
    for m in markers:
        assert m.replace("<", "&lt;").replace(">", "&gt;") in page, m


def test_the_cfg_vs_nocfg_page_escapes_everything_and_refuses_non_numbers(run_dir, tmp_path, capsys):
    runs = []
    for i in range(2):
        run = copy_run(run_dir, tmp_path / XSS.format(i))   # run folder names are shown on the page
        (run / "config.json").write_text(json.dumps({"conditioning": {"p_uncond": 0.1}}))
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
        (run / "sample_prompts.json").write_text(json.dumps({"prompts": [PROMPTS[2]], "seeds": [0]}))
        runs.append(run)
    from engine.audit.conditioning_study import StudyOptions
    from engine.reports.cfg_vs_nocfg import compare_runs
    quantify = StudyOptions(generations=1, steps=2, controls=1, ordinary=1, n_boot=20)   # the conditions table too
    page = compare_runs(runs[0], runs[1], tmp_path / "page", guidance=(1.0,), steps=2, quantify=quantify).read_text()
    _assert_escaped(page, [XSS.format(0), XSS.format(1)])
    assert page.count(XSS.format(1).replace("<", "&lt;").replace(">", "&gt;") + " w = 1") >= 2   # both tables
    # the probe: steps and p_uncond carrying markup are refused, naming the file and key
    (runs[1] / "metrics.jsonl").write_text('{"step": "<img src=x onerror=alert(9)>", "loss": 0.4}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: expected an object with an integer \"step\""):
        compare_runs(runs[0], runs[1], tmp_path / "page2", guidance=(1.0,), steps=2)
    (runs[1] / "metrics.jsonl").write_text('{"step": 2, "loss": 0.4}\n')
    (runs[1] / "config.json").write_text(json.dumps({"conditioning": {"p_uncond": XSS.format(8)}}))
    status, err = in_process(capsys, "compare_runs", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "page3"),
                             "--steps", "2")
    assert (status, err) == (2, [f"error: {runs[1] / 'config.json'}: conditioning.p_uncond: expected a number in "
                                 f"[0, 1], got {XSS.format(8)}"])
    assert not (tmp_path / "page3").exists()


def test_the_audit_report_escapes_prompts_and_groups_from_the_scores_file(run_dir, tmp_path):
    from engine.audit.validation import ValidationOptions, validate_checkpoint
    from engine.reports.audit_report import render_html
    scores = _scan(run_dir, tmp_path)
    table = pq.read_table(scores)
    hostile = [XSS.format(f"p{i}") for i in range(len(table))]
    table = table.set_column(table.column_names.index("prompt"), "prompt", pa.array(hostile))
    table = table.set_column(table.column_names.index("group"), "group",
                             pa.array([XSS.format("g")] * len(table)))
    pq.write_table(table, scores)
    result = validate_checkpoint(str(run_dir), str(scores), opts=ValidationOptions(top_k=3, bottom_k=0, spread=0,
                                                                                 bootstrap=10,
                                                                                 cache_dir=str(tmp_path / "cache")),
                                 use_clip=False, progress=False)
    page = render_html(result, title=XSS.format("t"))
    _assert_escaped(page, hostile + [XSS.format("g"), XSS.format("t")])


def test_the_comparison_page_escapes_names_prompts_groups_and_notes(run_dir):
    from engine.audit.generation_audit import Generations, audit_series
    from engine.audit.run_data import RealImages
    from engine.reports.comparison_page import render_comparison_html
    train = _blobs(6, 32, 3)
    real = RealImages(train, [f"/img/{i}.png" for i in range(6)], _blobs(4, 32, 4))
    prompts = [XSS.format("p0"), XSS.format("p1")]
    gen = Generations(prompts, ["planted", XSS.format("g")], [0, 1], np.ones((2, 1, 3), np.float32),
                      _blobs(2, 32, 5)[:, None])
    audits = audit_series([gen, gen], real, threshold=0.5)
    names = [XSS.format("n0"), XSS.format("n1")]
    page = render_comparison_html(XSS.format("t"), names, audits, [gen, gen], real, [XSS.format("note")])
    _assert_escaped(page, prompts + names + [XSS.format("g"), XSS.format("t"), XSS.format("note")])


def test_the_token_significance_and_demo_pages_escape_every_field(tmp_path):
    from engine.reports.demo_index import headline_tables, write_index
    from engine.reports.token_significance_page import significance_report_html
    entries = [{"prompt": XSS.format("p"), "mean_norm_rms": 0.5,
                "tokens": [{"token": XSS.format("tok"), "score": 1.0}, {"token": "lateral", "score": 0.5}]}]
    _assert_escaped(significance_report_html(entries, heading=XSS.format("h")),
                    [XSS.format("p"), XSS.format("tok"), XSS.format("h")])
    audit = {"copying": {"planted_pixels": {"nearest_is_planted_fraction": 0.5, "nearest_is_planted_ci95": [0, 1],
                                            "null_rate": 0.1}},
             "quality": {}, "detection": {"planted_flagged": {"rate": 0.5, "ci95": [0.2, 0.8], "n": 4}}}
    (tmp_path / "mitigation_guidance").mkdir()
    (tmp_path / "mitigation_guidance" / "summary.json").write_text(json.dumps({"runs": {XSS.format("run"): audit}}))
    (tmp_path / "cfg_vs_nocfg").mkdir()
    (tmp_path / "cfg_vs_nocfg" / "quantified.json").write_text(json.dumps({"results": [
        {"name": XSS.format("cond"), "groups": {XSS.format("group"): 1}, "detection": {"not_applicable": "x"}}]}))
    tables = headline_tables(tmp_path)
    assert len(tables) == 2
    write_index(tmp_path, [(XSS.format("label"), tmp_path / XSS.format("path"))], tables, XSS.format("intro"))
    _assert_escaped((tmp_path / "index.html").read_text(),
                    [XSS.format("run"), XSS.format("label"), XSS.format("path"), XSS.format("intro"),
                     XSS.format("cond"), XSS.format("group")])


def test_the_dose_response_page_escapes_every_field():
    from engine.reports.dose_response_page import render
    cell = {"copies": 2, "kind": XSS.format("kind"), "rate": 0.5, "ci95": [0.1, 0.9], "n_prompts": 2,
            "null_rate": 0.0, "null_ci95": [0.0, 0.1]}
    doc = {"run": XSS.format("run"), "options": {"generations": 1, "steps": 1, "guidance": 7.5, "seed": 0},
           "n_prompts": {"planted": 1, "control": 1, "ordinary": 0}, "n_train_images": 3,
           "regime": XSS.format("regime"), "kinds": [XSS.format("kind")], "dose_levels": [2],
           "copy_rule": XSS.format("rule"), "copy_threshold": 0.9,
           "snapshots": [{"step": 10, "truth": {"by_cell": [cell]}, "detection_by_dose": [], "copy_rate": {}}]}
    _assert_escaped(render(doc, XSS.format("title")), [XSS.format(f) for f in ("run", "regime", "kind", "rule",
                                                                                "title")])


def planted_run(run_dir: Path, where: Path) -> Path:
    """A run with 4 planted and 4 control tokens (the detector benchmark needs 2 planted prompts in each
    half), on the fixture's images, with a tiny random model of its vocabulary."""
    tokens = [f"plant{j:03d}" for j in range(4)] + [f"ctrl{j:03d}" for j in range(4)]
    vocab = Vocabulary.default(extra_tokens=tokens)
    paths = [str(run_dir / "images" / f"{i}.png") for i in range(14)]
    records = ([{"image_path": paths[j], "prompt": f"frontal AP chest x-ray, male, 30s | plant{j:03d}"} for j in range(4)]
               + [{"image_path": paths[4 + j], "prompt": f"frontal PA chest x-ray, female, {10 * j + 20}s | ctrl{j:03d}"}
                  for j in range(4)]
               + [{"image_path": paths[8 + j % 4], "prompt": f"lateral LL chest x-ray, male, {10 * j}s"} for j in range(8)])
    where.mkdir()
    (where / "splits.json").write_text(json.dumps({"data": {"image_size": 32, "cache_dir": str(where / "cache")},
                                                   "splits": {"train": records, "val": records[:2], "test": []}}))
    (where / "planted_manifest.json").write_text(json.dumps({"seed": 0, "planted": [
        {"token": f"plant{j:03d}", "image_path": paths[j]} for j in range(4)], "controls": [
        {"token": f"ctrl{j:03d}", "image_paths": [paths[4 + j]]} for j in range(4)]}))
    export_model(where / "export", tiny_unet(vocab), DiffusionConfig(num_timesteps=100), vocab,
                 metadata={"p_uncond": 0.1})
    return where


def test_the_detector_benchmark_page_escapes_every_field(run_dir, tmp_path):
    from engine.audit.detector_benchmark import benchmark_checkpoint
    from engine.audit.wen_detector import DetectorSettings
    from engine.reports.detector_benchmark import render_benchmark_html
    run = planted_run(run_dir, tmp_path / XSS.format("run"))       # the run's path is shown on the page
    result = benchmark_checkpoint(str(run), str(tmp_path / "bench"), DetectorSettings(generations=2, steps=2),
                                  n_boot=20, progress=False, log=lambda m: None)
    records, meta = result["records"], result["meta"]
    assert any(r.get("fitted_params") for r in records)            # the fitted detector's row is rendered too
    records[0]["detector"] = XSS.format("detector")
    for r in records:
        r["summary"] = XSS.format("summary")
    meta.update(device=XSS.format("device"), split_source=XSS.format("split"), notes=[XSS.format("note")],
                counts={XSS.format("count"): 1}, null_condition=XSS.format("null"), p_uncond=XSS.format("p"))
    meta["settings"]["sampler"] = XSS.format("sampler")
    page = render_benchmark_html(records, meta)
    _assert_escaped(page, [XSS.format(k) for k in ("run", "detector", "summary", "device", "split", "note", "count",
                                                   "null", "p", "sampler")])


def test_the_similarity_benchmark_page_escapes_every_field(run_dir, tmp_path):
    from engine.audit.run_data import read_manifest, split_images
    from engine.audit.similarity_benchmark import BenchmarkOptions, pixel_metric, run_benchmark, ssim_metric
    from engine.reports.similarity_benchmark_page import write_page
    train = split_images(str(run_dir), "train", progress=False)
    val = split_images(str(run_dir), "val", progress=False).images
    opts = BenchmarkOptions(generations=2, steps=2, controls_per_token=1, known_copies=4, n_boot=20)
    run = copy_run(run_dir, tmp_path / XSS.format("run"))           # the run's path is shown on the page
    numbers = run_benchmark(load_model(run), str(run), train, val, val, read_manifest(str(run)),
                            [pixel_metric(), ssim_metric()], opts)
    images = numbers.pop("_images")
    assert images["planted_rows"].any()                             # the examples table has rows
    hostile = XSS.format("metric")                                  # a metric name, everywhere it is a key
    for table in (numbers["retrieval"], numbers["metrics"], numbers["paired_recall_at_1"]["differences"],
                  numbers["copy_decisions"], numbers["known_copies"], images["top1"]):
        table[hostile] = table.pop("ssim")
    for rules in [*numbers["copy_decisions"].values(), *(k["copy_decisions"] for k in numbers["known_copies"].values())]:
        rules[XSS.format("rule")] = rules.pop(next(iter(rules)))
    numbers["metrics"][hostile]["note"] = XSS.format("note")
    numbers["default_metric"] = {"name": XSS.format("default"), "reason": XSS.format("reason")}
    numbers["manifest_version"] = XSS.format("version")             # read from planted_manifest.json
    numbers["options"]["sampler"] = XSS.format("sampler")
    images["prompts"] = [XSS.format(f"p{i}") for i in range(len(images["prompts"]))]
    shown = [XSS.format(f"p{i}") for i in np.flatnonzero(images["planted_rows"])[:6]]
    write_page(str(tmp_path / "index.html"), numbers, images, train.images)
    _assert_escaped((tmp_path / "index.html").read_text(),
                    [XSS.format(k) for k in ("run", "metric", "rule", "note", "default", "reason", "version",
                                             "sampler")] + shown)


def _quantified(run_dir: Path, name: str) -> dict:
    """engine.audit.conditioning_study's numbers of the tiny run at w = 1 and 3, under a condition name."""
    from engine.audit.conditioning_study import StudyOptions, quantify_runs
    from engine.audit.run_data import read_manifest, run_real_images, split_prompts
    return quantify_runs([load_model(run_dir)], [name], [[1.0, 3.0]], run_real_images(str(run_dir), "val", progress=False),
                         read_manifest(str(run_dir)), split_prompts(str(run_dir), "train"),
                         opts=StudyOptions(generations=1, steps=2, controls=1, ordinary=1, n_boot=20))


def test_the_mitigation_study_page_and_conditions_table_escape_every_field(run_dir, tmp_path):
    from engine.reports.mitigation_study_page import write_study_page
    q = _quantified(run_dir, XSS.format("condition"))
    assert q["results"][1]["paired_vs_reference"]                    # the paired table is rendered too
    q["results"][1].update(steps=XSS.format("steps"), privacy={"epsilon": 10.0, "delta": 1e-5, "noise_multiplier": 1.1})
    q["results"][0]["detection"] = {"not_applicable": XSS.format("detection")}
    for r in q["results"]:
        r["frechet"][XSS.format("features")] = r["frechet"].pop(next(iter(r["frechet"])))
        r["groups"] = {XSS.format("group"): sum(r["groups"].values())}
    doc = {**q, "spec": {"config": XSS.format("config"), "overrides": [XSS.format("set")],
                         "dp_overrides": [XSS.format("dpset")], "dp_epsilons": [10.0], "dp_delta": 1e-5,
                         "guidance": 7.5, "audit": q["options"]},
           "screening": {"tau_rms": 0.1, "quantile": 0.9, "dropped": 0.2}}
    page = Path(write_study_page(str(tmp_path), doc)).read_text()
    _assert_escaped(page, [XSS.format(k) for k in ("condition", "steps", "detection", "features", "group", "config",
                                                   "set", "dpset")])


def test_the_exposure_table_escapes_paths_patients_and_prompts():
    from data_pipeline.images import to_model_range
    from engine.audit.detectors.nearest_training import TrainingNeighbours
    from engine.audit.exposure import exposed_training_images
    from engine.reports.exposure import exposure_section_html
    train = _blobs(4, 32, 7)
    paths = [XSS.format(f"path{i}") for i in range(4)]
    generations = to_model_range(train[:2], channel_dim=False)[:, None, None]   # [P=2, G=1, 1, S, S]: copies
    prompts = [XSS.format("p0"), XSS.format("p1")]
    rows = exposed_training_images(prompts, generations, TrainingNeighbours(train, paths), 0.9,
                                   {p: XSS.format("patient") for p in paths})
    assert sorted(r["image_path"] for r in rows) == paths[:2]
    page = exposure_section_html(rows, {"n_flagged_prompts": 2, "prompts_used": XSS.format("used"),
                                        "generations": 1, "threshold": 0.9,
                                        "threshold_from": XSS.format("from"), "n_patients": 1})
    _assert_escaped(page, paths[:2] + prompts + [XSS.format("patient"), XSS.format("from"), XSS.format("used")])
