"""Detection on the evaluation half with intervals, and the operating point set on the calibration half,
checked against counting by hand on a v2 manifest."""
import math

import numpy as np
import pytest

from data_pipeline.config_schema import build
from data_pipeline.planted import PlantedConfig, plant_duplicates
from data_pipeline.prompts import prompt_for
from data_pipeline.records import XrayRecord
from engine.audit.detection_metrics import detection_metrics, operating_point
from engine.audit.intervals import auc_interval, proportion_interval
from engine.audit.planted_truth import planted_entry, prompt_group, prompt_split
from engine.audit.roc import roc_metrics


@pytest.fixture(scope="module")
def study():
    rng = np.random.default_rng(0)
    records = [XrayRecord(f"/d/p{p}.jpg", f"p{p}", f"p{p}/1", "synthetic",
                          tuple(f for f in ("edema", "cardiomegaly", "support devices") if rng.random() < 0.4), (),
                          "frontal", "PA", ("male", "female")[p % 2], 20 + p % 70, (math.nan,)) for p in range(700)]
    cfg = build(PlantedConfig, {"k": 4, "copies": [2, 8], "kinds": ["exact", "near"]}, "data.planted")
    out, manifest = plant_duplicates(records, cfg, "/run/p")
    prompts = sorted({prompt_for(r) for r in out})
    groups = [prompt_group(p, manifest) for p in prompts]
    # planted prompts score higher on average, exact more than near; everything noisy
    score = rng.normal(0, 1, len(prompts)) + np.array(
        [{"exact": 2.0, "near": 1.0}[planted_entry(p, manifest).kind] if g == "planted" else 0.0
         for p, g in zip(prompts, groups)])
    return prompts, groups, manifest, score


def test_detection_uses_the_evaluation_half_only(study):
    prompts, groups, manifest, score = study
    halves = [prompt_split(p, manifest) for p in prompts]
    m = detection_metrics({"score": score}, prompts, groups, manifest)
    assert set(m) == {"score/planted_vs_control", "score/planted_vs_ordinary", "score/planted_exact_vs_control",
                      "score/planted_near_vs_control"}
    pick = lambda g, kind=None: np.array([s for s, p, gg, h in zip(score, prompts, groups, halves)  # noqa: E731
                                          if gg == g and h == "evaluation" and
                                          (kind is None or planted_entry(p, manifest).kind == kind)])
    for key, pos, neg in (("planted_vs_control", pick("planted"), pick("control")),
                          ("planted_vs_ordinary", pick("planted"), pick("ordinary")),
                          ("planted_near_vs_control", pick("planted", "near"), pick("control"))):
        got = m[f"score/{key}"]
        assert got["auc"] == pytest.approx(roc_metrics(pos, neg).auc)
        assert got["auc_ci"] == pytest.approx(auc_interval(pos, neg)["ci95"])
        assert (got["n_positive"], got["n_negative"]) == (len(pos), len(neg)) and got["half"] == "evaluation"
        assert got["tpr_ci"][0] <= got["tpr_at_1pct_fpr"] <= got["tpr_ci"][1]
    assert m["score/planted_vs_control"]["n_positive"] == 8         # 16 planted, half of them evaluated


def test_operating_point_threshold_from_calibration_rates_on_evaluation(study):
    prompts, groups, manifest, score = study
    halves = [prompt_split(p, manifest) for p in prompts]
    op = operating_point(score, prompts, groups, manifest, fpr=0.01)
    calibration = np.array([s for s, g, h in zip(score, groups, halves) if g != "planted" and h == "calibration"])
    assert op["n_calibration_negatives"] == len(calibration)
    assert (calibration > op["threshold"]).sum() <= math.floor(0.01 * len(calibration))
    assert (calibration >= op["threshold"]).sum() > math.floor(0.01 * len(calibration))   # the lowest such
    for label, group in (("tpr", "planted"), ("fpr_control", "control"), ("fpr_ordinary", "ordinary")):
        evaluated = np.array([s for s, g, h in zip(score, groups, halves) if g == group and h == "evaluation"])
        k = int((evaluated > op["threshold"]).sum())
        assert (op[label]["k"], op[label]["n"]) == (k, len(evaluated))
        assert op[label]["ci95"] == list(proportion_interval(k, len(evaluated)))


def test_mitigation_calibration_never_sees_the_evaluated_prompts(study, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.mitigation.calibration import calibrate_from_scan
    prompts, groups, manifest, score = study
    first = score * 0.5 + 1.0
    pq.write_table(pa.table({"prompt": prompts, "group": groups, "score": score, "first_step_score": first}),
                   tmp_path / "scores.parquet")
    cal = calibrate_from_scan(str(tmp_path / "scores.parquet"), manifest, ordinary=10)
    halves = {p: prompt_split(p, manifest) for p in prompts}
    group_of = dict(zip(prompts, groups))
    assert {halves[p] for p in cal.prompts} == {"evaluation"}
    chosen = {g: sum(group_of[p] == g for p in cal.prompts) for g in ("planted", "control", "ordinary")}
    assert chosen == {"planted": 8, "control": 8, "ordinary": 10}
    assert cal.prompts == [p for p in prompts if p in set(cal.prompts)]            # scan order kept
    negatives = [s for p, g, s in zip(prompts, groups, score) if g != "planted" and halves[p] == "calibration"]
    assert cal.n_calibration_negatives == len(negatives)
    assert cal.threshold == pytest.approx(sorted(negatives, reverse=True)[math.floor(0.01 * len(negatives))])
    controls = [f for p, g, f in zip(prompts, groups, first) if g == "control" and halves[p] == "calibration"]
    assert cal.target_rms == pytest.approx(np.median(controls)) and cal.n_calibration_controls == 8
