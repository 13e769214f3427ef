"""The before/after audit page: one self-contained HTML table, plots and images per comparison.

Shows the audits of engine.audit.generation_audit (a baseline and its mitigations, or several runs)
side by side: the headline numbers, the distributions, for guidance sweeps the numbers against w, and
generation 0 of the first prompts with each one's nearest training image. Every piece of text that
comes from data goes through html.escape. `write_comparison` writes report.html and summary.json.
"""
from __future__ import annotations

import html
import os

from data_pipeline.atomic_files import write_json, write_text
from engine.audit.generation_audit import Comparison, Generations
from engine.audit.run_data import RealImages
from engine.reports.figures import figure_img, png_data_uri, pyplot
from engine.reports.interval_text import rate, value

CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1300px}table{border-collapse:collapse}"
       "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;vertical-align:top}")


def _auc_text(summary: dict | None) -> str | None:
    if not summary:
        return None
    if "auc_ci" in summary:
        return value(summary["auc"], summary["auc_ci"]) + f" n+={summary['n_positive']} n-={summary['n_negative']}"
    return value(summary["auc"]) + f" (no interval: n+={summary['n_positive']} n-={summary['n_negative']})"


def headline(audit: dict) -> dict:
    """The few numbers a before/after table shows, flat; rates and AUCs as text with their 95% interval and n."""
    det, cop, q = audit["detection"], audit["copying"], audit["quality"]
    def flagged(name: str) -> str | None:
        f = det.get(f"{name}_flagged")
        return rate(f["rate"], f["ci95"], f["n"]) if f else None

    auc = det.get("auc/score/planted_vs_control") or {}
    row = {"score mean (rms)": det["score_mean"], "planted score mean": det.get("planted_score_mean"),
           "control score mean": det.get("control_score_mean"), "threshold": det["threshold"],
           "planted flagged [95%]": flagged("planted"), "controls flagged [95%]": flagged("control"),
           "AUC planted vs control [95%]": _auc_text(auc or None),
           "TPR@1%FPR planted vs control [95%]": value(auc.get("tpr_at_1pct_fpr"), auc.get("tpr_ci")) if auc else None,
           f"nearest-train sim. median ({cop['space']})": cop["nearest_similarity"].get("median"),
           "copy rate (Dar)": (cop.get("dar") or {}).get("copy_fraction")}
    for name in ("planted", "control", "ordinary"):
        if f"copy_fraction_{name}" in cop:
            row[f"copy rate, {name} prompts [95%]"] = rate(cop[f"copy_fraction_{name}"],
                                                         cop.get(f"copy_fraction_{name}_ci95"), digits=1)
    pix = cop.get("planted_pixels") or {}
    if pix:
        row["planted: nearest is planted image (pixels) [95%]"] = rate(
            pix["nearest_is_planted_fraction"], pix["nearest_is_planted_ci95"], pix.get("n_planted_prompts"))
        row["  null rate: other prompts' generations on a planted image [95%]"] = rate(
            pix["null_rate"], pix.get("null_ci95"), digits=2)
        row["planted: correlation to own planted image, median (pixels)"] = pix["own_correlation"]["median"]
        for cell in pix.get("by_kind", []):
            row[f"  nearest is planted, {cell['kind']} copies [95%]"] = rate(cell["rate"], cell["ci95"],
                                                                            cell["n_prompts"])
    for name, v in q.items():
        if name == "label_conformance":
            real_auc = (v.get("real_heldout") or {}).get("macro_auc")
            row[f"label conformance, macro AUC (real held-out {_fmt(real_auc)})"] = v["generated"]["macro_auc"]
        else:
            row[f"FD {name} (real floor {v['real_train_vs_heldout']:.3g})"] = v["frechet_to_heldout"]
    return row


def headline_text(name: str, audit: dict) -> str:
    """One line of the headline's numbers, for a terminal."""
    return f"{name:>24s}: " + "  ".join(f"{k.strip()}={v:.4g}" if isinstance(v, float) else f"{k.strip()}={v}"
                                        for k, v in headline(audit).items() if v is not None)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def comparison_table(names: list[str], audits: list[dict]) -> str:
    rows = [headline(a) for a in audits]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    head = "<tr><th>measure</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
    body = "".join("<tr><td>" + html.escape(k) + "</td>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for r in rows)
                   + "</tr>" for k in keys)
    return f"<table>{head}{body}</table>"


