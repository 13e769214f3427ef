"""Memorization detectors (engine.audit.detectors) against slow paths, hand formulas and constructed cases
with a known answer; the null-condition guard (engine.model.null_condition)."""
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from data_pipeline.vocab import NULL_ID, PAD_ID, Vocabulary
from engine.audit.detectors.anisotropy import Anisotropy, low_noise_timestep
from engine.audit.detectors.base import PromptBatch
from engine.audit.detectors.first_step import FirstStepWen
from engine.audit.detectors.generation_spread import GenerationSpread, tiled_distance
from engine.audit.detectors.generations import make_generations
from engine.audit.detectors.nearest_training import NearestNeighbourRatio, NearestTrainingSimilarity, TrainingNeighbours
from engine.audit.detectors.nemo import NemoConsistency, nemo_timestep
from engine.audit.detectors.registry import DETECTORS, applicable
from engine.audit.detectors.wen_trajectory import WenTrajectory
from engine.audit.similarity import ssim_paired, ssim_pairwise
from engine.audit.wen_detector import DetectorSettings, detect
from engine.diffusion.schedule import DiffusionConfig, NoiseSchedule
from engine.diffusion.seeds import prompt_seeds
from engine.model.export import export_model, load_model
from engine.model.null_condition import NullConditionError, refusal_message, require_null_condition
from engine.model.unet import ConditionalUNet, UNetConfig

VOCAB = Vocabulary.default(extra_tokens=("tok0001", "tok0002"))
PROMPTS = ["frontal AP chest x-ray, female, 60s: pleural effusion", "frontal PA chest x-ray, male, 30s",
           "frontal AP chest x-ray, male, 70s: cardiomegaly, support devices | tok0001"]


def tiny_unet(seed: int = 0, size: int = 16) -> ConditionalUNet:
    torch.manual_seed(seed)
    cfg = UNetConfig(image_size=size, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_heads=2, vocab_size=len(VOCAB), max_tokens=VOCAB.max_len,
                     context_dim=16, encoder_layers=1, encoder_heads=2)
    model = ConditionalUNet(cfg)
    with torch.no_grad():  # zero-initialised output layers would make cond == uncond: randomise all
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def export(tmp_path, metadata, parameterization="eps"):
    export_model(tmp_path, tiny_unet(), DiffusionConfig(num_timesteps=100, parameterization=parameterization),
                 VOCAB, metadata=metadata)
    return load_model(tmp_path)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return export(tmp_path_factory.mktemp("export"), {"p_uncond": 0.1})


def batch_of(prompts, base_seed=3):
    return PromptBatch(VOCAB.encode_batch(prompts), prompt_seeds(range(len(prompts)), base_seed))


def null_of(tokens):
    null = torch.full_like(tokens, PAD_ID)
    null[..., 0] = NULL_ID
    return null


# ---- first step ------------------------------------------------------------------------------------

@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_first_step_score_is_the_first_column_of_a_full_scan(tmp_path, parameterization):
    model = export(tmp_path, {"p_uncond": 0.1}, parameterization)
    settings = DetectorSettings(generations=3, steps=5, guidance=7.5, base_seed=3)
    batch = batch_of(PROMPTS)
    one_step = FirstStepWen().score(model, batch, settings)
    full = detect(model.model, model.schedule, batch.tokens, batch.seeds, settings, image_shape=(1, 16, 16),
                  parameterization=parameterization)
    np.testing.assert_allclose(one_step, full.norms_rms[:, :, 0].double().mean(1).numpy(), rtol=1e-5)
    assert FirstStepWen().forwards_per_prompt(settings) == 6


# ---- anisotropy ------------------------------------------------------------------------------------

def test_anisotropy_terms_equal_their_formulas_by_hand(loaded):
    settings = DetectorSettings(generations=2, base_seed=5)
    batch = batch_of(PROMPTS[:2], base_seed=5)
    features = Anisotropy().features(loaded, batch, settings)
    low_t = low_noise_timestep(loaded.schedule)
    assert low_t == round(99 * 2 / 49)                        # third-lowest of 50 steps over T = 100
    model = loaded.model
    for p, seed in enumerate(batch.seeds):
        noise = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(seed))
        norms, cosines = [], []
        for g in range(2):
            x = noise[g:g + 1]
            with torch.no_grad():
                def eps(t, tokens):
                    return model(x, torch.tensor([t]), tokens[None]).double().numpy().ravel()
                high_c, high_u = eps(99, batch.tokens[p]), eps(99, null_of(batch.tokens[p]))
                low_c, low_u = eps(low_t, batch.tokens[p]), eps(low_t, null_of(batch.tokens[p]))
            norms.append(np.sqrt(((high_c - high_u) ** 2).sum() / 256))
            d = low_c - low_u
            cosines.append(d @ low_u / (np.linalg.norm(d) * np.linalg.norm(low_u)))
        np.testing.assert_allclose(features[p], [np.mean(norms), np.mean(cosines)], rtol=2e-4, atol=1e-6)
    assert Anisotropy().forwards_per_prompt(settings) == 8


