"""The demo's headline numbers (tables with their 95% intervals and n) and its index page.

Every number is read back from the files the demo's stages wrote (the dose-response, the scan's
metrics, the validation report, the two mitigations' summary.json), so the page shows exactly what
those files hold. The order is the study's: first whether memorization happened (the planted ground
truth against its null), then how well the detector finds it, then whether high scores go with
copies, then what the mitigations change (paired differences on the same prompts and seeds).
The same tables print as plain text for the terminal.
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.atomic_files import write_text
from engine.reports.interval_text import rate, value


@dataclass
class HeadlineTable:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def ground_truth_table(dose: dict) -> HeadlineTable | None:
    """Nearest-is-planted per (dose, kind) at the last snapshot, against the null rate."""
    if not dose.get("snapshots"):
        return None
    last = dose["snapshots"][-1]
    auc = {d["copies"]: d for d in last["detection_by_dose"]}
    rows = [[str(c["copies"]), c["kind"], rate(c["rate"], c["ci95"], c["n_prompts"]),
             rate(c.get("null_rate"), c.get("null_ci95"), digits=2),
             value(auc[c["copies"]]["auc"], auc[c["copies"]]["ci95"], auc[c["copies"]]["n_positive"])
             if c["copies"] in auc else "–"] for c in last["truth"]["by_cell"]]
    a = last["truth"]["all"]
    rows.append(["all", "all", rate(a["rate"], a["ci95"], a["n_prompts"]), rate(a.get("null_rate"), a.get("null_ci95"),
                                                                                  digits=2), ""])
    return HeadlineTable(
        f"1. Did memorization happen? Planted ground truth at step {last['step']} (pixels, no learned model)",
        ["copies", "kind", "nearest training image is the planted one [95%] n prompts", "null rate [95%]",
         "detection AUC of this dose (both kinds), eval. half [95%] n+"], rows,
        [dose["regime"], "Null rate: other prompts' generations whose nearest training image is that planted image. "
                         "Against training length: dose_response/dose_response.html."])


def detection_table(metrics: dict) -> HeadlineTable | None:
    """Wen's score against the planted ground truth, evaluation half, with the calibrated operating point."""
    rows = []
    for name, m in metrics.items():
        if name != "operating_point" and "auc" in m:
            rows.append([name, value(m["auc"], m["auc_ci"]), value(m["tpr_at_1pct_fpr"], m["tpr_ci"]),
                         f"{m['n_positive']} / {m['n_negative']}"])
    if not rows:
        return None
    notes = []
    op = metrics.get("operating_point") or {}
    if "threshold" in op:
        notes.append(f"Threshold {op['threshold']:.4g} from the calibration half ({op['n_calibration_negatives']} "
                     f"controls and ordinary prompts, at most 1% above it); on the evaluation half it flags planted "
                     f"prompts {rate(op['tpr']['rate'], op['tpr']['ci95'], op['tpr']['n'])}, controls "
                     f"{rate(op['fpr_control']['rate'], op['fpr_control']['ci95'], op['fpr_control']['n'])}, ordinary "
                     f"prompts {rate(op['fpr_ordinary']['rate'], op['fpr_ordinary']['ci95'], op['fpr_ordinary']['n'])}.")
    notes.append("TPR@1%FPR is the ROC's own operating point on the evaluated negatives (as in Wen et al.).")
    return HeadlineTable("2. Detection (Wen's score), evaluation half only",
                         ["comparison", "AUC [95%]", "TPR@1%FPR [95%]", "n+ / n-"], rows, notes)


