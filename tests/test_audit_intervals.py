"""Intervals on every reported rate (engine/audit/intervals.py) against independent references:
scipy's Wilson interval, sklearn's AUC, DeLong's variance written out pair by pair, the coverage of
the AUC interval on data with a known AUC, and the analytic standard error of a mean."""
import numpy as np
import pytest
from scipy.stats import binomtest, norm, spearmanr
from sklearn.metrics import roc_auc_score

from engine.audit.intervals import (
    auc_interval,
    cluster_bootstrap_mean,
    detection_summary,
    paired_difference,
    proportion_interval,
    spearman_interval,
    tpr_at_fpr_interval,
)
from engine.audit.roc import roc_metrics


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (10, 10), (3, 40), (21, 40), (1, 200)])
def test_wilson_interval_matches_scipy(k, n):
    want = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    got = proportion_interval(k, n)
    assert got == pytest.approx((want.low, want.high), abs=1e-12)


def test_delong_variance_equals_pairwise_formula_with_ties():
    rng = np.random.default_rng(3)
    pos = rng.integers(0, 6, 17).astype(float)      # many ties, within and across groups
    neg = rng.integers(0, 5, 23).astype(float)
    got = auc_interval(pos, neg)
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])   # [m, n]
    v10, v01 = psi.mean(1), psi.mean(0)
    var = v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size
    assert got["auc"] == pytest.approx(roc_auc_score(np.r_[np.ones(17), np.zeros(23)], np.r_[pos, neg]), abs=1e-12)
    assert got["auc"] == pytest.approx(psi.mean(), abs=1e-12)
    assert got["se"] == pytest.approx(np.sqrt(var), rel=1e-10)


def test_auc_interval_covers_the_true_auc_about_95_percent():
    """Binormal data with a known AUC = Phi(d / sqrt(2)) = 0.86; 400 data sets of 100 positives and
    300 negatives (a regime where the asymptotics hold; with few positives it undercovers, see the
    docstring of auc_interval)."""
    d, trials = 1.5, 400
    true_auc = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(trials):
        ci = auc_interval(rng.normal(d, 1, 100), rng.normal(0, 1, 300))["ci95"]
        covered += ci[0] <= true_auc <= ci[1]
    # binomial sd of the coverage over 400 trials is 0.011: +-4 sd around 0.95
    assert 0.906 <= covered / trials <= 0.994, covered / trials


def test_cluster_bootstrap_width_matches_the_standard_error_of_a_mean():
    rng = np.random.default_rng(1)
    rows = rng.normal(0, 2.0, 400)
    values = np.repeat(rows[:, None], 4, axis=1)          # 4 generations that repeat their prompt: one unit each
    res = cluster_bootstrap_mean(values, seed=0)
    se = rows.std(ddof=1) / np.sqrt(rows.size)
    assert res["n_prompts"] == 400 and res["n_values"] == 1600
    assert res["mean"] == pytest.approx(rows.mean())
    width = res["ci95"][1] - res["ci95"][0]
    assert width == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_cluster_bootstrap_resamples_whole_prompts():
    per_prompt = np.array([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    lo, hi = cluster_bootstrap_mean(per_prompt, n_boot=4000)["ci95"]
    # Prompt means are 1, 0, .5, .5: the resampled mean of 4 lies in [0, 1] in steps of 1/8 and
    # its 2.5 / 97.5 percentiles are symmetric about 0.5 (resampling generations would give 1/16 steps).
    assert 0.0 <= lo < 0.5 < hi <= 1.0 and lo == pytest.approx(1 - hi) and (lo * 8) == pytest.approx(round(lo * 8))


def test_paired_difference_is_exact_for_a_shift_and_narrower_than_unpaired():
    rng = np.random.default_rng(2)
    before = rng.normal(0, 1, (60, 4))
    shifted = paired_difference(before, before + 0.25)
    assert shifted["difference"] == pytest.approx(0.25) and shifted["ci95"] == pytest.approx([0.25, 0.25])
    after = before + 0.1 + rng.normal(0, 0.1, before.shape)   # strongly paired
    paired = paired_difference(before, after, seed=0)
    boot = np.random.default_rng(0)
    unpaired = [after[boot.integers(0, 60, 60)].mean() - before[boot.integers(0, 60, 60)].mean() for _ in range(2000)]
    lo, hi = np.percentile(unpaired, [2.5, 97.5])
    assert paired["ci95"][1] - paired["ci95"][0] < 0.25 * (hi - lo)
    assert paired["ci95"][0] <= after.mean() - before.mean() <= paired["ci95"][1]
    with pytest.raises(ValueError, match="prompts"):
        paired_difference(before, after[:10])


def test_tpr_interval_and_summary_agree_with_roc_metrics():
    rng = np.random.default_rng(4)
    pos, neg = rng.normal(2, 1, 40), rng.normal(0, 1, 300)
    res = tpr_at_fpr_interval(pos, neg, n_boot=300)
    m = roc_metrics(pos, neg)
    assert res["tpr"] == m.tpr_at_1pct_fpr and res["n_negative"] == 300 and res["false_positives_allowed"] == 2
    assert res["ci95"][0] <= res["tpr"] <= res["ci95"][1] and res["ci95"][0] < res["ci95"][1]
    separated = tpr_at_fpr_interval(pos + 100, neg, n_boot=100)
    assert separated["tpr"] == 1.0 and separated["ci95"] == [1.0, 1.0]
    s = detection_summary(pos, neg, n_boot=300)
    assert (s.auc, s.tpr_at_1pct_fpr, s.n_positive, s.n_negative) == (m.auc, m.tpr_at_1pct_fpr, 40, 300)
    assert s.auc_ci[0] < s.auc < s.auc_ci[1]


def test_spearman_interval():
    rng = np.random.default_rng(5)
    x = rng.normal(size=80)
    y = x + rng.normal(size=80)
    res = spearman_interval(x, y, n_boot=500)
    assert res["rho"] == pytest.approx(spearmanr(x, y).statistic) and res["n"] == 80
    assert res["ci95"][0] < res["rho"] < res["ci95"][1]
    assert spearman_interval(x, np.ones(80))["rho"] is None
