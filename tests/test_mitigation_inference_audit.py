"""Before/after audit: known-answer checks of the audit numbers, the mitigations' package functions end
to end on a tiny run, and the tools (tools/mitigate, token_significance, screening_threshold, sample,
train_label_classifier) run as subprocesses for their command-line behaviour."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.vocab import Vocabulary
from engine.audit.audit_inputs import load_audit_inputs
from engine.audit.generation_audit import Generations, audit_generations, audit_runs, audit_series
from engine.audit.prompt_lists import load_prompts
from engine.audit.run_data import RealImages, read_manifest
from engine.audit.wen_detector import DetectorSettings
from engine.diffusion.schedule import DiffusionConfig
from engine.mitigation.guidance_sweep import guidance_sweep
from engine.mitigation.prompt_edits import audit_prompt_edits, read_significance
from engine.mitigation.prompt_optimization import audit_optimized_embedding
from engine.mitigation.screening_threshold import load_training_examples, screening_threshold, summary_lines
from engine.mitigation.token_significance import significance_document
from engine.model.export import export_model, load_model
from engine.model.unet import ConditionalUNet, UNetConfig
from engine.reports.comparison_page import write_comparison
from engine.reports.token_significance_page import write_significance

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
    # Paired against the first audit (same prompts, same seeds): every planted prompt went from flagged to
    # not flagged, so the difference is -1 on every resample; the score difference is the exact mean change.
    paired = series[1]["paired_vs_first"]
    assert paired["flagged, planted"]["difference"] == -1.0 and paired["flagged, planted"]["ci95"] == [-1.0, -1.0]
    assert paired["score mean, planted"]["difference"] == pytest.approx((0.2 - 1) * 0.85, abs=1e-6)
    assert paired["nearest is planted (pixels), planted"]["difference"] == 0.0    # same images both times
    assert paired["AUC planted vs control"]["difference"] == 0.0 and paired["AUC planted vs control"]["n_prompts"] == 3
    assert "paired_vs_first" not in series[0]
    assert series[0]["detection"]["planted_flagged"] == {"rate": 1.0, "ci95": pytest.approx([0.342, 1.0], abs=1e-3),
                                                         "k": 2, "n": 2}


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
    gen = Generations(["frontal chest x-ray | tok0000", "lateral chest x-ray"], ["planted", "ordinary"], [0, 1],
                      np.ones((2, 3, 2), np.float32), images)
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


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    """A tool as a user runs it: its own process, this checkout's packages."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


def as_json(obj):
    """`obj` as it reads back from a JSON file (numpy values become plain numbers)."""
    return json.loads(json.dumps(obj, default=lambda v: v.tolist()))


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
SETTINGS = DetectorSettings(generations=2, steps=3, guidance=3.0)