def copies_table(report: dict) -> HeadlineTable | None:
    """Do high scores go with copies: Spearman over all scanned prompts, deciles, flagged precision."""
    sv = report.get("score_vs_copies")
    if not sv:
        return None
    s, deciles, f = sv["spearman_all_prompts"], sv["copy_rate_by_score_decile"], sv["flagged"]
    rows = [["Spearman(score, nearest-training pixel correlation), all scanned prompts", value(s["rho"], s["ci95"], s["n"])],
            ["copy rate, lowest score decile", rate(deciles[0]["copy_rate"], deciles[0]["ci95"], deciles[0]["n_prompts"])],
            ["copy rate, highest score decile", rate(deciles[-1]["copy_rate"], deciles[-1]["ci95"],
                                                     deciles[-1]["n_prompts"])]]
    if "precision" in f:
        rows += [["flagged evaluation prompts whose generations are copies (precision)",
                  rate(f["precision"]["rate"], f["precision"]["ci95"], f["precision"]["n"])],
                 ["unflagged evaluation prompts whose generations are copies",
                  rate(f["copy_share_unflagged"]["rate"], f["copy_share_unflagged"]["ci95"], f["copy_share_unflagged"]["n"])],
                 ["flagged evaluation prompts that are planted",
                  rate(f["planted_share_flagged"]["rate"], f["planted_share_flagged"]["ci95"], f["planted_share_flagged"]["n"])]]
    return HeadlineTable("3. Do high scores go with copies?", ["measure", "value [95%] n"], rows,
                         [f"Copy rule (fixed before looking): {sv['copy_rule']}; threshold {sv['copy_threshold']:.4f}.",
                          "Every decile: audit/report/report.html."])


def _paired(audit: dict, key: str) -> str:
    d = (audit.get("paired_vs_first") or {}).get(key)
    return value(d["difference"], d["ci95"], d["n_prompts"]) if d else "–"


def mitigation_table(title: str, runs: dict) -> HeadlineTable | None:
    """One mitigation series: per run the planted ground truth, flagged share, quality, and the paired
    differences against the first (baseline) run."""
    if not runs:
        return None
    rows = []
    for name, a in runs.items():
        pix = a["copying"].get("planted_pixels") or {}
        flagged = a["detection"].get("planted_flagged") or {}
        fd = (a["quality"].get("pixels_8x8") or {}).get("frechet_to_heldout")
        conf = ((a["quality"].get("label_conformance") or {}).get("generated") or {}).get("macro_auc")
        rows.append([name, rate(pix.get("nearest_is_planted_fraction"), pix.get("nearest_is_planted_ci95"),
                                pix.get("n_planted_prompts")),
                     rate(pix.get("null_rate"), pix.get("null_ci95"), digits=2),
                     _paired(a, "nearest is planted (pixels), planted"),
                     rate(flagged.get("rate"), flagged.get("ci95"), flagged.get("n")),
                     _paired(a, "flagged, planted"), value(fd, digits=2), value(conf, digits=2)])
    return HeadlineTable(title, ["run", "planted: nearest is planted [95%] n", "null [95%]",
                                 "Δ vs first, paired [95%] n", "planted flagged [95%] n", "Δ flagged, paired [95%]",
                                 "FD 8x8 px", "label AUC"], rows,
                         ["Same evaluation-half prompts, seeds and threshold for every run."])


