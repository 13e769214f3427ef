"""The dose-response page: planted ground truth against copies x training length, and the regime.

Two figures (nearest-is-planted against training step, one line per dose, one panel per kind; and
against copies at the last snapshot), the regime sentence, and a table of every cell at every snapshot
with its interval, n and null rate. `write_dose_response` writes dose_response.json and .html.
"""
from __future__ import annotations

import html
import os

from data_pipeline.atomic_files import write_json, write_text
from engine.reports.figures import figure_img, pyplot
from engine.reports.interval_text import rate, value

CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse}"
       "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}")


def _errorbar(ax, xs, cells, **kw) -> None:
    ys = [c["rate"] for c in cells]
    lo = [c["rate"] - c["ci95"][0] for c in cells]
    hi = [c["ci95"][1] - c["rate"] for c in cells]
    ax.errorbar(xs, ys, yerr=[lo, hi], capsize=3, marker="o", **kw)


def against_steps(doc: dict) -> str:
    rows = doc["snapshots"]
    kinds = doc["kinds"]
    fig, axes = pyplot().subplots(1, len(kinds), figsize=(5.2 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for copies in doc["dose_levels"]:
            pts = [(r["step"], c) for r in rows for c in r["truth"]["by_cell"]
                   if c["copies"] == copies and c["kind"] == kind]
            if pts:
                _errorbar(ax, [p[0] for p in pts], [p[1] for p in pts], label=f"{copies} copies")
        nulls = [max(c.get("null_rate", 0.0) for c in r["truth"]["by_cell"]) for r in rows]
        ax.plot([r["step"] for r in rows], nulls, "k:", label="largest null rate")
        ax.set(xlabel="training step", ylabel="generations whose nearest training image is planted",
               title=f"{kind} duplicates", ylim=(-0.03, 1.03))
        ax.legend(fontsize=7)
    return figure_img(fig)


def against_copies(doc: dict) -> str:
    last = doc["snapshots"][-1]
    fig, ax = pyplot().subplots(figsize=(5.2, 3.6))
    for kind in doc["kinds"]:
        cells = [c for c in last["truth"]["by_cell"] if c["kind"] == kind]
        _errorbar(ax, [c["copies"] for c in cells], cells, label=f"{kind}")
        ax.plot([c["copies"] for c in cells], [c.get("null_rate", 0.0) for c in cells], ":", label=f"{kind}: null")
    ax.set(xscale="log", xlabel="copies in the training set", ylabel="nearest is planted",
           title=f"step {last['step']}", ylim=(-0.03, 1.03))
    ax.legend(fontsize=7)
    return figure_img(fig)


def cell_table(doc: dict) -> str:
    head = ("<tr><th>step</th><th>copies</th><th>kind</th><th>nearest is planted [95%] n prompts</th>"
            "<th>null rate [95%]</th><th>detection AUC (eval. half) [95%]</th></tr>")
    body = []
    for r in doc["snapshots"]:
        auc = {d["copies"]: d for d in r["detection_by_dose"]}
        for c in r["truth"]["by_cell"]:
            d = auc.get(c["copies"])
            body.append(f"<tr><td>{r['step']}</td><td>{c['copies']}</td><td>{html.escape(c['kind'])}</td>"
                        f"<td>{rate(c['rate'], c['ci95'], c['n_prompts'])}</td>"
                        f"<td>{rate(c.get('null_rate'), c.get('null_ci95'), digits=2)}</td>"
                        f"<td>{value(d['auc'], d['ci95'], d['n_positive']) if d else '–'}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def copy_table(doc: dict) -> str:
    head = "<tr><th>step</th>" + "".join(f"<th>copy rate, {g}</th>" for g in ("planted", "control", "ordinary"))
    body = "".join(f"<tr><td>{r['step']}</td>" + "".join(
        f"<td>{rate((r['copy_rate'].get(g) or {}).get('rate'), (r['copy_rate'].get(g) or {}).get('ci95'), (r['copy_rate'].get(g) or {}).get('n_prompts'))}</td>"
        for g in ("planted", "control", "ordinary")) + "</tr>" for r in doc["snapshots"])
    return f"<table>{head}</tr>{body}</table>"


def render(doc: dict, title: str = "Planted duplicates: dose-response") -> str:
    o = doc["options"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>Run <code>{html.escape(doc['run'])}</code>; {doc['n_prompts']['planted']} planted, "
             f"{doc['n_prompts']['control']} control and {doc['n_prompts']['ordinary']} ordinary prompts x "
             f"{o['generations']} generations ({o['steps']} DDIM steps, w = {o['guidance']:g}, seeds from "
             f"{o['seed']}), the same for every snapshot; nearest training image by pixel Pearson correlation "
             f"over {doc['n_train_images']} distinct training images.</p>",
             f"<p><b>{html.escape(doc['regime'])}</b></p>",
             against_steps(doc), against_copies(doc),
             "<h2>Every cell</h2><p>Intervals: 95%, prompts resampled. Null rate: other prompts' generations "
             "landing on the cell's images. Detection: Wen's mean score, evaluation-half planted prompts of "
             "that dose (both kinds) against evaluation-half controls (DeLong).</p>", cell_table(doc),
             f"<h2>Copy rates</h2><p>Copy rule (fixed before looking): {html.escape(doc['copy_rule'])}; "
             f"threshold {doc['copy_threshold']:.4f}.</p>", copy_table(doc), "</body></html>"]
    return "".join(parts)


def write_dose_response(out_dir: str, doc: dict) -> tuple[str, str]:
    json_path, html_path = os.path.join(out_dir, "dose_response.json"), os.path.join(out_dir, "dose_response.html")
    write_json(json_path, doc, allow_nan=False)
    write_text(html_path, render(doc))
    return html_path, json_path
