"""The detector benchmark's page: one table (every number with its interval and n) and the ROC curves.

Every piece of text that comes from data goes through html.escape.
"""
from __future__ import annotations

import html
import os

from data_pipeline.atomic_files import write_text
from engine.reports.figures import figure_img, pyplot


def _interval(value, ci, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if ci is None or ci[0] is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _vs(summary: dict | None) -> str:
    if not summary:
        return "n/a"
    return f"{_interval(summary['auc'], summary['auc_ci'])} (n- {summary['n_negative']})"


def roc_figure(records: list[dict]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for rec in records:
        style = "-" if rec["needs_null_condition"] else "--"
        ax.plot(rec["roc"]["fpr"], rec["roc"]["tpr"], style, label=f"{rec['detector']} (AUC {rec['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.axvline(0.01, color="gray", lw=0.6)
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title="planted vs other prompts (evaluation half)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def benchmark_table(records: list[dict]) -> str:
    head = ("<tr><th>detector</th><th>null condition</th><th>AUC [95%]</th><th>TPR@1%FPR [95%]</th>"
            "<th>n+ / n-</th><th>AUC vs controls</th><th>AUC vs ordinary</th><th>forwards / prompt</th>"
            "<th>prompts/s</th><th>what it measures</th></tr>")
    rows = []
    for r in records:
        speed = "n/a" if r["prompts_per_s"] is None else f"{r['prompts_per_s']:.1f}"
        forced = " (FORCED without a trained null condition)" if r.get("forced_without_null_condition") else ""
        fitted = ""
        if r.get("fitted_params"):
            p = r["fitted_params"]
            fitted = (f"; weight {p['weight']:+.2f} fitted on the calibration half "
                      f"(n+ {p['n_positive']}, n- {p['n_negative']}, AUC there {p['calibration_auc']:.3f})")
        rows.append(
            f"<tr><td>{html.escape(r['detector'])}</td><td>{'needed' if r['needs_null_condition'] else 'not used'}"
            f"{html.escape(forced)}</td><td>{_interval(r['auc'], r['auc_ci'])}</td>"
            f"<td>{_interval(r['tpr_at_1pct_fpr'], r['tpr_ci'])}</td><td>{r['n_positive']} / {r['n_negative']}</td>"
            f"<td>{_vs(r.get('vs_controls'))}</td><td>{_vs(r.get('vs_ordinary'))}</td>"
            f"<td>{r['forwards_per_prompt']}</td><td>{speed}</td>"
            f"<td>{html.escape(r['summary'] + fitted)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def ground_truth_html(gt: dict | None) -> str:
    """Whether the planted duplicates were memorized at all, measured without any detector."""
    if not gt:
        return "<p>Ground truth not measured (no detector made generations).</p>"
    lo, hi = gt["nearest_is_planted_ci95"]
    null = "n/a" if gt["null_rate"] is None else f"{100 * gt['null_rate']:.1f}%"
    return (f"<p><b>Did memorization happen?</b> Of the planted prompts' generations (both halves), "
            f"{100 * gt['nearest_is_planted_fraction']:.0f}% [95%: {100 * lo:.0f}-{100 * hi:.0f}%, prompts resampled] "
            f"have their planted image as nearest training image (pixel correlation); null rate (other prompts' "
            f"generations landing on a planted image): {null} of {gt['n_null_generations']} generations. Detectors "
            f"can only be judged where the first number is far above the null.</p>")


def render_benchmark_html(records: list[dict], meta: dict) -> str:
    s = meta["settings"]
    counts = ", ".join(f"{html.escape(k)}: {v}" for k, v in meta["counts"].items())
    warn = ""
    if meta.get("forced_without_null_condition"):
        warn = ("<p class='warn'>Forced: detectors that need the null condition were run on a model trained "
                "with conditioning.p_uncond = 0; their numbers are meaningless.</p>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in meta.get("notes", []))
    truth = ground_truth_html(meta.get("ground_truth_memorization"))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>memdiff detector benchmark</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1200px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;vertical-align:top}} .warn{{color:#b00;font-weight:bold}}</style></head>
<body><h1>Memorization detectors, side by side</h1>{warn}
<p>Model {html.escape(meta['checkpoint'])} (conditioning.p_uncond = {html.escape(str(meta['p_uncond']))}, null
condition {html.escape(meta['null_condition'])}). Same {meta['n_prompts']} prompts and seeds for every detector:
{s['generations']} generations per prompt, {s['steps']} {html.escape(s['sampler'])} steps, w = {s['guidance']:g}, base seed
{s['base_seed']}. Positives: planted prompts; negatives: controls and ordinary prompts; every number on the
evaluation half only; fitted weights on the calibration half only. Halves: {html.escape(meta['split_source'])}
({counts}).</p>
<p>AUC with DeLong's 95% interval (logit scale); TPR at FPR &lt; 1% with a stratified bootstrap interval; with few
positives TPR moves in steps of 1/n+. Speed on {html.escape(meta['device'])}: generation-based detectors are
charged the whole generation time ({meta['generation_seconds']:.1f} s for all prompts), as if run alone.</p>
{truth}
{benchmark_table(records)}
<h2>ROC curves</h2>{figure_img(roc_figure(records))}
<p>Solid: needs the null condition (classifier-free-guidance models only); dashed: any model.</p>
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
</body></html>"""


def write_benchmark_report(out_dir: str, records: list[dict], meta: dict) -> str:
    """out_dir/report.html (atomically); returns its path."""
    path = os.path.join(out_dir, "report.html")
    write_text(path, render_benchmark_html(records, meta))
    return path
