"""Before/after audit: known-answer checks of the audit numbers and an end-to-end run of the tools."""
import importlib.machinery
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from data_pipeline.vocab import Vocabulary
from engine.audit.generation_audit import Generations, RealImages, audit_generations, audit_series
from engine.diffusion.schedule import DiffusionConfig
from engine.model.export import export_model
from engine.model.unet import ConditionalUNet, UNetConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blobs(n: int, size: int, seed: int) -> np.ndarray:
    """Distinct smooth random images, uint8 [n, size, size]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=size, mode="bilinear")
    return (x[:, 0] * 255).round().to(torch.uint8).numpy()


def test_audit_known_answers():
    train = _blobs(12, 16, 0)
    paths = [f"/img/{i}.png" for i in range(12)]
    heldout = _blobs(10, 16, 1)
    manifest = {"planted": [{"token": "tok0000", "image_path": "/img/3.png", "copies": 4},
                            {"token": "tok0001", "image_path": "/img/7.png", "copies": 4}],
                "controls": [{"token": "tok0002", "image_paths": ["/img/1.png"]}]}
    prompts = ["frontal chest x-ray | tok0000", "frontal chest x-ray | tok0001", "frontal chest x-ray | tok0002",
               "lateral chest x-ray"]
    groups = ["planted", "planted", "control", "ordinary"]
    images = np.stack([np.stack([train[3], train[3]]), np.stack([train[7], train[7]]),
                       _blobs(2, 16, 5), _blobs(2, 16, 6)])
    norms = np.array([0.9, 0.8, 0.1, 0.2], np.float32)[:, None, None] * np.ones((4, 2, 3), np.float32)
    gen = Generations(prompts, groups, [0, 1, 2, 3], norms, images)
    a = audit_generations(gen, RealImages(train, paths, heldout), manifest=manifest, threshold=0.5)
    det, cop = a["detection"], a["copying"]
    assert det["planted_flagged_fraction"] == 1.0 and det["control_flagged_fraction"] == 0.0
    assert det["auc/score/planted_vs_control"]["auc"] == 1.0
    assert abs(det["planted_score_mean"] - 0.85) < 1e-6
    assert cop["space"] == "pixel_correlation"
    assert cop["planted_nearest_is_planted_fraction"] == 1.0
    assert cop["copy_fraction_planted"] == 1.0 and cop["nearest_similarity_planted"]["median"] > 0.9999
    assert a["nearest_train_index"][0] == [3, 3] and a["nearest_train_index"][1] == [7, 7]
    fd = a["quality"]["pixels_8x8"]
    assert fd["frechet_to_heldout"] > 0 and fd["real_train_vs_heldout"] >= 0
    # Calibrated threshold: largest non-planted score is 0.2, so both planted prompts are flagged.
    b = audit_generations(gen, RealImages(train, paths, heldout), manifest=manifest)
    assert b["detection"]["threshold"] == pytest.approx(0.2) and b["detection"]["planted_flagged_fraction"] == 1.0
    # A "mitigated" set with every score scaled by 0.2: calibrated on its own (threshold 0.04) it
    # would flag both planted prompts again; judged by the baseline's threshold 0.2 it flags neither.
    scaled = Generations(prompts, groups, [0, 1, 2, 3], norms * 0.2, images)
    alone = audit_generations(scaled, RealImages(train, paths, heldout), manifest=manifest)
    assert alone["detection"]["planted_flagged_fraction"] == 1.0
    series = audit_series([gen, scaled], RealImages(train, paths, heldout), manifest=manifest)
    assert [a["detection"]["threshold"] for a in series] == pytest.approx([0.2, 0.2])
    assert [a["detection"]["planted_flagged_fraction"] for a in series] == [1.0, 0.0]


def test_planted_pixel_match_against_numpy():
    """Ground truth for planted prompts: correlation to the prompt's OWN planted image (any copy) and
    whether that image is the nearest training image, checked against np.corrcoef."""
    train = _blobs(10, 16, 3)
    train[4] = train[2]                                   # a second copy of the planted image
    paths = [f"/img/{i}.png" for i in range(10)]
    paths[4] = paths[2]
    manifest = {"planted": [{"token": "tok0000", "image_path": "/img/2.png", "copies": 2}]}
    noisy = np.clip(train[2].astype(int) + np.random.default_rng(0).integers(-20, 21, train[2].shape), 0, 255)
    # The ordinary prompt's first generation happens to be the planted image: the null rate sees it.
    images = np.stack([np.stack([train[2], noisy.astype(np.uint8), train[7]]),
                       np.concatenate([train[4][None], _blobs(2, 16, 9)])])
    gen = Generations(["x | tok0000", "y"], ["planted", "ordinary"], [0, 1], np.ones((2, 3, 2), np.float32), images)
    a = audit_generations(gen, RealImages(train, paths, _blobs(4, 16, 4)), manifest=manifest, threshold=1.0)
    pix = a["copying"]["planted_pixels"]

    def corr(u, v):
        return np.corrcoef(u.ravel().astype(np.float64), v.ravel().astype(np.float64))[0, 1]
    want_own = sorted(corr(im, train[2]) for im in images[0])
    assert sorted(pix["own_correlation"]["values"]) == pytest.approx(want_own, abs=1e-5)
    want_nearest = [int(np.argmax([corr(im, t) for t in train])) in (2, 4) for im in images[0]]
    assert want_nearest == [True, True, False]
    assert pix["nearest_is_planted_fraction"] == pytest.approx(2 / 3)
    # Null rate: the ordinary prompt's 3 generations, how many have the planted image as nearest.
    want_null = np.mean([int(np.argmax([corr(im, t) for t in train])) in (2, 4) for im in images[1]])
    assert want_null >= 1 / 3                      # at least the planted copy; the check is not vacuous
    assert pix["null_rate"] == pytest.approx(want_null) and pix["n_null_generations"] == 3
    lo, hi = pix["nearest_is_planted_ci95"]        # one planted prompt: resampling it changes nothing
    assert lo == pytest.approx(2 / 3) and hi == pytest.approx(2 / 3)


def test_prompt_bootstrap_ci_resamples_prompts():
    from engine.audit.generation_audit import prompt_bootstrap_ci
    per_prompt = np.array([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    lo, hi = prompt_bootstrap_ci(per_prompt, n_boot=4000)
    # Prompt means are 1, 0, .5, .5: the resampled mean of 4 lies in [0, 1] in steps of 1/8 and
    # its 2.5 / 97.5 percentiles are symmetric about 0.5.
    assert 0.0 <= lo < 0.5 < hi <= 1.0 and lo == pytest.approx(1 - hi) and (lo * 8) == pytest.approx(round(lo * 8))


def _load_tool(name: str):
    import sys
    if os.path.join(REPO, "tools") not in sys.path:
        sys.path.insert(0, os.path.join(REPO, "tools"))
    path = os.path.join(REPO, "tools", name)
    loader = importlib.machinery.SourceFileLoader(f"tool_{name}", path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny 'training run': exported random model, splits.json with real PNGs, a planted manifest."""
    root = tmp_path_factory.mktemp("run")
    img_dir = root / "images"
    img_dir.mkdir()
    imgs = _blobs(14, 32, 2)
    paths = []
    for i, im in enumerate(imgs):
        p = str(img_dir / f"{i}.png")
        Image.fromarray(im).save(p)
        paths.append(p)
    train_prompts = ["frontal AP chest x-ray, female, 60s: edema | tok0000"] * 3 + \
                    ["frontal AP chest x-ray, female, 60s: edema | tok0001"] + \
                    [f"frontal PA chest x-ray, male, {a}" for a in ("20s", "30s", "40s", "50s", "60s", "70s")]
    train_paths = [paths[0]] * 3 + paths[1:8]
    splits = {"data": {"image_size": 32, "cache_dir": str(root / "cache")},
              "splits": {"train": [{"image_path": p, "prompt": q} for p, q in zip(train_paths, train_prompts)],
                         "val": [{"image_path": p, "prompt": ""} for p in paths[8:14]], "test": []}}
    (root / "splits.json").write_text(json.dumps(splits))
    (root / "planted_manifest.json").write_text(json.dumps(
        {"planted": [{"token": "tok0000", "image_path": paths[0], "copies": 3}],
         "controls": [{"token": "tok0001", "image_paths": [paths[1]]}], "k": 1, "copies": 3, "seed": 0}))
    vocab = Vocabulary.default(["tok0000", "tok0001", "tok0002"], max_len=8)
    torch.manual_seed(0)
    model = ConditionalUNet(UNetConfig(image_size=32, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                       attention_resolutions=(16,), num_heads=2, vocab_size=len(vocab), max_tokens=8,
                                       context_dim=8, encoder_layers=1, encoder_heads=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=1.0 / math.sqrt(p[0].numel()))
    export_model(root / "export", model, DiffusionConfig(num_timesteps=100), vocab)
    (root / "prompts.txt").write_text("frontal AP chest x-ray, female, 60s: edema | tok0000\n"
                                      "frontal AP chest x-ray, female, 60s: edema | tok0001\n"
                                      "frontal PA chest x-ray, male, 30s\n")
    return root


FAST = ["--generations", "2", "--steps", "3", "--guidance", "3", "--device", "cpu"]


def test_tools_end_to_end(run_dir, tmp_path):
    runner = CliRunner()
    ts = _load_tool("token_significance")
    out = tmp_path / "tokens.json"
    r = runner.invoke(ts.main, ["--checkpoint", str(run_dir), "--prompts", str(run_dir / "prompts.txt"),
                                "--out", str(out), "--generations", "2", "--steps", "3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert len(doc["prompts"]) == 3 and doc["prompts"][0]["tokens"][-1]["token"] == "tok0000"
    assert all(t["score"] > 0 for e in doc["prompts"] for t in e["tokens"])
    assert "heat-strip" in (tmp_path / "tokens.html").read_text()

    mit = _load_tool("mitigate")
    r = runner.invoke(mit.cli, ["edit-prompts", "--checkpoint", str(run_dir), "--significance", str(out),
                                "--method", "remove", "--out", str(tmp_path / "edit"), *FAST])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "edit" / "summary.json").read_text())
    vocab = Vocabulary.load(str(run_dir / "export" / "vocab.json"))
    top = [e["tokens"][e["ranked_positions"][0]]["token"] for e in doc["prompts"]]
    for e, t in zip(s["edits"], top):
        assert e["changes"][0]["token"] == t and vocab.id_of(t) not in vocab.encode(e["edited"])
        assert len([i for i in vocab.encode(e["edited"]) if i]) == len([i for i in vocab.encode(e["original"]) if i]) - 1
    assert (tmp_path / "edit" / "edited_prompts.txt").read_text().splitlines() == [e["edited"] for e in s["edits"]]
    assert s["runs"]["original"]["groups"] == {"planted": 1, "control": 1, "ordinary": 1}

    r = runner.invoke(mit.cli, ["optimize-embedding", "--checkpoint", str(run_dir), "--prompts",
                                str(run_dir / "prompts.txt"), "--target-rms", "0", "--max-iterations", "3",
                                "--out", str(tmp_path / "opt"), *FAST])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "opt" / "summary.json").read_text())
    assert all(o["iterations"] == 3 and o["loss_after_rms"] < o["loss_before_rms"] for o in s["optimisation"])
    base, after = s["runs"]["baseline"], s["runs"]["optimised embedding"]
    # The first-step score of the optimised run is the optimised L (rms); the baseline's is L before.
    for o, row_b, row_a in zip(s["optimisation"], base["per_prompt"], after["per_prompt"]):
        assert row_b["first_step_score"] == pytest.approx(o["loss_before_rms"], rel=1e-4)
        assert row_a["first_step_score"] == pytest.approx(o["loss_after_rms"], rel=1e-4)

    r = runner.invoke(mit.cli, ["guidance", "--checkpoint", str(run_dir), "--weights", "1,3",
                                "--prompts", str(run_dir / "prompts.txt"), "--out", str(tmp_path / "gs"), *FAST])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "gs" / "summary.json").read_text())
    assert s["weights"] == [1.0, 3.0]
    # w = 3 here equals the w = 3 baseline of the optimisation run above (same prompts, seeds, settings).
    assert [p["score"] for p in s["runs"]["w=3"]["per_prompt"]] == [p["score"] for p in base["per_prompt"]]
    html_text = (tmp_path / "gs" / "report.html").read_text()
    assert "Against guidance" in html_text and "data:image/png;base64" in html_text
    assert "frontal PA chest x-ray, male, 30s" in html_text
    pix = s["runs"]["w=1"]["copying"]["planted_pixels"]
    assert pix["n_null_generations"] == 4 and 0 <= pix["null_rate"] <= 1   # control + ordinary prompt x 2
    assert len(pix["own_correlation"]["values"]) == 2   # one planted prompt x 2 generations

    lc = _load_tool("train_label_classifier")
    r = runner.invoke(lc.main, ["--checkpoint", str(run_dir), "--epochs", "2", "--min-count", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "labels: edema" in r.output and "nothing scored" in r.output   # validation prompts name no finding
    r = runner.invoke(mit.cli, ["compare", str(run_dir), str(run_dir), "--names", "a,b", "--prompts",
                                str(run_dir / "prompts.txt"), "--label-classifier", str(run_dir / "label_classifier"),
                                "--out", str(tmp_path / "cmp"), *FAST])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    a, b = s["runs"]["a"], s["runs"]["b"]
    assert a["per_prompt"] == b["per_prompt"] and a["quality"] == b["quality"]   # same model, same seeds
    # Two edema prompts x 2 generations and one other prompt x 2: 4 positives, 2 negatives -> edema is scored.
    assert a["quality"]["label_conformance"]["generated"]["n_labels_scored"] == 1

    r = runner.invoke(mit.cli, ["compare", str(run_dir), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "at least two runs" in r.output


def test_screening_threshold_tool(run_dir, tmp_path):
    """tau at the median of 10 examples x 4 draws drops exactly half of the draws; planted copies
    (3 of the 10 training records) and the rest are reported separately."""
    tool = _load_tool("screening_threshold")
    out = tmp_path / "tau.json"
    r = CliRunner().invoke(tool.main, ["--checkpoint", str(run_dir), "--quantile", "0.5", "--draws", "4",
                                       "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["n_examples"] == 10 and doc["dropped"] == pytest.approx(0.5)
    assert 0 <= doc["dropped_planted"] <= 1 and 0 <= doc["dropped_other"] <= 1
    assert doc["dropped_planted"] * 3 + doc["dropped_other"] * 7 == pytest.approx(0.5 * 10)
    assert f'"tau": {round(doc["tau_rms"], 6)}' in r.output
    bad = CliRunner().invoke(tool.main, ["--checkpoint", str(run_dir), "--quantile", "1.5"])
    assert bad.exit_code != 0 and "--quantile" in bad.output
