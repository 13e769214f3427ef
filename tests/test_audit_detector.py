"""The batched Wen detector and the resumable scanner against slow, explicit references."""
import math

import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.vocab import NULL_ID, PAD_ID, Vocabulary
from engine.audit.planted_truth import prompt_groups
from engine.audit.prompt_lists import PromptList, load_prompts
from engine.audit.scan import scan_prompts
from engine.audit.wen_detector import DetectorSettings, detect, first_step_score, mean_score
from engine.diffusion.sampling import timestep_sequence
from engine.diffusion.schedule import DiffusionConfig
from engine.diffusion.seeds import prompt_seeds
from engine.model.export import export_model, load_model
from engine.model.unet import ConditionalUNet, UNetConfig

VOCAB = Vocabulary.default(extra_tokens=("tok0001", "tok0002"))
PROMPTS = ["frontal AP chest x-ray, female, 60s: pleural effusion", "frontal PA chest x-ray, male, 30s",
           "frontal AP chest x-ray, male, 70s: cardiomegaly, support devices | tok0001",
           "frontal PA chest x-ray, female, 20s | tok0002", "frontal AP chest x-ray, male, 50s: edema"]


def tiny_model(seed: int = 0) -> ConditionalUNet:
    torch.manual_seed(seed)
    cfg = UNetConfig(image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_heads=2, vocab_size=len(VOCAB), max_tokens=VOCAB.max_len,
                     context_dim=16, encoder_layers=1, encoder_heads=2)
    model = ConditionalUNet(cfg)
    with torch.no_grad():  # zero-initialised output layers would make cond == uncond: randomise all
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    export_model(out, tiny_model(), DiffusionConfig(num_timesteps=100), VOCAB)
    return load_model(out)


def slow_reference(model, schedule, tokens, seed, generations, steps, guidance):
    """Separate cond and uncond forwards, explicit DDIM (eta 0, x0 clipped) and an explicit norm."""
    noise = torch.randn((generations, 1, 16, 16), generator=torch.Generator().manual_seed(seed))
    null = torch.full_like(tokens, PAD_ID)
    null[0] = NULL_ID
    abar = schedule.alphas_cumprod
    ts = timestep_sequence(schedule, steps).tolist()
    raw = torch.zeros(generations, steps, dtype=torch.float64)
    for g in range(generations):
        x = noise[g:g + 1].double()
        for i, t in enumerate(ts):
            tt = torch.tensor([t])
            with torch.no_grad():
                e_c = model(x.float(), tt, tokens[None]).double()
                e_u = model(x.float(), tt, null[None]).double()
            raw[g, i] = math.sqrt(float(((e_c - e_u) ** 2).sum()))
            eps = e_u + guidance * (e_c - e_u)
            a_t = float(abar[t])
            a_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)   # eps kept
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return raw


def test_batched_detector_equals_slow_reference(loaded):
    settings = DetectorSettings(generations=2, steps=4, guidance=7.5, base_seed=10)
    tokens = VOCAB.encode_batch(PROMPTS[:3])
    seeds = prompt_seeds([0, 1, 2], settings.base_seed)
    assert seeds == [10, 11, 12]
    det = detect(loaded.model, loaded.schedule, tokens, seeds, settings, image_shape=(1, 16, 16))
    assert det.norms_raw.shape == (3, 2, 4)
    refs = []
    for p in range(3):
        ref = slow_reference(loaded.model, loaded.schedule, tokens[p], seeds[p], 2, 4, 7.5)
        torch.testing.assert_close(det.norms_raw[p].double(), ref, rtol=2e-4, atol=1e-5)
        torch.testing.assert_close(det.norms_rms[p].double(), ref / 16, rtol=2e-4, atol=1e-6)
        refs.append(ref.tolist())                      # [generation][step] from the slow path
    assert float(det.norms_raw.min()) > 0  # the comparison is not of zeros
    # Scores against the slow path's numbers, averaged by hand: Wen's d(p) = mean over generations
    # and steps; the first-step score; a window of steps 1..2.
    for p, ref in enumerate(refs):
        assert float(mean_score(det.norms_raw)[p]) == pytest.approx(sum(map(sum, ref)) / 8, rel=2e-4)
        assert float(first_step_score(det.norms_raw)[p]) == pytest.approx((ref[0][0] + ref[1][0]) / 2, rel=2e-4)
        assert float(mean_score(det.norms_raw, (1, 3))[p]) == pytest.approx(
            (ref[0][1] + ref[0][2] + ref[1][1] + ref[1][2]) / 4, rel=2e-4)


