"""The demo's index page and terminal tables show exactly what the stages' files hold, with intervals and n.

The detection and validation files are made by the producing functions themselves (detection_summary,
operating_point, score_vs_copies, paired_differences) on known arrays; the test then reads each number
back out of the HTML table cells and the terminal lines, so a renamed key or a dropped interval fails.
"""
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

from data_pipeline.dataset_stats import check_dataset_root
from engine.audit.detection_metrics import operating_point
from engine.audit.intervals import detection_summary
from engine.audit.paired_audit import paired_differences
from engine.audit.score_vs_copies import score_vs_copies
from engine.reports.demo_index import headline_tables, table_text, write_index
from engine.reports.interval_text import rate, value

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Cells(HTMLParser):
    """Every table of a page as lists of rows of cell texts."""
    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _write(path, doc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rng = np.random.default_rng(0)
    prompts = [f"frontal PA chest x-ray, female, 60s: edema | tok{i:04d}" for i in range(120)]
    groups = ["planted"] * 20 + ["control"] * 20 + ["ordinary"] * 80
    score = rng.normal(size=120) + 2.0 * (np.arange(120) < 20)
    nearest = rng.uniform(0.7, 0.95, size=(120, 4))
    nearest[:20] += 0.04
    pos, neg = score[:20], score[20:40]
    metrics = {"score/planted_vs_control": {**detection_summary(pos, neg).to_dict(), "half": "evaluation"},
               "operating_point": operating_point(score, prompts, groups, None)}
    _write(out / "audit" / "scores.metrics.json", {"metrics": metrics})
    sv = score_vs_copies(score, nearest, 0.9, prompts, groups, None)
    _write(out / "audit" / "report" / "report.json", {"score_vs_copies": sv})
    cell = {"copies": 20, "kind": "exact", "rate": 0.8, "ci95": [0.5, 1.0], "n_prompts": 5,
            "null_rate": 0.01, "null_ci95": [0.0, 0.03]}
    dose = {"regime": "memorized at step 1500: 20 copies exact", "snapshots": [{
        "step": 1500, "truth": {"by_cell": [cell], "all": {**cell, "n_prompts": 40}},
        "detection_by_dose": [{"copies": 20, "auc": 0.93, "ci95": [0.8, 0.99], "n_positive": 5}]}]}
    _write(out / "dose_response" / "dose_response.json", dose)

    def audit(shift):
        rows = [{"group": g, "seed": i, "score": float(s - shift), "flagged": bool(s - shift > 1.5),
                 "nearest_is_planted": float(g == "planted" and s - shift > 1.0), "copy_fraction": 0.0}
                for i, (g, s) in enumerate(zip(groups[:40], score[:40]))]
        return {"per_prompt": rows, "copying": {"planted_pixels": {
                    "nearest_is_planted_fraction": 0.6, "nearest_is_planted_ci95": [0.4, 0.8], "n_planted_prompts": 20,
                    "null_rate": 0.02, "null_ci95": [0.0, 0.05]}},
                "detection": {"planted_flagged": {"rate": 0.55, "ci95": [0.34, 0.74], "k": 11, "n": 20}},
                "quality": {"pixels_8x8": {"frechet_to_heldout": 1.234}, "label_conformance": {"generated":
                                                                                                {"macro_auc": 0.71}}}}
    before, after = audit(0.0), audit(1.0)
    after["paired_vs_first"] = paired_differences(before, after, n_boot=200)
    _write(out / "mitigation_guidance" / "summary.json", {"runs": {"w=7.5": before, "w=1": after}})
    return out, metrics, sv, cell, after["paired_vs_first"]


def test_tables_hold_the_files_numbers_with_intervals_and_n(outputs):
    out, metrics, sv, cell, paired = outputs
    tables = headline_tables(out)
    assert [t.title[:2] for t in tables] == ["1.", "2.", "3.", "4a"]   # no embedding-optimisation file: no table
    write_index(out, [("audit report", out / "audit" / "report" / "report.html")], tables, "intro")
    page = (out / "index.html").read_text()
    assert "<pre>" not in page
    parser = Cells()
    parser.feed(page)
    truth, detection, copies, mitigation = parser.tables

    assert truth[1] == ["20", "exact", "80% [50%, 100%] n=5", "1.00% [0.00%, 3.00%]", "0.930 [0.800, 0.990] n=5"]
    m = metrics["score/planted_vs_control"]
    assert detection[1] == ["score/planted_vs_control", f"{m['auc']:.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}]",
                            value(m["tpr_at_1pct_fpr"], m["tpr_ci"]), "20 / 20"]
    op = metrics["operating_point"]
    assert rate(op["tpr"]["rate"], op["tpr"]["ci95"], op["tpr"]["n"]) in page
    s = sv["spearman_all_prompts"]
    assert copies[1][1] == value(s["rho"], s["ci95"], s["n"]) and s["n"] == 120
    top = sv["copy_rate_by_score_decile"][-1]
    assert copies[3][1] == rate(top["copy_rate"], top["ci95"], top["n_prompts"])
    p = sv["flagged"]["precision"]
    assert copies[4][1] == rate(p["rate"], p["ci95"], p["n"])
    d = paired["nearest is planted (pixels), planted"]
    assert mitigation[2][0] == "w=1" and mitigation[2][3] == value(d["difference"], d["ci95"], d["n_prompts"])
    assert mitigation[1][3] == "–"                     # the first run is the baseline: no difference
    assert mitigation[2][1] == "60% [40%, 80%] n=20" and mitigation[2][6:] == ["1.23", "0.71"]

    text = "\n".join(line for t in tables for line in table_text(t))
    for table in parser.tables:
        for row in table[1:]:
            assert all(c in text for c in row)
    assert not re.search(r"\bnan\b", page + text)


def test_missing_outputs_give_fewer_tables_not_errors(tmp_path):
    assert headline_tables(tmp_path) == []


def test_dataset_root_checked_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        check_dataset_root(str(tmp_path / "missing"), "nih")
    with pytest.raises(ValueError, match="neither an NIH table"):
        check_dataset_root(str(tmp_path), "nih")
    (tmp_path / "train.csv").write_text("Path\n")
    with pytest.raises(ValueError, match="holds a chexpert dataset, not nih"):
        check_dataset_root(str(tmp_path), "nih")
    check_dataset_root(str(tmp_path), "chexpert")


def test_demo_refuses_a_bad_root_before_any_work(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "demo"), "--data", "nih", "--root",
                        str(tmp_path / "nowhere"), "--out", str(out)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert r.returncode == 2 and [line for line in r.stderr.splitlines() if line.startswith("error")] == [
        f"error: {tmp_path / 'nowhere'}: not a folder"]
    assert not out.exists()


def test_cfg_vs_nocfg_table_holds_the_comparison_file(tmp_path):
    """Table 5 reads compare_runs' quantified.json: the no-CFG row says Wen's AUC does not apply, and the
    paired difference is the one the file holds (made by paired_difference on known hits)."""
    from engine.audit.intervals import (
        auc_interval,
        cluster_bootstrap_mean,
        cluster_bootstrap_statistic,
        paired_difference,
    )
    rng = np.random.default_rng(1)
    hits_cfg = (rng.uniform(size=(40, 4)) < 0.1).astype(float)
    hits_nocfg = (rng.uniform(size=(40, 4)) < 0.4).astype(float)
    fd = cluster_bootstrap_statistic(np.arange(120), lambda i: float(np.mean(i)) / 100, 100)
    common = {"groups": {"control": 40, "ordinary": 40, "planted": 40},
              "frechet": {"pixels_8x8": {**fd, "real_train_vs_heldout": 0.7}},
              "label_conformance": {"value": 0.66, "ci95": [0.6, 0.7], "real_heldout": {"macro_auc": 0.71}}}
    cfg = {"name": "cfg w = 1", **common, "planted_nearest_is_planted": {**cluster_bootstrap_mean(hits_cfg, 200),
                                                                          "null_rate": 0.005},
           "copy_rate": {"planted": cluster_bootstrap_mean(hits_cfg, 200)},
           "detection": auc_interval(rng.normal(1, 1, 40), rng.normal(0, 1, 40))}
    paired = paired_difference(hits_cfg, hits_nocfg, n_boot=200)
    nocfg = {"name": "nocfg w = 1", **common, "planted_nearest_is_planted": {**cluster_bootstrap_mean(hits_nocfg, 200),
                                                                              "null_rate": 0.004},
             "detection": {"not_applicable": "trained without the null prompt"},
             "paired_vs_reference": {"reference": "cfg w = 1", "planted_nearest_is_planted": paired}}
    _write(tmp_path / "cfg_vs_nocfg" / "quantified.json", {"options": {"generations": 4}, "results": [cfg, nocfg]})
    (table,) = headline_tables(tmp_path)
    assert table.title.startswith("5.")
    first, second = table.rows
    t = cfg["planted_nearest_is_planted"]
    assert first[1] == rate(t["mean"], t["ci95"], 40, digits=1) and first[3] == "–"
    assert first[7] == value(cfg["detection"]["auc"], cfg["detection"]["ci95"], 40)
    assert second[3] == value(paired["difference"], paired["ci95"])
    assert second[4] == "–" and "not applicable" in second[7]
    assert second[5] == value(fd["value"], fd["ci95"], digits=2) and second[6] == "0.66 [0.60, 0.70]"
    assert "label AUC 0.71" in table.notes[0] and "FD 0.70" in table.notes[0]