def paired_table(names: list[str], audits: list[dict]) -> str:
    """Every later audit minus the first, prompt by prompt (same prompts and seeds), with paired intervals."""
    later = [(n, a["paired_vs_first"]) for n, a in zip(names[1:], audits[1:]) if a.get("paired_vs_first")]
    if not later:
        return ""
    keys = list(dict.fromkeys(k for _, d in later for k in d))
    head = "<tr><th>after − before (paired)</th>" + "".join(
        f"<th>{html.escape(n)} − {html.escape(names[0])}</th>" for n, _ in later) + "</tr>"
    cell = lambda d: value(d["difference"], d["ci95"], d["n_prompts"]) if d else "–"  # noqa: E731
    body = "".join(f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{cell(d.get(k))}</td>" for _, d in later)
                   + "</tr>" for k in keys)
    return (f"<h2>Paired differences</h2><p>Each prompt before and after from the same seed; 95% intervals "
            f"resample prompts once for both sides (n = prompts).</p><table>{head}{body}</table>")


def distribution_plot(names: list[str], audits: list[dict]) -> str:
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.4))
    for name, a in zip(names, audits):
        v = a["copying"]["nearest_similarity"].get("values", [])
        axes[0].hist(v, bins=30, histtype="step", label=name)
        axes[1].scatter([name] * len(a["per_prompt"]), [r["score"] for r in a["per_prompt"]], s=10,
                        c=["tab:red" if r["group"] == "planted" else "tab:blue" for r in a["per_prompt"]])
    axes[0].set(xlabel=f"nearest training similarity ({audits[0]['copying']['space']})", ylabel="generations")
    axes[0].legend(fontsize=7)
    axes[1].set(ylabel="memorization score (rms)", title="per prompt (red: planted)")
    return figure_img(fig)


def guidance_plot_html(audits: list[dict]) -> str:
    """Memorization score, copy rate and Fréchet distance against w (three panels) of a guidance sweep."""
    plt = pyplot()
    w = [a["guidance"] for a in audits]
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
    fig.subplots_adjust(wspace=0.42)
    _scores_against_guidance(ax[0], w, audits)
    _copying_against_guidance(ax[1], w, audits)
    _quality_against_guidance(ax[2], w, audits)
    return figure_img(fig)


def _legend_below(*axes) -> None:
    """One legend for a panel (and its twin axis) under it: inside, it hid the lines it labels."""
    handles, labels = [], []
    for a in axes:
        h, lab = a.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if handles:
        axes[0].legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                       frameon=False)


def _scores_against_guidance(ax, w: list[float], audits: list[dict]) -> None:
    for key, label in (("planted_score_mean", "planted"), ("control_score_mean", "control"),
                       ("ordinary_score_mean", "ordinary"), ("score_mean", "all")):
        ys = [a["detection"].get(key) for a in audits]
        if all(y is not None for y in ys):
            ax.plot(w, ys, "o-", label=label)
    ax.set(xlabel="guidance w", ylabel="memorization score (rms)")
    _legend_below(ax)


def _copying_against_guidance(ax, w: list[float], audits: list[dict]) -> None:
    for key, label in (("copy_fraction_planted", "planted prompts"), ("copy_fraction_control", "control prompts"),
                       ("copy_fraction_ordinary", "ordinary prompts")):
        ys = [a["copying"].get(key) for a in audits]
        if all(y is not None for y in ys):
            ax.plot(w, ys, "o-", label=label)
    ys = [(a["copying"].get("dar") or {}).get("copy_fraction") for a in audits]
    if all(y is not None for y in ys):
        ax.plot(w, ys, "k--", label="all generations")
    pix = [a["copying"].get("planted_pixels") or {} for a in audits]
    if all(pix):   # the ground truth for planted duplicates: is the nearest training image the planted one?
        ax.plot(w, [p["nearest_is_planted_fraction"] for p in pix], "rs-", label="planted: nearest is planted (pixels)")
        if all(p["null_rate"] is not None for p in pix):
            ax.plot(w, [p["null_rate"] for p in pix], "r:", marker=".", label="null: other prompts' generations")
    ax.set(xlabel="guidance w", ylabel=f"fraction of generations\n(copy rate: {audits[0]['copying']['space']})")
    _legend_below(ax)


