"""The similarity benchmark as a page: retrieval of the planted source, copy decisions, known copies,
the chosen default neighbour metric with its reason, and planted generations beside each metric's
nearest training image."""
from __future__ import annotations

import html

import numpy as np

from data_pipeline.atomic_files import write_text
from engine.reports.figures import png_data_uri


def _ci(d: dict, key: str = "mean", pct: bool = True) -> str:
    v, (lo, hi) = d.get(key, d.get("value", d.get("rate"))), d["ci95"]
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.3f}")
    return f"{f(v)} [{f(lo)}–{f(hi)}]"


def _retrieval_table(numbers: dict) -> str:
    kinds = [k for k in ("all", "exact", "near") if any(k in r for r in numbers["retrieval"].values())]
    head = "".join(f"<th>recall@1 ({k})</th><th>recall@5 ({k})</th>" for k in kinds)
    rows = []
    for m, r in numbers["retrieval"].items():
        cells = "".join(f"<td>{_ci(r[k]['recall_at_1'])}</td><td>{_ci(r[k]['recall_at_5'])}</td>" if k in r
                        else "<td>–</td><td>–</td>" for k in kinds)
        diff = numbers["paired_recall_at_1"]["differences"][m]
        rows.append(f"<tr><td>{html.escape(m)}</td>{cells}<td>{100 * diff['difference']:+.0f} pts "
                    f"[{100 * diff['ci95'][0]:+.0f}, {100 * diff['ci95'][1]:+.0f}]</td>"
                    f"<td>{html.escape(numbers['metrics'][m]['note'])}</td></tr>")
    ref = numbers["paired_recall_at_1"]["reference"]
    return (f"<table><tr><th>metric</th>{head}<th>recall@1 minus {html.escape(ref)} (paired)</th><th>what it is</th></tr>"
            + "".join(rows) + "</table>")


def _decision_table(per_metric: dict) -> str:
    rows = []
    for m, rules in per_metric.items():
        for r, d in rules.items():
            rows.append(f"<tr><td>{html.escape(m)}</td><td>{r}</td><td>{d['threshold']:.4f}</td>"
                        f"<td>{_ci(d['precision'], 'value')}</td><td>{_ci(d['recall'], 'value')}</td>"
                        f"<td>{_ci(d['f1'], 'value', pct=False)}</td><td>{d['n_claims']}</td>"
                        f"<td>{d['n_positive']} / {d['n_negative']}</td></tr>")
    return ("<table><tr><th>metric</th><th>rule</th><th>threshold</th><th>precision</th><th>recall</th><th>F1</th>"
            "<th>claims</th><th>positives / negatives</th></tr>" + "".join(rows) + "</table>")


def _known_table(numbers: dict) -> str:
    rows = [f"<tr><td>{html.escape(m)}</td><td>{_ci(k['near']['recall_at_1'], 'rate')}</td>"
            f"<td>{_ci(k['near']['recall_at_5'], 'rate')}</td><td>{_ci(k['heavy']['recall_at_1'], 'rate')}</td>"
            f"<td>{_ci(k['heavy']['recall_at_5'], 'rate')}</td><td>{k['near']['recall_at_1']['n']}</td></tr>"
            for m, k in numbers["known_copies"].items()]
    return ("<table><tr><th>metric</th><th>recall@1 near copy</th><th>recall@5 near copy</th><th>recall@1 heavy "
            "re-framing</th><th>recall@5 heavy</th><th>n</th></tr>" + "".join(rows) + "</table>")


def _examples(images: dict, train_images: np.ndarray, max_prompts: int = 6) -> str:
    """First generation of a few planted prompts, its planted source, and each metric's top-1."""
    metrics = list(images["top1"])
    rows = []
    for p in np.flatnonzero(images["planted_rows"])[:max_prompts]:
        source = images["targets"][p][0] if images["targets"][p] else None
        cells = [f'<td><img src="{png_data_uri(images["generated"][p, 0])}"></td>',
                 f'<td><img src="{png_data_uri(train_images[source])}"></td>' if source is not None else "<td>–</td>"]
        for m in metrics:
            j = int(images["top1"][m][p, 0])
            mark = "✔" if j in images["targets"][p] else "✘"
            cells.append(f'<td><img src="{png_data_uri(train_images[j])}"><br>{mark}</td>')
        rows.append(f"<tr><td>{html.escape(images['prompts'][p])}</td>{''.join(cells)}</tr>")
    head = "".join(f"<th>{html.escape(m)} top-1</th>" for m in metrics)
    return (f"<table class=img><tr><th>prompt</th><th>generation</th><th>planted source</th>{head}</tr>"
            + "".join(rows) + "</table>")


def write_page(path: str, numbers: dict, images: dict, train_images: np.ndarray) -> None:
    o = numbers["options"]
    chosen = numbers["default_metric"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>similarity benchmark</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:80em}} table{{border-collapse:collapse;margin:.6em 0}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:90%}} table.img img{{width:64px;image-rendering:pixelated}}</style>
</head><body><h1>Which metric finds the copied training image?</h1>
<p>Run <code>{html.escape(numbers['run'])}</code>: {numbers['n_train_images']} distinct training images searched for
every query; {numbers['n_planted_prompts']} planted prompts and {numbers['n_control_prompts']} control prompts x
{o['generations']} generations ({html.escape(o['sampler'])}, {o['steps']} steps, w = {o['guidance']:g}, seeds
{o['seed']}..{o['seed'] + o['generations'] - 1}); manifest v{numbers['manifest_version']}.</p>
<h2>Default neighbour metric: {html.escape(chosen['name'])}</h2><p>{html.escape(chosen['reason'])}.</p>
<h2>Retrieval of the planted source (planted generations)</h2>
<p>Share of planted prompts' generations whose nearest (recall@1) or five nearest (recall@5) training images include
the planted source (or its near copies); 95% intervals resample prompts. The model does not copy every time: the
ceiling is below 100% and the same for every metric, so read the paired differences.</p>{_retrieval_table(numbers)}
<h2>Copy decisions on generations</h2><p>A claim "copy of its nearest training image" when the nearest similarity
passes the rule's threshold. Right when a planted prompt's generation's nearest is its source; every claim on a
control prompt's generation is wrong. Intervals resample prompts.</p>{_decision_table(numbers['copy_decisions'])}
<h2>Known copies (truth without a model)</h2><p>{o['known_copies']} training images put through near-duplicate changes
(rotation up to {o['pair_spec']['near_rotation_deg']:g}°, shift up to {100 * o['pair_spec']['near_shift']:g}%,
contrast gamma, noise) or a heavy re-framing (rotation {o['pair_spec']['heavy_rotation_deg']}°, zoom
{o['pair_spec']['heavy_zoom']}, shift {o['pair_spec']['heavy_shift']}) must retrieve themselves (Wilson intervals).</p>
{_known_table(numbers)}<p>Copy decisions with near copies as positives and {numbers['n_heldout_images']} held-out
images (near-duplicate changes, never trained on) as negatives:</p>
{_decision_table({m: k['copy_decisions'] for m, k in numbers['known_copies'].items()})}
<h2>Examples</h2>{_examples(images, train_images)}
</body></html>"""
    write_text(path, page)