def test_mitigations_end_to_end(run_dir, tmp_path):
    """Token significance -> prompt edits, embedding optimisation and the guidance sweep, each audited
    before/after; tools/token_significance and tools/mitigate guidance run as a user runs them."""
    r = run_tool("token_significance", "--checkpoint", str(run_dir), "--prompts", str(run_dir / "prompts.txt"),
                 "--out", str(tmp_path / "tokens.json"), "--generations", "2", "--steps", "3", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'tokens.json'} and {tmp_path / 'tokens.html'}" in r.stdout
    loaded = load_model(run_dir)
    prompts = load_prompts(str(run_dir / "prompts.txt"))
    doc = read_significance(str(tmp_path / "tokens.json"))
    assert doc == as_json(significance_document(loaded, prompts, steps=3, generations=2, progress=False))
    assert len(doc["prompts"]) == 3 and doc["prompts"][0]["tokens"][-1]["token"] == "tok0000"
    assert all(t["score"] > 0 for e in doc["prompts"] for t in e["tokens"])
    for e in doc["prompts"]:   # ranked by score, highest first, over the prompt's real tokens
        by_position = {t["position"]: t["score"] for t in e["tokens"]}
        assert sorted(e["ranked_positions"]) == sorted(by_position)
        assert [by_position[i] for i in e["ranked_positions"]] == sorted(by_position.values(), reverse=True)
    assert "heat-strip" in (tmp_path / "tokens.html").read_text()
    write_significance(str(tmp_path / "again" / "tokens.json"), doc)
    assert (tmp_path / "again" / "tokens.html").read_text() == (tmp_path / "tokens.html").read_text()

    no_prompts = load_audit_inputs(str(run_dir), need_prompts=False)
    edit = audit_prompt_edits(loaded, doc, "tokens.json", no_prompts, SETTINGS, str(tmp_path / "edit"), method="remove")
    vocab = Vocabulary.load(str(run_dir / "export" / "vocab.json"))
    top = [e["tokens"][e["ranked_positions"][0]]["token"] for e in doc["prompts"]]
    real_tokens = lambda prompt: [i for i in vocab.encode(prompt) if i]  # noqa: E731
    for e, t in zip(edit.summary["edits"], top):
        assert e["changes"][0]["token"] == t and vocab.id_of(t) not in vocab.encode(e["edited"])
        assert len(real_tokens(e["edited"])) == len(real_tokens(e["original"])) - 1
    edited = (tmp_path / "edit" / "edited_prompts.txt").read_text().splitlines()
    assert edited == [e["edited"] for e in edit.summary["edits"]]
    assert edit.audits[0]["groups"] == {"planted": 1, "control": 1, "ordinary": 1}
    assert edit.audits[1]["groups"] == edit.audits[0]["groups"]   # the truth follows the original prompts

    inputs = load_audit_inputs(str(run_dir), prompts_file=str(run_dir / "prompts.txt"))
    opt = audit_optimized_embedding(loaded, inputs, SETTINGS, str(tmp_path / "opt"), target_rms=0.0, max_iterations=3)
    stats = opt.summary["optimisation"]
    assert all(o["iterations"] == 3 and o["loss_after_rms"] < o["loss_before_rms"] for o in stats)
    base, after = opt.audits
    # The first-step score of the optimised run is the optimised L (rms); the baseline's is L before.
    for o, row_b, row_a in zip(stats, base["per_prompt"], after["per_prompt"]):
        assert row_b["first_step_score"] == pytest.approx(o["loss_before_rms"], rel=1e-4)
        assert row_a["first_step_score"] == pytest.approx(o["loss_after_rms"], rel=1e-4)
    assert after["detection"]["threshold"] == base["detection"]["threshold"]   # one threshold for both

    r = run_tool("mitigate", "guidance", "--checkpoint", str(run_dir), "--weights", "1,3",
                 "--prompts", str(run_dir / "prompts.txt"), "--out", str(tmp_path / "gs"), *FAST)
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'gs'}/report.html and {tmp_path / 'gs'}/summary.json" in r.stdout
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
    sweep = guidance_sweep(loaded, inputs, SETTINGS, [1.0, 3.0], str(tmp_path / "gs"))   # resumes: nothing rescanned
    assert as_json(sweep.audits) == list(s["runs"].values())
    write_comparison(str(tmp_path / "opt"), opt)
    assert "Against guidance" not in (tmp_path / "opt" / "report.html").read_text()