def conditioning_table(study: dict) -> HeadlineTable | None:
    """CFG vs no-CFG: per run and guidance weight, memorization, quality and label conformance on the same
    prompts and seeds, differences paired against the first (run, w)."""
    results = study.get("results")
    if not results:
        return None
    rows = []
    for r in results:
        truth = r.get("planted_nearest_is_planted") or {}
        paired = (r.get("paired_vs_reference") or {}).get("planted_nearest_is_planted")
        copies = (r.get("copy_rate") or {}).get("planted") or {}
        fd = (r.get("frechet") or {}).get("pixels_8x8") or {}
        conf = r.get("label_conformance") or {}
        det = r.get("detection") or {}
        rows.append([r["name"], rate(truth.get("mean"), truth.get("ci95"), truth.get("n_prompts"), digits=1),
                     rate(truth.get("null_rate"), digits=2),
                     value(paired["difference"], paired["ci95"]) if paired else "–",
                     rate(copies.get("mean"), copies.get("ci95"), copies.get("n_prompts")),
                     value(fd.get("value"), fd.get("ci95"), digits=2), value(conf.get("value"), conf.get("ci95"), digits=2),
                     "not applicable (no null condition)" if "not_applicable" in det
                     else value(det.get("auc"), det.get("ci95"), det.get("n_positive"))])
    first = results[0]
    floor = ((first.get("frechet") or {}).get("pixels_8x8") or {}).get("real_train_vs_heldout")
    real_conf = ((first.get("label_conformance") or {}).get("real_heldout") or {}).get("macro_auc")
    groups = ", ".join(f"{n} {k}" for k, n in (first.get("groups") or {}).items())
    return HeadlineTable(
        "5. CFG vs no-CFG (same prompts and seeds; differences paired against the first row)",
        ["run, weight", "planted: nearest is planted [95%] n", "null", "Δ vs first, paired [95%]",
         "planted: copy rate (Dar) [95%] n", "FD 8x8 px [95%]", "label AUC [95%]", "Wen AUC planted vs controls [95%] n+"],
        rows, [f"Prompts: {groups}; {study.get('options', {}).get('generations', '?')} generations each. "
               f"Real training vs held-out images: FD {value(floor, digits=2)}, label AUC {value(real_conf, digits=2)}. "
               f"Every number and its interval: cfg_vs_nocfg/index.html."])


def headline_tables(out_dir: Path) -> list[HeadlineTable]:
    """Every headline table the demo's outputs under `out_dir` support, in the study's order."""
    out_dir = Path(out_dir)
    found = [ground_truth_table(_read_json(out_dir / "dose_response" / "dose_response.json")),
             detection_table(_read_json(out_dir / "audit" / "scores.metrics.json").get("metrics", {})),
             copies_table(_read_json(out_dir / "audit" / "report" / "report.json"))]
    for title, folder in (("4a. Mitigation: lower guidance w (paired against w = 7.5)", "mitigation_guidance"),
                          ("4b. Mitigation: Wen's prompt-embedding optimisation (paired against the baseline)",
                           "mitigation")):
        found.append(mitigation_table(title, _read_json(out_dir / folder / "summary.json").get("runs", {})))
    found.append(conditioning_table(_read_json(out_dir / "cfg_vs_nocfg" / "quantified.json")))
    return [t for t in found if t is not None]


def table_text(t: HeadlineTable) -> list[str]:
    """A table as terminal lines (columns padded to their widest cell)."""
    widths = [max(len(r[i]) for r in [t.columns, *t.rows]) for i in range(len(t.columns))]
    line = lambda cells: "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [t.title, line(t.columns), *(line(r) for r in t.rows), *(f"  {n}" for n in t.notes)]


def table_html(t: HeadlineTable) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t.rows)
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in t.notes)
    return f"<h3>{html.escape(t.title)}</h3><table><tr>{head}</tr>{body}</table>{notes}"


CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1150px;line-height:1.35}"
       "table{border-collapse:collapse;margin:.3em 0}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;"
       "text-align:left;vertical-align:top}th{background:#f3f3f3}.note{font-size:12px;color:#444;margin:.2em 0}"
       "li{margin:.15em 0}")


def write_index(out_dir: Path, pages: list[tuple[str, Path]], tables: list[HeadlineTable], intro: str = "") -> None:
    """out/index.html: the headline tables, then links to every output."""
    items = "".join(f'<li>{html.escape(label)}: <a href="{html.escape(os.path.relpath(path, out_dir))}">'
                    f"{html.escape(os.path.relpath(path, out_dir))}</a></li>" for label, path in pages)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>memdiff demo</title><style>{CSS}</style>"
            f"</head><body><h1>memdiff demo</h1><p>{html.escape(intro)}</p><h2>Headline numbers</h2>"
            f"<p class='note'>Every rate: value, 95% interval, n. Every detection rate: evaluation half only; "
            f"thresholds and targets: calibration half only.</p>"
            f"{''.join(table_html(t) for t in tables)}<h2>Every output</h2><ul>{items}</ul></body></html>")
    write_text(out_dir / "index.html", page)