def test_anisotropy_fit_picks_the_separating_term_and_needs_weights():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(20), np.zeros(80)].astype(bool)
    noise_term = rng.normal(size=100)
    separating = np.where(labels, 1.0, -1.0) + 0.1 * rng.normal(size=100)
    det = Anisotropy()
    # the norm separates perfectly: any added alignment can only tie, so the weight stays 0
    params = det.fit(np.c_[separating, noise_term], labels)
    assert params["weight"] == 0.0 and params["calibration_auc"] == 1.0
    # only the alignment separates (negatively): the fitted weight must be negative and large enough to
    # separate the calibration set, which the norm alone does not
    params = det.fit(np.c_[noise_term, -separating], labels)
    assert params["weight"] < -1.0 and params["calibration_auc"] == 1.0
    from engine.audit.roc import roc_metrics
    assert roc_metrics(noise_term[labels], noise_term[~labels]).auc < 0.8
    combined = det.combine(np.c_[noise_term, -separating], params)
    z = (np.c_[noise_term, -separating] - params["mean"]) / params["std"]
    np.testing.assert_allclose(combined, z[:, 0] + params["weight"] * z[:, 1])
    with pytest.raises(ValueError, match="fitted on a calibration set"):
        det.score(None, batch_of(PROMPTS[:1]), DetectorSettings())
    with pytest.raises(ValueError, match="need memorized and non-memorized"):
        det.fit(np.c_[noise_term, noise_term], np.ones(100, bool))


# ---- NeMo ------------------------------------------------------------------------------------------

