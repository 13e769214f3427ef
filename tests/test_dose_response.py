"""The dose-response study: planted ground truth per dose and kind against training length, judged with
an oracle model whose generations are known in advance, and the tool run as a user runs it."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_pipeline.dataset import data_config, prepare_dataset
from data_pipeline.synthetic import make_synthetic_chexpert
from engine.audit.dose_response import DoseResponseOptions, dose_response, snapshots
from engine.audit.run_data import split_images
from engine.diffusion.schedule import DiffusionConfig, NoiseSchedule
from engine.model.export import export_model
from engine.model.unet import ConditionalUNet, UNetConfig
from engine.reports.dose_response_page import write_dose_response

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Oracle(torch.nn.Module):
    """Predicts the noise that makes x0 exactly `targets[token id]` for prompts holding that token, and
    `other` (an image never trained on) for every other prompt; zeros for the null prompt."""

    def __init__(self, targets: dict[int, np.ndarray], other: np.ndarray, schedule: NoiseSchedule, null_id: int):
        super().__init__()
        as_x = lambda a: torch.from_numpy(np.asarray(a, np.float32) / 127.5 - 1)  # noqa: E731
        self.targets, self.other = {k: as_x(v) for k, v in targets.items()}, as_x(other)
        self.schedule, self.null_id = schedule, null_id
        self.cfg = SimpleNamespace(in_channels=1, image_size=other.shape[0])
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode(self, tokens):
        return tokens.float(), tokens != 0

    def denoise(self, x, t, context, mask):
        x0 = torch.zeros_like(x)
        for i, row in enumerate(context.long().tolist()):
            hit = [self.targets[tok] for tok in row if tok in self.targets]
            x0[i, 0] = hit[0] if hit else (0 * self.other if row[0] == self.null_id else self.other)
        a, s = self.schedule.sqrt_ab(t).view(-1, 1, 1, 1), self.schedule.sqrt_1mab(t).view(-1, 1, 1, 1)
        return (x - a * x0) / s


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real prepared run directory (planted v2, exact and near) with two snapshot folders."""
    base = tmp_path_factory.mktemp("dose")
    root = make_synthetic_chexpert(str(base / "data"), 80, seed=2, image_size=48, progress=False)
    cfg = data_config({"format": "synthetic", "root": root, "image_size": 32, "cache_dir": str(base / "cache"),
                       "planted": {"k": 1, "copies": [2, 3], "kinds": ["exact", "near"], "seed": 1}})
    run_dir = base / "run"
    prepared = prepare_dataset(cfg, str(run_dir), progress=False)
    vocab = prepared.vocab
    torch.manual_seed(0)
    tiny = ConditionalUNet(UNetConfig(image_size=32, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                      attention_resolutions=(16,), num_heads=2, vocab_size=len(vocab),
                                      max_tokens=vocab.max_len, context_dim=8, encoder_layers=1, encoder_heads=2))
    for step, where in ((10, run_dir / "exports" / "step_10"), (20, run_dir / "export")):
        export_model(where, tiny, DiffusionConfig(num_timesteps=100), vocab, metadata={"step": step, "p_uncond": 0.5})
    return run_dir, prepared


def test_snapshots_are_found_in_step_order(run):
    run_dir, _ = run
    assert [s for s, _ in snapshots(str(run_dir))] == [10, 20]
    with pytest.raises(ValueError, match="no exported model"):
        snapshots(str(run_dir / "exports"))


def test_dose_response_with_an_oracle(run, tmp_path):
    """At step 10 the oracle copies only the 3-copy images, at step 20 every planted image: the study
    must find exactly that, each cell against a null rate counted by hand."""
    run_dir, prepared = run
    manifest, vocab = prepared.manifest, prepared.vocab
    train = split_images(str(run_dir), "train", progress=False)
    source_pixels = dict(zip(train.image_paths, train.images))
    other = prepared.splits["val"].images[0]
    schedule = NoiseSchedule("linear", 100)

    def load(path, device="cpu"):
        step = 10 if path.endswith("step_10") else 20
        targets = {vocab.id_of(e["token"]): source_pixels[e["image_path"]] for e in manifest["planted"]
                   if step == 20 or e["copies"] == 3}
        model = Oracle(targets, other, schedule, vocab.id_of("<null>"))
        return SimpleNamespace(model=model, schedule=schedule, vocab=vocab, unet_config=model.cfg,
                               diffusion_config=DiffusionConfig(num_timesteps=100), metadata={"p_uncond": 0.5},
                               path=path)

    opts = DoseResponseOptions(generations=2, steps=4, guidance=1.0, ordinary=6, batch_prompts=8)
    doc = dose_response(str(run_dir), str(tmp_path / "out"), opts, progress=False, log=lambda m: None, load=load)
    first, last = doc["snapshots"]
    assert (first["step"], last["step"]) == (10, 20)
    # the other image's nearest training image, by hand: the null rate of every cell is a count of it
    flat = lambda a: (a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True))  # noqa: E731
    t = flat(train.images.astype(float))
    o = flat(other[None].astype(float))
    nearest_other = train.image_paths[int(np.argmax((t / np.linalg.norm(t, axis=1, keepdims=True)) @
                                                    (o / np.linalg.norm(o)).T))]
    for row, memorized in ((first, {3}), (last, {2, 3})):
        for cell in row["truth"]["by_cell"]:
            assert cell["rate"] == (1.0 if cell["copies"] in memorized else 0.0), (row["step"], cell)
            entry = next(e for e in manifest["planted"] if (e["copies"], e["kind"]) == (cell["copies"], cell["kind"]))
            in_cell = nearest_other in {entry["image_path"], *entry["copy_paths"]}
            n_other = doc["n_prompts"]["control"] + doc["n_prompts"]["ordinary"]
            assert cell["null_rate"] == (1.0 if in_cell else 0.0) and cell["n_null_generations"] == n_other * 2
        assert {(c["copies"], c["kind"]) for c in row["memorized"]} == {(c, k) for c in memorized
                                                                       for k in ("exact", "near")}
    assert doc["regime"].startswith("memorized at step 20") and "2 copies exact" in doc["regime"]
    assert last["copy_rate"]["planted"]["rate"] == 1.0          # a generation equal to a training image is a copy
    html_path, json_path = write_dose_response(str(tmp_path / "out"), doc)
    assert json.load(open(json_path))["regime"] == doc["regime"] and "3 copies" in open(html_path).read()


def test_tool_runs_on_real_exports(run, tmp_path):
    """tools/dose_response as a user runs it, on untrained exports: nothing is memorized, and it says so."""
    run_dir, _ = run
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "dose_response"), "--run", str(run_dir),
                        "--out", str(tmp_path / "tool"), "--generations", "1", "--steps", "2", "--ordinary", "4",
                        "--quiet"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "no planted cell is memorized above its null rate by step 20" in r.stdout
    doc = json.load(open(tmp_path / "tool" / "dose_response.json"))
    assert [s["step"] for s in doc["snapshots"]] == [10, 20] and doc["n_prompts"]["planted"] == 4
    bad = subprocess.run([sys.executable, os.path.join(REPO, "tools", "dose_response"), "--run", str(tmp_path),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 2 and "no planted_manifest.json" in bad.stderr