def test_run_comparison_with_label_classifier(run_dir, tmp_path):
    r = run_tool("train_label_classifier", "--checkpoint", str(run_dir), "--out", str(tmp_path / "lc"), "--epochs", "2",
                 "--min-count", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "labels: edema" in r.stdout and "nothing scored" in r.stdout   # validation prompts name no finding
    inputs = load_audit_inputs(str(run_dir), prompts_file=str(run_dir / "prompts.txt"),
                               label_classifier=str(tmp_path / "lc"))
    cmp = audit_runs([str(run_dir), str(run_dir)], ["a", "b"], inputs, SETTINGS, str(tmp_path / "cmp"))
    a, b = cmp.audits
    assert a["per_prompt"] == b["per_prompt"] and a["quality"] == b["quality"]   # same model, same seeds
    # Two edema prompts x 2 generations and one other prompt x 2: 4 positives, 2 negatives -> edema is scored.
    assert a["quality"]["label_conformance"]["generated"]["n_labels_scored"] == 1
    assert cmp.summary == {"runs_paths": [str(run_dir), str(run_dir)]}

    r = run_tool("mitigate", "compare", str(run_dir), "--out", str(tmp_path / "x"))
    assert r.returncode != 0 and "at least two runs" in r.stderr


def test_screening_threshold(run_dir, tmp_path):
    """tau at the median of 10 examples x 4 draws drops exactly half of the draws; planted copies
    (3 of the 10 training records) and the rest are reported separately."""
    loaded = load_model(run_dir)
    examples = load_training_examples(str(run_dir), loaded.vocab)
    doc = screening_threshold(loaded, examples, read_manifest(str(run_dir)), checkpoint=str(run_dir), quantile=0.5,
                              draws=4)
    assert doc["n_examples"] == 10 and doc["dropped"] == pytest.approx(0.5)
    assert 0 <= doc["dropped_planted"] <= 1 and 0 <= doc["dropped_other"] <= 1
    assert doc["dropped_planted"] * 3 + doc["dropped_other"] * 7 == pytest.approx(0.5 * 10)
    bands = doc["per_t_band"]
    assert [b["t"] for b in bands] == [[0, 20], [20, 40], [40, 60], [60, 80], [80, 100]]
    assert f'"tau": {round(doc["tau_rms"], 6)}' in summary_lines(doc)[0]

    out = tmp_path / "tau.json"
    r = run_tool("screening_threshold", "--checkpoint", str(run_dir), "--quantile", "0.5", "--draws", "4",
                 "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == as_json(doc)
    assert r.stdout.splitlines() == summary_lines(doc) + [f"wrote {out}"]
    bad = run_tool("screening_threshold", "--checkpoint", str(run_dir), "--quantile", "1.5")
    assert bad.returncode != 0 and "--quantile" in bad.stderr


def test_sample_tool_writes_images_named_by_their_seeds(run_dir, tmp_path):
    """tools/sample: --prompt texts first, then the file's lines (#comments skipped, repeats kept);
    image k of prompt i has seed 5 + 2 i + k, named in its file; a bad prompt names its line."""
    (tmp_path / "p.txt").write_text("# a comment\nfrontal PA chest x-ray, male, 30s\n\n"
                                    "frontal PA chest x-ray, male, 30s\n")
    r = run_tool("sample", "--checkpoint", str(run_dir), "--prompt", "lateral chest x-ray", "--prompts",
                 str(tmp_path / "p.txt"), "-n", "2", "--seed", "5", "--steps", "2", "-w", "1", "-w", "3",
                 "--out", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert [(m["prompt"], m["seed"], m["guidance"]) for m in index] == [
        (p, s, w) for w in (1.0, 3.0) for p, seeds in (("lateral chest x-ray", (5, 6)),
                                                       ("frontal PA chest x-ray, male, 30s", (7, 8)),
                                                       ("frontal PA chest x-ray, male, 30s", (9, 10))) for s in seeds]
    assert (tmp_path / "s" / "p002_s10_w3.png").is_file() and (tmp_path / "s" / "grid.png").is_file()
    (tmp_path / "bad.txt").write_text("frontal PA chest x-ray, male, 30s\nfrontal chest x-ray: headache\n")
    r = run_tool("sample", "--checkpoint", str(run_dir), "--prompts", str(tmp_path / "bad.txt"),
                 "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and f"{tmp_path / 'bad.txt'}:2:" in r.stderr and "headache" in r.stderr