class ToyModel(nn.Module):
    """Conditional prediction eps(x, y) = x - template for prompts carrying tok0001 (delta = eps - x is the
    same for every seed: a memorized prompt), and eps = x + x**2 otherwise (delta follows the seed)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
        self.template = (torch.exp(-(xx ** 2 + yy ** 2) * 3) + 0.3 * xx)[None]

    def encode(self, tokens):
        memorized = (tokens == VOCAB.id_of("tok0001")).any(1).float()
        return memorized[:, None, None].expand(-1, tokens.shape[1], 1), tokens != PAD_ID

    def denoise(self, x, t, context, mask):
        memorized = context[:, 0, 0].reshape(-1, 1, 1, 1)
        return memorized * (x - self.template) + (1 - memorized) * (x + x ** 2)


def toy_loaded():
    return SimpleNamespace(model=ToyModel(), schedule=NoiseSchedule("linear", 100),
                           unet_config=SimpleNamespace(in_channels=1, image_size=16),
                           diffusion_config=DiffusionConfig(num_timesteps=100), metadata={"p_uncond": 0.0})


def test_nemo_is_maximal_for_a_seed_independent_prediction():
    settings = DetectorSettings(generations=4, base_seed=0)
    scores = NemoConsistency().score(toy_loaded(), batch_of(PROMPTS), settings)
    assert scores[2] == pytest.approx(1.0, abs=1e-9)          # the memorized prompt: identical deltas
    assert scores[0] < 0.5 and scores[1] < 0.5                # deltas that follow the seed
    assert nemo_timestep(NoiseSchedule("linear", 1000)) == 979
    with pytest.raises(ValueError, match="at least 2 generations"):
        NemoConsistency().score(toy_loaded(), batch_of(PROMPTS), DetectorSettings(generations=1))


def test_nemo_on_a_unet_equals_an_explicit_pairwise_ssim(loaded):
    settings = DetectorSettings(generations=3, base_seed=1)
    batch = batch_of(PROMPTS[:2], base_seed=1)
    scores = NemoConsistency().score(loaded, batch, settings)
    t = nemo_timestep(loaded.schedule)
    for p, seed in enumerate(batch.seeds):
        x = torch.randn((3, 1, 16, 16), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            delta = (loaded.model(x, torch.full((3,), t), batch.tokens[p].expand(3, -1)) - x).double()
        scaled = [(d - d.min()) / (d.max() - d.min()) * 2 - 1 for d in delta[:, 0]]
        pairs = [float(ssim_pairwise(scaled[i][None], scaled[j][None])[0, 0])
                 for i, j in itertools.combinations(range(3), 2)]
        assert scores[p] == pytest.approx(np.mean(pairs), abs=1e-5)


def test_ssim_paired_is_the_diagonal_of_ssim_pairwise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand((5, 12, 12), generator=g) * 2 - 1, torch.rand((5, 12, 12), generator=g) * 2 - 1
    torch.testing.assert_close(ssim_paired(a, b), torch.diagonal(ssim_pairwise(a, b)))


# ---- generation-based ------------------------------------------------------------------------------

def test_tiled_distance_is_the_worst_tile():
    a = torch.zeros(1, 1, 8, 10)
    b = a.clone()
    b[..., 6:8, 2] = 1.0                                      # 2 of the 6 pixels of tile rows 6:8, cols 2:5
    rows, cols = [0, 2, 4, 6, 8], [0, 2, 5, 8, 10]            # edges at round(k * size / 4)
    expected = max(float(((a - b)[..., rows[r]:rows[r + 1], cols[c]:cols[c + 1]] ** 2).mean().sqrt())
                   for r in range(4) for c in range(4))
    assert float(tiled_distance(a, b)[0]) == pytest.approx(expected)
    assert expected == pytest.approx(math.sqrt(2 / 6))


def test_generation_spread_prefers_collapsed_generations():
    g = torch.Generator().manual_seed(0)
    one = torch.rand((1, 1, 1, 16, 16), generator=g) * 2 - 1
    gens = torch.cat([one.expand(1, 4, 1, 16, 16), torch.rand((1, 4, 1, 16, 16), generator=g) * 2 - 1])
    batch = PromptBatch(VOCAB.encode_batch(PROMPTS[:2]), [0, 1], generations=gens)
    scores = GenerationSpread().score(None, batch, DetectorSettings())
    assert scores[0] == 0.0 and scores[1] < -0.3
    slow = -np.mean([float(tiled_distance(gens[1, i:i + 1], gens[1, j:j + 1])[0])
                     for i, j in itertools.combinations(range(4), 2)])
    assert scores[1] == pytest.approx(slow)


def test_nearest_training_detectors_against_brute_force():
    rng = np.random.default_rng(0)
    train_u8 = rng.integers(0, 256, (30, 12, 12), dtype=np.uint8)
    train = TrainingNeighbours(train_u8, [f"img{i}.png" for i in range(30)])
    train_x = train_u8.reshape(30, -1) / 127.5 - 1
    gens = torch.rand((3, 2, 1, 12, 12), generator=torch.Generator().manual_seed(1)) * 2 - 1
    gens[0, 0, 0] = torch.from_numpy(train_x[7].reshape(12, 12)).float()     # an exact copy of image 7
    batch = PromptBatch(VOCAB.encode_batch(PROMPTS), [0, 1, 2], generations=gens)
    sim = NearestTrainingSimilarity().score(None, batch, DetectorSettings(), train=train)
    ratio = NearestNeighbourRatio().score(None, batch, DetectorSettings(), train=train)
    for p in range(3):
        corr, ratios = [], []
        for g in range(2):
            x = gens[p, g].double().numpy().ravel()
            corr.append(max(np.corrcoef(x, t)[0, 1] for t in train_x))
            d = np.sort(np.linalg.norm(train_x - x, axis=1))
            ratios.append(d[0] / d[1])
        assert sim[p] == pytest.approx(np.mean(corr), abs=1e-5)
        assert ratio[p] == pytest.approx(-np.mean(ratios), abs=1e-4)
    assert ratio[0] > ratio[1] and sim[0] > sim[1]            # the copy: ratio 0 and correlation 1 for one generation
    with pytest.raises(ValueError, match="needs the training images"):
        NearestTrainingSimilarity().score(None, batch, DetectorSettings())


def test_generations_are_the_scans_images_and_wen_trajectory_its_score(loaded):
    settings = DetectorSettings(generations=2, steps=3, guidance=7.5, base_seed=4)
    tokens = VOCAB.encode_batch(PROMPTS[:2])
    seeds = prompt_seeds(range(2), 4)
    guided = make_generations(loaded, tokens, seeds, settings, record_norms=True)
    det = detect(loaded.model, loaded.schedule, tokens, seeds, settings, image_shape=(1, 16, 16), keep_images=True)
    torch.testing.assert_close(guided.generations, det.images)
    np.testing.assert_allclose(WenTrajectory().score(loaded, guided, settings),
                               det.norms_rms.double().mean(dim=(1, 2)).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="uses the null condition"):
        make_generations(loaded, tokens, seeds, settings, record_norms=False)
    plain = make_generations(loaded, tokens, seeds, DetectorSettings(generations=2, steps=3, guidance=1.0,
                                                                     base_seed=4), record_norms=False)
    assert plain.trajectory_norms is None and plain.generations.shape == (2, 2, 1, 16, 16)
    # conditional-only sampling is the w = 1 guided step (identical branches): same images as detect at w = 1
    det1 = detect(loaded.model, loaded.schedule, tokens, seeds, DetectorSettings(generations=2, steps=3, guidance=1.0),
                  image_shape=(1, 16, 16), keep_images=True)
    torch.testing.assert_close(plain.generations, det1.images, rtol=1e-4, atol=1e-5)


# ---- the guard -------------------------------------------------------------------------------------

def test_guard_refuses_a_model_trained_without_the_null_condition(tmp_path):
    no_cfg = export(tmp_path / "nocfg", {"p_uncond": 0.0})
    with pytest.raises(NullConditionError) as info:
        require_null_condition(no_cfg, "Wen's score")
    message = str(info.value)
    assert message == (f"{no_cfg.path}: Wen's score needs the null condition, but this model was trained with "
                       f"conditioning.p_uncond = 0 (its null prompt was never trained); use a detector that needs "
                       f"no null condition (tools/benchmark_detectors lists them) or --force to proceed anyway")
    assert message == refusal_message(no_cfg.path, "Wen's score") and "\n" not in message
    forced = require_null_condition(no_cfg, "Wen's score", force=True)
    assert forced == {"p_uncond": 0.0, "null_condition": "untrained", "forced_without_null_condition": True}
    cfg = export(tmp_path / "cfg", {"p_uncond": 0.5})
    assert require_null_condition(cfg, "x") == {"p_uncond": 0.5, "null_condition": "trained",
                                                "forced_without_null_condition": False}
    old = export(tmp_path / "old", {})
    record = require_null_condition(old, "Wen's score")
    assert record["null_condition"] == "unknown" and "does not record conditioning.p_uncond" in record["note"]
    usable = {name for name, d in DETECTORS.items() if applicable(d, no_cfg)}
    assert usable == {"nemo_consistency", "generation_spread", "nearest_training_similarity", "nn_ratio"}
    assert all(applicable(d, cfg) and applicable(d, old) for d in DETECTORS.values())


# ---- the benchmark ---------------------------------------------------------------------------------

def test_v1_ground_truth_halves_planted_and_controls_and_hashes_ordinary_prompts():
    from engine.audit.detector_benchmark import ground_truth
    manifest = {"seed": 0, "planted": [{"token": f"plant{j:03d}"} for j in range(4)],
                "controls": [{"token": f"ctrl{j:03d}"} for j in range(4)]}
    prompts = ([f"frontal AP chest x-ray, male, 30s | plant{j:03d}" for j in range(4)]
               + [f"frontal PA chest x-ray, {s}, {a} | ctrl{j:03d}" for j in range(4) for s, a in [("male", "20s")]]
               + [f"frontal AP chest x-ray, female, {10 * d}s" for d in range(10)])
    groups = ["planted"] * 4 + ["control"] * 4 + ["ordinary"] * 10
    truth = ground_truth(prompts, groups, manifest)
    assert truth.splits[:8] == ["calibration", "evaluation"] * 4
    assert set(truth.splits[8:]) == {"calibration", "evaluation"}
    assert ground_truth(prompts, groups, manifest).splits == truth.splits       # deterministic


def test_benchmark_evaluates_on_the_evaluation_half_and_fits_on_the_calibration_half(loaded):
    from engine.audit.detector_benchmark import GroundTruth, evaluate, run_detectors
    from engine.audit.intervals import detection_summary
    prompts = [f"frontal AP chest x-ray, {s}, {10 * d}s" for s in ("male", "female") for d in range(10)]
    tokens = VOCAB.encode_batch(prompts)
    settings = DetectorSettings(generations=2, steps=2, guidance=7.5, base_seed=0)
    detectors = [DETECTORS["first_step_wen"], DETECTORS["anisotropy"], DETECTORS["wen_trajectory"]]
    raw = run_detectors(loaded, tokens, settings, detectors, batch_prompts=7, progress=False)
    # ground truth by construction: the 6 prompts with the highest first-step score are "planted"
    first = raw["scores"]["first_step_wen"]
    groups = np.where(np.argsort(np.argsort(-first)) < 6, "planted", "ordinary").tolist()
    splits = ["calibration" if i % 2 == 0 else "evaluation" for i in range(20)]
    records, scores = evaluate(raw, GroundTruth(groups, splits, "test"), detectors, settings, 20, n_boot=200)
    ev = np.array(splits) == "evaluation"
    pos, neg = ev & (np.array(groups) == "planted"), ev & (np.array(groups) != "planted")
    for rec in records:
        want = detection_summary(scores[rec["detector"]][pos], scores[rec["detector"]][neg], n_boot=200)
        assert rec["auc"] == want.auc and rec["auc_ci"] == want.auc_ci and rec["tpr_ci"] == want.tpr_ci
        assert (rec["n_positive"], rec["n_negative"]) == (int(pos.sum()), int(neg.sum()))
        assert {"detector", "auc", "auc_ci", "tpr_at_1pct_fpr", "tpr_ci", "n_positive", "n_negative",
                "forwards_per_prompt", "prompts_per_s", "needs_null_condition"} <= set(rec)
    assert records[0]["auc"] == 1.0                           # planted = top first-step scores, by construction
    fitted = records[1]["fitted_params"]
    cal = ~ev
    assert (fitted["n_positive"], fitted["n_negative"]) == (int((cal & (np.array(groups) == "planted")).sum()),
                                                            int((cal & (np.array(groups) != "planted")).sum()))
    np.testing.assert_allclose(fitted["mean"], raw["features"]["anisotropy"][cal].mean(0))
    assert [r["forwards_per_prompt"] for r in records] == [4, 8, 8]


# ---- exposure --------------------------------------------------------------------------------------

def test_exposure_aggregates_reproduced_training_images_per_image_and_patient(tmp_path):
    import pyarrow.parquet as pq

    from engine.audit.copy_rule import pixel_copy_threshold
    from engine.audit.exposure import exposed_training_images, write_exposure
    from engine.reports.exposure import exposure_section_html
    rng = np.random.default_rng(0)
    train_u8 = rng.integers(0, 256, (10, 12, 12), dtype=np.uint8)
    paths = [f"p{i // 2}/img{i}.png" for i in range(10)]
    train = TrainingNeighbours(train_u8, paths)
    as_model = lambda i: torch.from_numpy(train_u8[i] / 127.5 - 1).float()[None]  # noqa: E731
    gens = torch.rand((3, 2, 1, 12, 12), generator=torch.Generator().manual_seed(2)) * 2 - 1
    gens[0, 0], gens[0, 1], gens[2, 1] = as_model(3), as_model(3) * 0.9, as_model(8)   # image 3 twice, image 8 once
    prompts = ["prompt a", "prompt b", "prompt <c>"]
    rows = exposed_training_images(prompts, gens, train, threshold=0.8,
                                   patient_ids={p: p.split("/")[0] for p in paths})
    assert [(r["image_path"], r["patient_id"], r["times_reproduced"], r["prompts"]) for r in rows] == [
        ("p1/img3.png", "p1", 2, ["prompt a"]), ("p4/img8.png", "p4", 1, ["prompt <c>"])]
    assert rows[0]["max_correlation"] == pytest.approx(1.0, abs=1e-6)
    table = write_exposure(rows, str(tmp_path / "exposure.parquet"), {"threshold": 0.8})
    assert pq.read_table(tmp_path / "exposure.parquet").to_pylist() == table.to_pylist()
    # a scan without a threshold flags nothing: the page must say its prompts are the top-scoring ones
    page = exposure_section_html(rows, {"threshold": 0.8, "n_flagged_prompts": 3, "generations": 2, "prompts_used":
                                        "the 3 top-scoring prompts (the scan has no threshold, so none is flagged)"})
    assert "Prompts: the 3 top-scoring prompts (the scan has no threshold, so none is flagged); 2 generations" in page
    assert "flagged prompts," not in page
    assert "prompt &lt;c&gt;" in page and "<c>" not in page
    # Dar's rule in pixel space: the 95th percentile of the training images' best correlation to held-out ones
    held = rng.integers(0, 256, (4, 12, 12), dtype=np.uint8)
    best = [max(np.corrcoef(t.ravel().astype(float), h.ravel().astype(float))[0, 1] for h in held) for t in train_u8]
    assert pixel_copy_threshold(train_u8, held) == pytest.approx(np.percentile(best, 95), abs=1e-5)


def test_exposure_counts_the_flagged_set_whose_precision_the_report_states():
    """A scan without a threshold flags nothing: the exposure table then takes the prompts that the
    calibration half's threshold flags in the evaluation half, the very set (and as many) whose precision
    flagged_precision states, checked against a selection by hand; with neither, the top-scoring prompts,
    each said so."""
    import pyarrow as pa

    from engine.audit.planted_truth import prompt_splits
    from engine.audit.roc import calibrate_threshold
    from engine.audit.score_vs_copies import flagged_precision
    from engine.audit.validation import ValidationOptions, exposure_prompts
    rng = np.random.default_rng(3)
    prompts = [f"frontal PA chest x-ray, male, {10 * (i % 9 + 1)}s, case {i}" for i in range(120)]
    score = rng.gamma(2.0, 0.01, size=120)
    table = pa.table({"prompt": prompts, "score": score, "flagged": [False] * 120})
    opts = ValidationOptions(top_k=5)
    copies = rng.random((120, 4)) < 0.2
    calibrated = flagged_precision(score, copies.astype(float), prompts, ["ordinary"] * 120, None)
    chosen, which = exposure_prompts(table, opts, calibrated)
    halves = np.array(prompt_splits(prompts, None))
    threshold = calibrate_threshold(score[halves == "calibration"], 0.01)
    by_hand = [i for i in range(120) if halves[i] == "evaluation" and score[i] > threshold]
    assert chosen == by_hand and len(chosen) == calibrated["precision"]["n"] > 0
    assert which.startswith(f"the {len(by_hand)} evaluation-half prompts above the calibration half's threshold")
    top, which = exposure_prompts(table, opts, {"note": "no calibration-half negatives: no threshold"})
    assert top == sorted(range(120), key=lambda i: -score[i])[:5]
    assert which == "the 5 top-scoring prompts (the scan has no threshold, so none is flagged)"
    flagged = table.set_column(2, "flagged", pa.array([i % 7 == 0 for i in range(120)]))
    assert exposure_prompts(flagged, opts, calibrated) == (
        list(range(0, 120, 7)), f"the {len(range(0, 120, 7))} prompts flagged by the scan's threshold")


def test_fastest_batch_picks_the_measured_peak():
    from engine.audit.batch_size import fastest_batch
    # a simulated clock: a call on b prompts costs 1 ms + 0.25 ms per prompt up to 8, then 2 ms + 2 ms per prompt
    now = [0.0]
    cost = lambda b: 0.001 + (0.00025 * b if b <= 8 else 0.002 + 0.002 * b)  # noqa: E731
    calls = []

    def run(b):
        calls.append(b)
        now[0] += cost(b)
    best, rates = fastest_batch(run, n_prompts=100, repeats=2, clock=lambda: now[0])
    assert best == 8
    assert rates[8] == pytest.approx(8 / cost(8)) and rates[16] == pytest.approx(16 / cost(16))
    assert 32 not in rates                                     # stopped once clearly past the peak (16: 44% of 8's)
    assert calls == [b for b in (1, 2, 4, 8, 16) for _ in range(3)]   # a warm-up and 2 timed calls each
    assert set(fastest_batch(lambda b: None, n_prompts=3)[1]) <= {1, 2}


# ---- the scan: guard, fast mode --------------------------------------------------------------------

def make_run(root, p_uncond, n_images=6):
    """A tiny training run at 32 px (the image cache's smallest size): export (with p_uncond recorded),
    splits.json, planted manifest, PNG images."""
    import json

    from PIL import Image
    export_model(root / "export", tiny_unet(size=32), DiffusionConfig(num_timesteps=100), VOCAB,
                 metadata={"p_uncond": p_uncond})
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n_images):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
        paths.append(str(path))
    prompts = [f"frontal AP chest x-ray, {s}, {10 * d}s" for s in ("male", "female") for d in range(1, 10)]
    prompts += [PROMPTS[2], "frontal PA chest x-ray, female, 20s | tok0002"]
    records = [{"image_path": paths[i % (n_images - 1)], "prompt": p, "patient_id": f"pat{i % 3}"}
               for i, p in enumerate(prompts)]
    splits = {"data": {"image_size": 32, "cache_dir": str(root / "cache")},
              "splits": {"train": records, "val": [{"image_path": paths[-1], "prompt": PROMPTS[0]}]}}
    (root / "splits.json").write_text(json.dumps(splits))
    (root / "planted_manifest.json").write_text(json.dumps(
        {"planted": [{"token": "tok0001", "image_path": paths[0]}], "controls": [{"token": "tok0002"}]}))
    return root, prompts


def test_scan_refuses_a_model_without_null_condition_and_force_is_recorded(tmp_path):
    import json

    import pyarrow.parquet as pq

    from engine.audit.scan import scan_checkpoint, scan_metadata
    run, _ = make_run(tmp_path / "run", 0.0)
    settings = DetectorSettings(generations=1, steps=2)
    out = tmp_path / "scores.parquet"
    with pytest.raises(NullConditionError) as info:
        scan_checkpoint(str(run), str(out), settings, train_prompts=True, progress=False, log=lambda m: None)
    assert str(info.value) == refusal_message(load_model(run).path, "Wen's score (tools/scan_memorization)")
    assert not out.exists()                                        # refused before any work
    scan_checkpoint(str(run), str(out), settings, train_prompts=True, force=True, progress=False, log=lambda m: None)
    assert scan_metadata(pq.read_table(out))["null_condition"]["forced_without_null_condition"] is True
    metrics = json.loads((tmp_path / "scores.metrics.json").read_text())
    assert metrics["null_condition"] == {"p_uncond": 0.0, "null_condition": "untrained",
                                         "forced_without_null_condition": True}


def test_fast_scan_confirms_the_top_with_the_full_scans_rows_and_resumes_from_its_journal(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.audit.fast_scan import FAST_PART_SCHEMA, FastSettings, fast_scan_checkpoint
    from engine.audit.scan import model_fingerprint, scan_checkpoint, scan_metadata, write_scan_table
    run, prompts = make_run(tmp_path / "run", 0.5)
    settings = DetectorSettings(generations=2, steps=3, base_seed=7)
    fast = FastSettings("first_step_wen", None, 0.15)
    out = tmp_path / "fast.parquet"
    # a journal left by an interrupted run: prompt 4's stage-1 score was already written (as a sentinel)
    loaded = load_model(run)
    meta = {"model": model_fingerprint(loaded), "settings": settings.to_dict(), "fast": fast.to_dict(),
            "parameterization": "eps", "n_prompts": len(prompts)}
    journal = tmp_path / "fast.parquet.parts"
    journal.mkdir()
    (journal / "fast-meta.json").write_text(json.dumps(meta))
    write_scan_table(pa.table({"prompt_index": [4], "fast_score": [1e6]}, schema=FAST_PART_SCHEMA),
                     str(journal / "fast-000000004.parquet"))
    res = fast_scan_checkpoint(str(run), str(out), settings, fast, train_prompts=True, batch_prompts=5,
                               progress=False, log=lambda m: None)
    rows = res.table.to_pylist()
    assert len(rows) == len(prompts) == 20 and not journal.exists()
    full = scan_checkpoint(str(run), str(tmp_path / "full.parquet"), settings, train_prompts=True, progress=False,
                           log=lambda m: None).table.to_pylist()
    fast_scores = np.array([r["fast_score"] for r in rows])
    expected = np.array([r["first_step_score"] for r in full], np.float64)
    expected[4] = 1e6                                              # the journaled value is used, not recomputed
    np.testing.assert_allclose(fast_scores, expected, rtol=1e-5)
    top = sorted(np.argsort(-fast_scores, kind="stable")[:3].tolist())   # ceil(0.15 * 20) = 3
    assert [r["prompt_index"] for r in rows if r["confirmed"]] == top and 4 in top
    for r in rows:
        if r["confirmed"]:
            # the same seeds as the full scan; only the batch differs (float summation order)
            np.testing.assert_allclose(r["norms_rms"], full[r["prompt_index"]]["norms_rms"], rtol=1e-4)
            assert r["score"] == pytest.approx(full[r["prompt_index"]]["score"], rel=1e-4)
            assert r["seed"] == full[r["prompt_index"]]["seed"] == 7 + r["prompt_index"]
        else:
            assert r["norms_rms"] is None and r["score"] is None and not r["flagged"]
    assert {r["group"] for r in rows} == {"planted", "control", "ordinary"}
    assert scan_metadata(res.table)["null_condition"]["null_condition"] == "trained"
    assert "fast_score/planted_vs_all" not in res.metrics           # one planted prompt: no AUC interval
    assert res.metrics["planted_confirmed"]["n"] == 1
    # finished: a rerun scans nothing and only re-flags
    again = fast_scan_checkpoint(str(run), str(out), settings, fast, train_prompts=True, batch_prompts=5,
                                 threshold=-1.0, progress=False, log=lambda m: None)
    assert again.n_scanned_now == 0
    assert [r["flagged"] for r in again.table.to_pylist()] == [r["confirmed"] for r in rows]
    assert pq.read_table(out).column("flagged").to_pylist() == [r["confirmed"] for r in rows]


def test_validation_guard_and_exposed_training_images_of_flagged_prompts(tmp_path):
    import pyarrow.parquet as pq

    from engine.audit.copy_rule import pixel_copy_threshold
    from engine.audit.run_data import split_images
    from engine.audit.scan import read_scores, scan_checkpoint
    from engine.audit.validation import ValidationOptions, regenerate, validate_checkpoint
    from engine.reports.audit_report import write_report
    run, _ = make_run(tmp_path / "run", 0.0)
    settings = DetectorSettings(generations=2, steps=2)
    scores = tmp_path / "scores.parquet"
    scan_checkpoint(str(run), str(scores), settings, train_prompts=True, threshold=-1.0, force=True, progress=False,
                    log=lambda m: None)                           # threshold -1: every prompt is flagged
    opts = ValidationOptions(top_k=2, bottom_k=2, spread=4, tsne_train=4)
    with pytest.raises(NullConditionError, match="validation .* conditioning.p_uncond = 0"):
        validate_checkpoint(str(run), str(scores), opts=opts, use_clip=False, progress=False)
    result = validate_checkpoint(str(run), str(scores), opts=opts, use_clip=False, force=True, progress=False)
    assert result.numbers["null_condition"]["forced_without_null_condition"] is True
    exposure = result.numbers["exposure"]
    table = read_scores(str(scores))
    train = split_images(str(run), "train", progress=False)
    threshold = pixel_copy_threshold(train.images, split_images(str(run), "val", progress=False).images)
    assert exposure["meta"]["threshold"] == pytest.approx(threshold)
    assert exposure["meta"]["n_flagged_prompts"] == len(table)
    # brute force: every generation's nearest training image by pixel correlation, counted per image above threshold
    images, _ = regenerate(load_model(run), table, list(range(len(table))), opts, progress=False)
    flat = images.reshape(-1, 32 * 32).double().numpy()
    keys = train.images.reshape(len(train.images), -1).astype(np.float64)
    corr = np.array([[np.corrcoef(g, k)[0, 1] for k in keys] for g in flat])
    best, arg = corr.max(1), corr.argmax(1)
    counts = {train.image_paths[i]: int(((arg == i) & (best > threshold)).sum()) for i in set(arg[best > threshold])}
    assert {r["image_path"]: r["times_reproduced"] for r in exposure["rows"]} == counts
    html_path, _ = write_report(result, str(tmp_path / "report"))
    page = open(html_path).read()
    assert "FORCED" in page and "Exposed training images" in page
    written = pq.read_table(tmp_path / "report" / "exposed_training_images.parquet")
    assert written.num_rows == len(exposure["rows"])


def test_sampling_and_token_significance_guard_the_null_condition(tmp_path):
    import json

    from engine.audit.prompt_lists import PromptList
    from engine.mitigation.token_significance import significance_document
    from engine.reports.sample_images import write_samples
    run, _ = make_run(tmp_path / "run", 0.0)
    prompts = PromptList([PROMPTS[0]], ["test"])
    with pytest.raises(NullConditionError, match="sampling at w = 7.5 needs the null condition"):
        write_samples(str(run), prompts, str(tmp_path / "s"), guidance=(1.0, 7.5), steps=1, per_prompt=1,
                      progress=False)
    plain = write_samples(str(run), prompts, str(tmp_path / "s1"), guidance=(1.0,), steps=1, per_prompt=1,
                          progress=False)                        # w = 1: no null branch, no refusal
    assert plain["images"][0]["null_condition"]["null_condition"] == "untrained"
    forced = write_samples(str(run), prompts, str(tmp_path / "s2"), guidance=(3.0,), steps=1, per_prompt=1,
                           force=True, progress=False)
    meta = json.loads((tmp_path / "s2" / (forced["images"][0]["image"][:-4] + ".json")).read_text())
    assert meta["null_condition"]["forced_without_null_condition"] is True
    loaded = load_model(run)
    with pytest.raises(NullConditionError, match="token significance"):
        significance_document(loaded, prompts, steps=1, generations=1, progress=False)
    doc = significance_document(loaded, prompts, steps=1, generations=1, force=True, progress=False)
    assert doc["null_condition"]["forced_without_null_condition"] is True


@pytest.mark.parametrize("tool,args", [
    ("scan_memorization", "--checkpoint {run} --train-prompts --steps 1 --generations 1 --out {tmp}/s.parquet"),
    ("validate_memorization", "--checkpoint {run} --scores {tmp}/none.parquet --out {tmp}/v"),
    ("mitigate", "guidance --checkpoint {run} --steps 1 --generations 1 --out {tmp}/m"),
    ("token_significance", "--checkpoint {run} --prompts {tmp}/p.txt --steps 1 --out {tmp}/t.json"),
    ("sample", "--checkpoint {run} --prompts {tmp}/p.txt -w 7.5 --steps 1 --out {tmp}/x"),
    ("benchmark_similarity", "--checkpoint {run} --no-clip --steps 1 --generations 1 --out {tmp}/b"),
])
def test_every_tool_that_needs_the_null_condition_refuses_a_p_uncond_0_model(tmp_path, tool, args):
    """The command line, as a user meets it: a one-line error naming conditioning.p_uncond, nothing written."""
    import os
    import subprocess
    import sys

    from engine.audit.scan import scan_checkpoint
    run, _ = make_run(tmp_path / "run", 0.0)
    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    if tool == "validate_memorization":      # a forced scan to validate
        scan_checkpoint(str(run), str(tmp_path / "none.parquet"), DetectorSettings(generations=1, steps=1),
                        train_prompts=True, force=True, progress=False, log=lambda m: None)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(repo, "tools", tool), *args.format(run=run, tmp=tmp_path).split()]
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "conditioning.p_uncond = 0" in ln]
    assert len(lines) == 1 and "needs the null condition" in lines[0] and "--force" in lines[0], proc.stderr
    assert not any((tmp_path / name).exists() for name in ("s.parquet", "v", "m", "t.json", "x", "b"))


def test_benchmark_checkpoint_end_to_end_on_a_tiny_planted_run(tmp_path):
    """tools/benchmark_detectors' function on a run with 4 planted and 4 control tokens: the contract of
    detectors.json, the per-prompt scores, the ground-truth line and the page."""
    import json

    import pyarrow.parquet as pq
    from PIL import Image

    from engine.audit.detector_benchmark import benchmark_checkpoint
    tokens = [f"plant{j:03d}" for j in range(4)] + [f"ctrl{j:03d}" for j in range(4)]
    vocab = Vocabulary.default(extra_tokens=tokens)
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=32, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                     num_heads=2, vocab_size=len(vocab), max_tokens=vocab.max_len, context_dim=16, encoder_layers=1,
                     encoder_heads=2)
    model = ConditionalUNet(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    run = tmp_path / "run"
    export_model(run / "export", model.eval(), DiffusionConfig(num_timesteps=100), vocab, metadata={"p_uncond": 0.0})
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(paths[-1])
    records = [{"image_path": paths[j], "prompt": f"frontal AP chest x-ray, male, 30s | plant{j:03d}"} for j in range(4)]
    records += [{"image_path": paths[4 + j], "prompt": f"frontal PA chest x-ray, female, {10 * j + 20}s | ctrl{j:03d}"}
                for j in range(4)]
    records += [{"image_path": paths[8 + j % 4], "prompt": f"lateral LL chest x-ray, male, {10 * j}s"} for j in range(8)]
    (run / "splits.json").write_text(json.dumps({"data": {"image_size": 32, "cache_dir": str(run / "cache")},
                                                 "splits": {"train": records, "val": records[:1]}}))
    (run / "planted_manifest.json").write_text(json.dumps({"seed": 0, "planted": [
        {"token": f"plant{j:03d}", "image_path": paths[j]} for j in range(4)], "controls": [
        {"token": f"ctrl{j:03d}"} for j in range(4)]}))
    settings = DetectorSettings(generations=2, steps=2, guidance=7.5)
    result = benchmark_checkpoint(str(run), str(tmp_path / "bench"), settings, n_boot=50, progress=False,
                                  log=lambda m: None)
    from engine.reports.detector_benchmark import write_benchmark_report
    write_benchmark_report(str(tmp_path / "bench"), result["records"], result["meta"])
    written = json.loads((tmp_path / "bench" / "detectors.json").read_text())
    assert [r["detector"] for r in written] == ["nemo_consistency", "generation_spread",
                                                "nearest_training_similarity", "nn_ratio"]   # p_uncond 0
    for r in written:
        assert r["n_positive"] == 2 and r["needs_null_condition"] is False and r["forced_without_null_condition"] is False
        assert 0 <= r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1] <= 1
    assert result["meta"]["settings"]["guidance"] == 1.0          # no null condition: generated at w = 1
    gt = result["meta"]["ground_truth_memorization"]
    assert 0 <= gt["nearest_is_planted_fraction"] <= 1 and gt["null_rate"] is not None
    scores = pq.read_table(tmp_path / "bench" / "scores.parquet").to_pydict()
    assert scores["group"].count("planted") == 4 and len(scores["nn_ratio"]) == 16
    page = (tmp_path / "bench" / "report.html").read_text()
    assert "Did memorization happen?" in page and "nn_ratio" in page
