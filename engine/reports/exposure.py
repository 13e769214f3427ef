"""The exposed-training-images table of a report: which training images (patients) the flagged prompts'
generations reproduce, with how often and by which prompts. Text from data goes through html.escape."""
from __future__ import annotations

import html

MAX_PROMPTS_SHOWN = 5


def exposure_section_html(rows: list[dict], meta: dict, max_rows: int = 200) -> str:
    count = lambda key: html.escape(str(meta.get(key, "?")))   # noqa: E731
    # which prompts (engine.audit.validation.exposure_prompts): the flagged ones, or the top-scoring ones
    intro = (f"<p>Prompts: {count('prompts_used')}; {count('generations')} generations "
             f"each. A generation reproduces a training image when its nearest training image (pixel Pearson "
             f"correlation) is above the copy threshold {meta.get('threshold', float('nan')):.4f} "
             f"({html.escape(str(meta.get('threshold_from', '')))}). {len(rows)} training images of "
             f"{count('n_patients')} patients are reproduced.</p>")
    if not rows:
        return "<h2>Exposed training images</h2>" + intro
    body = []
    for r in rows[:max_rows]:
        shown = r["prompts"][:MAX_PROMPTS_SHOWN]
        more = f" (+{len(r['prompts']) - len(shown)} more)" if len(r["prompts"]) > len(shown) else ""
        body.append(f"<tr><td>{html.escape(str(r['image_path']))}</td><td>{html.escape(str(r['patient_id']))}</td>"
                    f"<td>{r['times_reproduced']}</td><td>{r['n_prompts']}</td><td>{r['max_correlation']:.4f}</td>"
                    f"<td>{'<br>'.join(html.escape(p) for p in shown)}{html.escape(more)}</td></tr>")
    cut = f"<p>First {max_rows} of {len(rows)} rows; all are in the Parquet file.</p>" if len(rows) > max_rows else ""
    return ("<h2>Exposed training images</h2>" + intro +
            "<table><tr><th>training image</th><th>patient</th><th>times reproduced</th><th>prompts</th>"
            "<th>highest correlation</th><th>by prompts</th></tr>" + "".join(body) + "</table>" + cut)
