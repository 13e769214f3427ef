"""The training-time mitigation study as a page: every variant's numbers and its paired difference
against its reference (engine.mitigation.training_study)."""
from __future__ import annotations

import html
import os

from data_pipeline.atomic_files import write_text
from engine.reports.conditions_table import conditions_table


def write_study_page(out_dir: str, doc: dict) -> str:
    spec, screening = doc["spec"], doc.get("screening")
    screen = ("" if not screening else
              f"<p>Screening τ = {screening['tau_rms']:.4g} (RMS): the {screening['quantile']:g} quantile of the "
              f"baseline's training-time magnitudes; it would drop {100 * screening['dropped']:.1f}% of draws"
              + (f" ({100 * screening['dropped_planted']:.1f}% of the planted copies', "
                 f"{100 * screening['dropped_other']:.1f}% of the others')" if "dropped_planted" in screening else "")
              + ".</p>")
    dp = (f"<p>DP-SGD variants: target ε {', '.join(f'{e:g}' for e in spec['dp_epsilons'])}, δ {spec['dp_delta']:g}, "
          f"clip 1, Poisson sampling, PRV accountant; the privacy column is the accountant's figure at the end of "
          f"training. DP overrides: {html.escape(' '.join(spec['dp_overrides']) or 'none')}"
          + (" — DP is compared with the non-private baseline trained with the same overrides." if spec["dp_overrides"]
             else ".") + "</p>") if spec["dp_epsilons"] else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>memdiff: mitigation study</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:90em}} table{{border-collapse:collapse;margin:.6em 0}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:90%}}</style></head><body>
<h1>Mitigations against the baseline, same prompts and seeds</h1>
<p>Config <code>{html.escape(spec['config'])}</code> ({html.escape(' '.join(spec['overrides']))}); every variant
trained on the same splits and seeds; generations at w = {spec['guidance']:g} unless the condition says otherwise.
{doc['n_train_images']} training records, {doc['n_heldout_images']} held-out images.</p>{screen}{dp}
{conditions_table(doc)}</body></html>"""
    path = os.path.join(out_dir, "index.html")
    write_text(path, page)
    return path