def test_prompts_batched_together_score_as_alone(loaded):
    settings = DetectorSettings(generations=2, steps=3)
    tokens = VOCAB.encode_batch(PROMPTS)
    seeds = prompt_seeds(range(5), 0)
    together = detect(loaded.model, loaded.schedule, tokens, seeds, settings, image_shape=(1, 16, 16))
    for p in (0, 3):
        alone = detect(loaded.model, loaded.schedule, tokens[p:p + 1], seeds[p:p + 1], settings,
                       image_shape=(1, 16, 16))
        torch.testing.assert_close(together.norms_raw[p:p + 1], alone.norms_raw, rtol=1e-4, atol=1e-6)


class Interrupt(Exception):
    pass


def test_scan_resume_gives_exactly_the_uninterrupted_rows(loaded, tmp_path):
    settings = DetectorSettings(generations=2, steps=3)
    plist = PromptList(PROMPTS, [f"p:{i}" for i in range(5)], [3, 1, 30, 30, 1])
    full = scan_prompts(loaded, plist, str(tmp_path / "full.parquet"), settings, batch_prompts=2, progress=False)

    out = str(tmp_path / "resumed.parquet")

    def stop_after_first_batch(n_done):
        raise Interrupt

    with pytest.raises(Interrupt):
        scan_prompts(loaded, plist, out, settings, batch_prompts=2, progress=False, on_batch=stop_after_first_batch)
    assert len(list((tmp_path / "resumed.parquet.parts").glob("part-*.parquet"))) == 1
    resumed = scan_prompts(loaded, plist, out, settings, batch_prompts=2, progress=False)
    assert resumed.n_scanned_now == 3
    a, b = full.table.to_pylist(), pq.read_table(out).to_pylist()
    assert [r["prompt_index"] for r in b] == [0, 1, 2, 3, 4]
    assert a == b
    assert not (tmp_path / "resumed.parquet.parts").exists()
    # A rerun on a finished output scans nothing; other settings are refused with a one-line error.
    assert scan_prompts(loaded, plist, out, settings, batch_prompts=3, progress=False).n_scanned_now == 0
    with pytest.raises(ValueError, match="steps"):
        scan_prompts(loaded, plist, out, DetectorSettings(generations=2, steps=4), progress=False)


def test_scan_flags_and_groups(loaded, tmp_path):
    settings = DetectorSettings(generations=1, steps=2)
    plist = PromptList(PROMPTS, [f"p:{i}" for i in range(5)])
    manifest = {"planted": [{"token": "tok0001"}], "controls": [{"token": "tok0002"}]}
    groups = prompt_groups(PROMPTS, manifest)
    assert groups == ["ordinary", "ordinary", "planted", "control", "ordinary"]
    res = scan_prompts(loaded, plist, str(tmp_path / "s.parquet"), settings, progress=False, groups=groups,
                       threshold=0.0, csv_too=True)
    rows = res.table.to_pylist()
    scores = [r["score"] for r in rows]
    median = sorted(scores)[2]
    res = scan_prompts(loaded, plist, str(tmp_path / "s.parquet"), settings, progress=False, threshold=median)
    assert [r["flagged"] for r in res.table.to_pylist()] == [s > median for s in scores]
    assert (tmp_path / "s.csv").exists()


def test_prompt_file_errors_name_file_and_line(tmp_path, loaded):
    f = tmp_path / "prompts.txt"
    f.write_text("frontal AP chest x-ray\n\nfrontal AP chest x-ray, purple dragon\nfrontal AP chest x-ray\n")
    plist = load_prompts(str(f))
    assert plist.prompts == ["frontal AP chest x-ray", "frontal AP chest x-ray, purple dragon"]
    assert plist.duplicates_dropped == 1
    with pytest.raises(ValueError, match=r"prompts.txt:3"):
        scan_prompts(loaded, plist, str(tmp_path / "x.parquet"), DetectorSettings(steps=1), progress=False)
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "frontal AP chest x-ray"}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: no string key 'prompt'"):
        load_prompts(str(j))


