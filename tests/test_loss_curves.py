"""The smoothed loss curve: a centred geometric running mean, checked against the formula written out
per point, and against the curves it must draw without lag."""
import math

import numpy as np
import pytest

from engine.reports.loss_curves import plot_loss_curves, read_metrics, smooth


def reference(values, h):
    """exp(mean(log v[i-k .. i+k])) with k = min(h, i, n-1-i), one point at a time."""
    v = np.log(np.asarray(values, dtype=np.float64))
    n = len(v)
    return [float(np.exp(v[i - min(h, i, n - 1 - i):i + min(h, i, n - 1 - i) + 1].mean())) for i in range(n)]


@pytest.mark.parametrize("h", [1, 3, 7])
def test_smooth_is_the_centred_geometric_mean(h):
    values = list(np.random.default_rng(h).uniform(0.01, 1.0, size=60))
    assert smooth(values, h) == pytest.approx(reference(values, h), rel=1e-12)


def test_an_exponentially_falling_loss_is_drawn_where_it_is():
    """A trailing average lags a falling loss (the demo's smoothed curve sat 4x above every logged value
    at step 250); the centred geometric mean of a log-linear curve is the curve itself, ends included."""
    steps = np.arange(80)
    loss = list(0.8 * np.exp(-0.05 * steps))
    assert smooth(loss, 5) == pytest.approx(loss, rel=1e-12)


def test_a_step_is_not_smeared_beyond_the_window():
    loss = [1.0] * 20 + [0.01] * 20
    out = smooth(loss, 3)
    assert out[:17] == pytest.approx([1.0] * 17) and out[23:] == pytest.approx([0.01] * 17)
    assert out[19] == pytest.approx(math.exp((4 * math.log(1.0) + 3 * math.log(0.01)) / 7))


def test_default_window_and_short_curves():
    assert smooth([]) == []
    assert smooth([0.5]) == [0.5]
    values = list(np.random.default_rng(0).uniform(0.01, 1.0, size=200))
    assert smooth(values) == pytest.approx(reference(values, 5), rel=1e-12)   # 200 // 40


def test_plot_skips_rows_a_log_axis_cannot_show(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0}\n'
                                            '{"step": 3, "loss": 0.25}\n{"step": 4}\n')
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    path = plot_loss_curves({"run": rows}, tmp_path / "loss.png")
    assert path.is_file() and path.stat().st_size > 0