def _quality_against_guidance(ax, w: list[float], audits: list[dict]) -> None:
    for name in [n for n, v in audits[0]["quality"].items() if "frechet_to_heldout" in v]:
        line, = ax.plot(w, [a["quality"][name]["frechet_to_heldout"] for a in audits], "o-", label=name)
        ax.axhline(audits[0]["quality"][name]["real_train_vs_heldout"], ls=":", lw=0.8, color=line.get_color())
    ax.set(xlabel="guidance w", ylabel="Fréchet distance to held-out\n(dotted: real floor)", yscale="log")
    conf = [a["quality"].get("label_conformance") for a in audits]
    if not all(conf):
        _legend_below(ax)
        return
    twin = ax.twinx()   # prompt adherence: what lowering w costs
    twin.plot(w, [c["generated"]["macro_auc"] for c in conf], "k^-", label="label conformance (AUC)")
    real_auc = (conf[0].get("real_heldout") or {}).get("macro_auc")
    if real_auc is not None:
        twin.axhline(real_auc, color="k", ls="--", lw=0.8, label="same, real held-out")
    twin.set_ylabel("label conformance, macro AUC")
    _legend_below(ax, twin)


def side_by_side_grid(names: list[str], gens: list[Generations], real: RealImages, audits: list[dict],
                      max_prompts: int = 8) -> str:
    """For the first planted prompts (then others): generation 0 of every run and each one's nearest training image."""
    order = sorted(range(len(gens[0].prompts)), key=lambda i: (gens[0].groups[i] != "planted", i))[:max_prompts]
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(n)}</th><th>nearest train</th>" for n in names) + "</tr>"
    rows = []
    for i in order:
        cells = [f"<td><code>{html.escape(gens[0].prompts[i])}</code><br>{html.escape(gens[0].groups[i])}</td>"]
        for gen, a in zip(gens, audits):
            nn_i = a["nearest_train_index"][i][0] if a["nearest_train_index"] else None
            cells.append(f'<td><img width="96" style="image-rendering:pixelated" src="{png_data_uri(gen.images[i, 0])}"><br>'
                         f'score {a["per_prompt"][i]["score"]:.4f}</td>')
            cells.append(f'<td><img width="96" style="image-rendering:pixelated" src="{png_data_uri(real.train[nn_i])}"></td>'
                         if real is not None else "<td>–</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def render_comparison_html(title: str, names: list[str], audits: list[dict], gens: list[Generations],
                           real: RealImages, notes: list[str] = (), extra_html: str = "") -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    parts += ["<h2>Numbers</h2>", comparison_table(names, audits), paired_table(names, audits), "<h2>Distributions</h2>",
              distribution_plot(names, audits), extra_html, "<h2>Side by side (same prompt, same seed)</h2>",
              side_by_side_grid(names, gens, real, audits), "</body></html>"]
    return "".join(parts)


def write_comparison(out_dir: str, comparison: Comparison) -> tuple[str, str]:
    """OUT/summary.json (every audit by name, plus the comparison's own keys) and OUT/report.html;
    a guidance sweep (audits carrying "guidance") also gets its numbers plotted against w."""
    c = comparison
    json_path, html_path = os.path.join(out_dir, "summary.json"), os.path.join(out_dir, "report.html")
    write_json(json_path, {"runs": dict(zip(c.names, c.audits)), **c.summary})
    sweep = c.real is not None and all("guidance" in a for a in c.audits)
    extra_html = "<h2>Against guidance</h2>" + guidance_plot_html(c.audits) if sweep else ""
    write_text(html_path, render_comparison_html(c.title, c.names, c.audits, c.generations, c.real, list(c.notes),
                                                 extra_html))
    return html_path, json_path