def test_validation_report_numbers_and_escaping(loaded, tmp_path):
    import json

    import numpy as np
    import pyarrow as pa

    from engine.audit.clip_embedding import ClipSpec
    from engine.audit.copy_detection import CopyDetectorConfig, train_copy_detector
    from engine.audit.run_data import TrainingImages
    from engine.audit.validation import ValidationOptions, regenerate, validate
    from engine.reports.audit_report import write_report

    settings = DetectorSettings(generations=2, steps=2)
    plist = PromptList(PROMPTS, [f"p:{i}" for i in range(5)])
    manifest = {"planted": [{"token": "tok0001", "image_path": "img3"}], "controls": [{"token": "tok0002"}]}
    table = scan_prompts(loaded, plist, str(tmp_path / "s.parquet"), settings, progress=False,
                         groups=prompt_groups(PROMPTS, manifest)).table
    evil = "frontal chest x-ray | <script>alert(1)</script> tok0001"   # in the grammar: planted ground truth parses it
    prompts = table.column("prompt").to_pylist()
    prompts[2] = evil
    table = table.set_column(table.column_names.index("prompt"), "prompt", pa.array(prompts))
    rng = np.random.default_rng(0)
    train = TrainingImages(rng.integers(0, 256, (20, 16, 16), dtype=np.uint8), ["x"] * 20,
                           [f"img{i}" for i in range(20)])
    detector = train_copy_detector(train.images, train.images[:6], CopyDetectorConfig(backbone="tiny", epochs=1,
                                                                                        batch_size=8), progress=False)
    opts = ValidationOptions(top_k=2, bottom_k=2, spread=5, bootstrap=50, clip=ClipSpec("memdiff-tiny"),
                             cache_dir=str(tmp_path / "cache"))
    heldout = rng.integers(0, 256, (8, 16, 16), dtype=np.uint8)
    result = validate(loaded, table, train, manifest=manifest, copy_detector=detector, opts=opts, heldout=heldout,
                      progress=False)
    html_path, json_path = write_report(result, str(tmp_path / "report"))
    page = open(html_path).read()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    numbers = json.load(open(json_path))
    assert numbers["regenerated_score_max_abs_diff"] < 1e-5         # same seeds reproduce the scan
    assert set(numbers["spearman_score_vs_nearest_similarity"]) == {
        "pixel_correlation", "ssim", "clip_cosine", "dar_correlation"}
    assert numbers["roc"] == {}            # one planted prompt, one control: too few for an AUC, none is made up
    assert 0 <= numbers["dar"]["copy_fraction"] <= 1 and numbers["planted"]["n_planted_prompts"] == 1
    # The reported nearest pixel correlation of a prompt is the brute-force maximum over its generations.
    entry = numbers["prompts"][0]
    gen = result.generated[0].reshape(2, -1).astype(np.float64)
    brute = max(np.corrcoef(g, t.ravel().astype(np.float64))[0, 1] for g in gen for t in train.images)
    assert entry["neighbors"]["pixel_correlation"]["nearest"] == pytest.approx(brute, abs=1e-5)
    # Score vs copies over ALL scanned prompts, against brute force: Dar's rule on pixels, Spearman, deciles.
    from scipy.stats import spearmanr
    flat = lambda a: a.reshape(len(a), -1).astype(np.float64)  # noqa: E731
    corr = lambda a, b: np.corrcoef(flat(a), flat(b))[:len(a), len(a):]  # noqa: E731
    threshold = np.percentile(corr(train.images, heldout).max(1), 95)
    sv = numbers["score_vs_copies"]
    assert sv["copy_threshold"] == pytest.approx(threshold, abs=1e-5) and sv["n_prompts"] == 5
    assert sv["selection_max_abs_pixel_diff"] == 0 and sv["generations_source"] == "made again from the scan's seeds"
    everything, _ = regenerate(loaded, table, list(range(5)), opts, progress=False)
    from data_pipeline.images import to_uint8
    gens = to_uint8(everything)
    nearest = np.array([[corr(g[None], train.images).max() for g in row] for row in gens])
    assert sv["spearman_all_prompts"]["rho"] == pytest.approx(
        spearmanr(table.column("score").to_numpy(), nearest.max(1)).statistic)
    assert sv["copy_rate_all"] == pytest.approx((nearest > threshold).mean())
    assert sum(d["n_prompts"] for d in sv["copy_rate_by_score_decile"]) == 5
    assert "Do high scores go with copies?" in page


