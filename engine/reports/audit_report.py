"""The memorization report: one self-contained HTML file (images inlined as base64 PNG) and its JSON.

Every piece of text that comes from data (prompts above all) goes through html.escape; nothing from
the data is ever placed in the page unescaped.
"""
from __future__ import annotations

import html
import os

import numpy as np

from data_pipeline.atomic_files import write_json, write_text
from engine.audit.exposure import write_exposure
from engine.audit.validation import ValidationResult
from engine.reports.exposure import exposure_section_html
from engine.reports.figures import figure_img, png_data_uri, pyplot
from engine.reports.interval_text import rate, value

# The first present one is shown. SSIM first: on the demo's planted duplicates it found the planted source
# as often as pixel correlation (recall@1 55% vs 45%, paired difference within its interval) and
# retrieved known near copies best (84% vs 72%); the learned metrics were lower (tools/benchmark_similarity).
PRIMARY_METRICS = ("ssim", "pixel_correlation", "dar_correlation", "deepssim", "clip_cosine")
METRIC_NAMES = {"pixel_correlation": "pixel Pearson", "ssim": "SSIM", "clip_cosine": "CLIP cosine",
                "dar_correlation": "Dar copy-detection corr.", "deepssim": "DeepSSIM"}


def _img(image_u8: np.ndarray, caption: str = "") -> str:
    return (f'<figure><img src="{png_data_uri(image_u8)}" alt="">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _plots(n: dict) -> dict[str, str]:
    plt = pyplot()
    out = {}
    metrics = list(n["spearman_score_vs_nearest_similarity"])
    if metrics:
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            for group, color in (("planted", "tab:red"), ("control", "tab:orange"), ("ordinary", "tab:blue"),
                                 (None, "tab:blue")):
                pts = [(p["score"], p["neighbors"][m]["nearest"]) for p in n["prompts"] if p["group"] == group]
                if pts:
                    ax.scatter(*zip(*pts), s=12, c=color, label=group or "prompts")
            c = n["spearman_score_vs_nearest_similarity"][m]
            rho = "n/a" if c["rho"] is None else f"{c['rho']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"
            ax.set(xlabel="memorization score", ylabel=f"nearest training ({METRIC_NAMES.get(m, m)})",
                   title=f"Spearman {rho}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        out["scatter"] = figure_img(fig, 'class="plot"')
    if n.get("roc"):
        fig, ax = plt.subplots(figsize=(4.5, 4))
        for name, r in n["roc"].items():
            ax.plot(r["fpr"], r["tpr"], label=f"{name} (AUC {value(r['auc'], r['auc_ci'])})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        ax.legend(fontsize=6)
        out["roc"] = figure_img(fig, 'class="plot"')
    if n.get("tsne"):
        t = n["tsne"]
        fig, ax = plt.subplots(figsize=(5, 4.5))
        txy, gxy = np.array(t["train_xy"]), np.array(t["generated_xy"])
        high = np.array(t["generated_high_score"], dtype=bool)
        ax.scatter(txy[:, 0], txy[:, 1], s=6, c="lightgray", label="training")
        if (~high).any():
            ax.scatter(gxy[~high, 0], gxy[~high, 1], s=10, c="tab:blue", label="generated")
        if high.any():
            ax.scatter(gxy[high, 0], gxy[high, 1], s=18, c="tab:red", marker="*", label="generated, top scores")
        ax.set(title="t-SNE of CLIP embeddings", xticks=[], yticks=[])
        ax.legend(fontsize=7)
        out["tsne"] = figure_img(fig, 'class="plot"')
    return out


def _prompt_panel(entry: dict, generated: np.ndarray, train_images: np.ndarray, primary: str) -> str:
    """One prompt: each generation beside its nearest training images under the primary metric."""
    parts = [f'<div class="prompt"><h4>#{entry["prompt_index"]} <code>{html.escape(entry["prompt"])}</code></h4>',
             f'<p>group: {html.escape(str(entry["group"]))} · score {entry["score"]:.4f} · '
             f'first-step {entry["first_step_score"]:.4f} · seed {entry["seed"]} · nearest: ' +
             ", ".join(f"{html.escape(METRIC_NAMES.get(m, m))} {v['nearest']:.3f}"
                       for m, v in entry["neighbors"].items()) + "</p>"]
    nb = entry["neighbors"][primary]
    for g in range(generated.shape[0]):
        cells = [_img(generated[g], f"generation {g}")]
        for sim, idx in zip(nb["values"][g], nb["train_indices"][g]):
            cells.append(_img(train_images[idx], f"train #{idx}: {sim:.3f}"))
        parts.append(f'<div class="row">{"".join(cells)}</div>')
    parts.append("</div>")
    return "".join(parts)


def _metric_table(rows: dict) -> str:
    """Detection summaries: AUC and TPR@1%FPR with their 95% intervals, best balanced accuracy, n+ / n-."""
    head = "".join(f"<th>{c}</th>" for c in ("comparison (evaluation half)", "AUC [95%]", "TPR@1%FPR [95%]",
                                             "best bal. acc.", "n+", "n-"))
    body = "".join(f"<tr><td>{html.escape(name)}</td><td>{value(r['auc'], r['auc_ci'])}</td>"
                   f"<td>{value(r['tpr_at_1pct_fpr'], r['tpr_ci'])}</td><td>{r['best_balanced_accuracy']:.3f}</td>"
                   f"<td>{r['n_positive']}</td><td>{r['n_negative']}</td></tr>" for name, r in rows.items())
    return f"<table><tr>{head}</tr>{body}</table>"


def score_vs_copies_html(sv: dict) -> str:
    """Spearman over every scanned prompt, the copy rate by score decile and the flagged set's precision."""
    s = sv["spearman_all_prompts"]
    out = [f"<h2>Do high scores go with copies? (all {sv['n_prompts']} scanned prompts)</h2>",
           f"<p>Copy rule, fixed before looking: {html.escape(sv['copy_rule'])} (threshold "
           f"{sv['copy_threshold']:.4f}; generations {html.escape(sv['generations_source'])}). "
           f"Spearman(score, highest nearest-training pixel correlation) over all scanned prompts: "
           f"<b>{value(s['rho'], s['ci95'], s['n'])}</b>. Copy rate of all generations: "
           f"{rate(sv['copy_rate_all'], digits=1)}.</p>",
           "<table><tr><th>score decile</th><th>scores</th><th>copy rate [95%] n prompts</th></tr>"]
    out += [f"<tr><td>{d['decile']}</td><td>{d['score_min']:.4g} – {d['score_max']:.4g}</td>"
            f"<td>{rate(d['copy_rate'], d['ci95'], d['n_prompts'])}</td></tr>" for d in sv["copy_rate_by_score_decile"]]
    out.append("</table>")
    f = sv["flagged"]
    if "precision" in f:
        out.append(f"<p>Flagging threshold {f['threshold']:.4g}: at most {f['target_fpr']:g} of the "
                   f"{f['n_calibration_negatives']} calibration-half controls and ordinary prompts above it. On the "
                   f"{f['n_evaluation_prompts']} evaluation-half prompts: flagged prompts whose generations are copies "
                   f"(precision) <b>{rate(f['precision']['rate'], f['precision']['ci95'], f['precision']['n'])}</b>; "
                   f"unflagged prompts whose generations are copies {rate(f['copy_share_unflagged']['rate'], f['copy_share_unflagged']['ci95'], f['copy_share_unflagged']['n'])}; "
                   f"flagged prompts that are planted {rate(f['planted_share_flagged']['rate'], f['planted_share_flagged']['ci95'], f['planted_share_flagged']['n'])}.</p>")
    return "".join(out)


CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}figure{display:inline-block;margin:2px;
text-align:center}figure img{width:96px;height:96px;image-rendering:pixelated}figcaption{font-size:10px}
.row{white-space:nowrap}.prompt{border-top:1px solid #ccc;margin-top:.8em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}.plot{max-width:100%}.warn{color:#a40}"""


def render_html(result: ValidationResult, title: str = "memdiff memorization report",
                primary: str | None = None) -> str:
    """The page; `primary` picks the metric whose nearest neighbours are shown (default: the first of
    PRIMARY_METRICS present, SSIM)."""
    n = result.numbers
    available = [m for m in PRIMARY_METRICS if all(m in p["neighbors"] for p in n["prompts"])]
    if primary is not None and primary not in available:
        raise ValueError(f"report: neighbours by {primary!r} are not available (have {available})")
    primary = primary or available[0]
    by_index = {p["prompt_index"]: (j, p) for j, p in enumerate(n["prompts"])}
    plots = _plots(n)
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if (n.get("null_condition") or {}).get("forced_without_null_condition"):
        out.append("<p class='warn'>FORCED: this model was trained with conditioning.p_uncond = 0 (no trained null "
                   "condition); the scan's scores and these generations use the untrained null prompt.</p>")
    out.append(f"<p>{n['n_prompts_scanned']} prompts scanned, {n['n_train_images']} training images, "
               f"{n['generations']} generations per prompt. Neighbours shown by "
               f"{html.escape(METRIC_NAMES[primary])}; the reproduced scores differ from the scan's by at most "
               f"{n['regenerated_score_max_abs_diff']:.2e}.</p>")
    if n.get("clip") and n["clip"]["random_init"]:
        out.append("<p class='warn'>CLIP is randomly initialised (no weights given): its similarities and the "
                   "t-SNE only exercise the pipeline. Pass --clip-pretrained for meaningful numbers.</p>")
    if n.get("roc"):
        out.append("<h2>Detection against ground truth (planted duplicates)</h2>" + _metric_table(n["roc"]))
        out.append(plots.get("roc", ""))
    if n.get("planted"):
        pl = n["planted"]
        frac = pl["nearest_is_planted_fraction"]
        out.append(f"<p>Planted prompts among the {len(n['prompts'])} of the weighted selection shown below: "
                   f"{pl['n_planted_prompts']}; their generations whose nearest training image "
                   f"(pixel correlation) is the planted image: "
                   f"{'n/a' if frac is None else f'{100 * frac:.1f}%'}.</p>")
    if n.get("dar"):
        d = n["dar"]
        out.append(f"<h2>Copy statistics (Dar et al.)</h2><p>threshold {d['threshold']:.4f}: "
                   f"{d['n_copies']}/{d['n_generated']} generated images are copies "
                   f"({100 * d['copy_fraction']:.1f}%); {d['n_memorized_train']}/{d['n_train']} training images "
                   f"memorized ({100 * d['memorized_train_fraction']:.2f}%).</p>")
    if n.get("deepssim"):
        d = n["deepssim"]
        out.append(f"<p>DeepSSIM copy rule (Duplicate, score &gt; {d['threshold']:g}): {d['n_copies']}/"
                   f"{d['n_generated']} generated images ({100 * d['copy_fraction']:.1f}%).</p>")
    if n.get("score_vs_copies"):
        out.append(score_vs_copies_html(n["score_vs_copies"]))
    out.append("<h2>Score vs nearest-training similarity, weighted selection</h2><p>Prompts: the top- and "
               "bottom-scoring, the planted and an even spread over the ranking (not a random sample).</p>"
               "<table><tr><th>metric</th><th>Spearman rho</th><th>95% bootstrap CI</th><th>prompts</th></tr>")
    for m, c in n["spearman_score_vs_nearest_similarity"].items():
        rho = "n/a" if c["rho"] is None else f"{c['rho']:.3f}"
        ci = "n/a" if c["rho"] is None else f"[{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"
        out.append(f"<tr><td>{html.escape(METRIC_NAMES.get(m, m))}</td><td>{rho}</td><td>{ci}</td><td>{c['n']}</td></tr>")
    out.append("</table>" + plots.get("scatter", ""))
    if "tsne" in plots:
        out.append("<h2>t-SNE</h2>" + plots["tsne"])
    if n.get("exposure"):
        out.append(exposure_section_html(n["exposure"]["rows"], n["exposure"]["meta"]))
    for section, title_text in (("planted", "Planted prompts"), ("top", "Top-scoring prompts"),
                                ("bottom", "Bottom-scoring prompts")):
        ids = n["selection"].get(section, [])
        if ids:
            out.append(f"<h2>{title_text}</h2>")
            for pid in ids:
                j, entry = by_index[pid]
                out.append(_prompt_panel(entry, result.generated[j], result.train_images, primary))
    out.append("</body></html>")
    return "".join(out)


def write_report(result: ValidationResult, out_dir: str, title: str = "memdiff memorization report",
                 primary: str | None = None) -> tuple[str, str]:
    """Write report.html and report.json atomically into out_dir (and exposed_training_images.parquet when
    the numbers have an exposure table); returns the paths of the page and the JSON."""
    html_path, json_path = os.path.join(out_dir, "report.html"), os.path.join(out_dir, "report.json")
    write_text(html_path, render_html(result, title, primary))
    write_json(json_path, result.numbers, allow_nan=False)
    if result.numbers.get("exposure"):
        write_exposure(result.numbers["exposure"]["rows"], os.path.join(out_dir, "exposed_training_images.parquet"),
                       {**result.numbers["exposure"]["meta"], "null_condition": result.numbers.get("null_condition")})
    return html_path, json_path