def test_scan_checkpoint_of_a_run_with_train_prompts(tmp_path):
    """The tool path: a run directory (export/, splits.json, manifest) scanned with --train-prompts."""
    import json

    import numpy as np
    from PIL import Image

    from engine.audit.run_data import split_images
    from engine.audit.scan import scan_checkpoint

    run = tmp_path / "run"
    export_model(run / "export", tiny_model(), DiffusionConfig(num_timesteps=100), VOCAB)
    paths = []
    for i in range(4):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((20, 20), 40 * i, dtype=np.uint8)).save(p)
        paths.append(str(p))
    train = [(paths[0], PROMPTS[0]), (paths[1], PROMPTS[1]), (paths[1], PROMPTS[2]), (paths[1], PROMPTS[2]),
             (paths[2], PROMPTS[3])]
    splits = {"data": {"image_size": 32, "cache_dir": None},
              "splits": {"train": [{"image_path": p, "prompt": t} for p, t in train],
                         "val": [{"image_path": paths[3], "prompt": PROMPTS[4]}]}}
    (run / "splits.json").write_text(json.dumps(splits))
    (run / "planted_manifest.json").write_text(json.dumps(
        {"planted": [{"token": "tok0001", "image_path": paths[1]}], "controls": [{"token": "tok0002"}]}))
    res = scan_checkpoint(str(run), str(tmp_path / "scores.parquet"), DetectorSettings(generations=1, steps=2),
                          train_prompts=True, progress=False, log=lambda m: None)
    rows = res.table.to_pylist()
    assert [(r["prompt"], r["train_count"], r["group"]) for r in rows] == [
        (PROMPTS[0], 1, "ordinary"), (PROMPTS[1], 1, "ordinary"), (PROMPTS[2], 2, "planted"),
        (PROMPTS[3], 1, "control")]
    # one planted prompt and one control: whichever half each lands in, no AUC can be computed, and it says so
    assert set(res.metrics) - {"operating_point"} <= {"score/planted_vs_control", "score/planted_vs_ordinary",
                                                      "first_step_score/planted_vs_control",
                                                      "first_step_score/planted_vs_ordinary"}
    assert all("auc" not in m and m["n_positive"] <= 1 for k, m in res.metrics.items() if k != "operating_point")
    assert json.loads((tmp_path / "scores.metrics.json").read_text())["metrics"] == res.metrics
    images = split_images(str(run), "train", progress=False)
    assert images.image_paths == paths[:3] and images.images.shape == (3, 32, 32)
    assert images.images[1].mean() == pytest.approx(40, abs=1)
    # Validating the scan against another model's run fails before any work (weight fingerprints differ).
    from engine.audit.validation import validate_checkpoint
    export_model(tmp_path / "other" / "export", tiny_model(seed=1), DiffusionConfig(num_timesteps=100), VOCAB)
    with pytest.raises(ValueError, match=r"scores\.parquet: was scanned with another model than .*other"):
        validate_checkpoint(str(tmp_path / "other"), str(tmp_path / "scores.parquet"))


def test_subsample_keeps_ground_truth_prompts():
    from engine.audit.scan import subsample_prompts
    plist = PromptList([f"p{i}" for i in range(10)], [f"f:{i}" for i in range(10)], list(range(10)))
    groups = ["ordinary"] * 10
    groups[7], groups[2] = "planted", "control"
    sub, sub_groups = subsample_prompts(plist, groups, 4, seed=0)
    assert len(sub.prompts) == 4 and {"p2", "p7"} <= set(sub.prompts)
    assert sub.prompts == sorted(sub.prompts, key=lambda p: int(p[1:]))           # original order kept
    assert sub_groups == [groups[int(p[1:])] for p in sub.prompts]
    assert sub.train_counts == [int(p[1:]) for p in sub.prompts]
    assert subsample_prompts(plist, groups, 4, seed=0)[0].prompts == sub.prompts    # deterministic: resumable
