"""The token-significance page: each prompt as a strip of token chips shaded by Wen's SS_i.

Self-contained HTML (no scripts, no external CSS); every token, prompt and title is escaped. The
numbers come from engine.mitigation.token_significance.significance_document.
"""
from __future__ import annotations

import html
import os

from data_pipeline.atomic_files import write_json, write_text


def _heat_colour(fraction: float) -> str:
    # white -> red; fraction in [0, 1]
    f = min(max(fraction, 0.0), 1.0)
    g = int(round(255 * (1 - f)))
    return f"rgb(255,{g},{g})"


def heat_strip_html(tokens: list[str], scores: list[float], title: str | None = None) -> str:
    """One prompt as a row of token chips shaded by significance (relative to the prompt's maximum).

    Self-contained inline HTML (no scripts, no external CSS); every token and the title are escaped,
    so it can be dropped into any report page.
    """
    if len(tokens) != len(scores):
        raise ValueError(f"heat strip: {len(tokens)} tokens but {len(scores)} scores")
    top = max([s for s in scores if s == s] + [0.0])
    chips = []
    for tok, s in zip(tokens, scores):
        frac = s / top if top > 0 else 0.0
        chips.append(
            f'<span title="SS = {s:.4g}" style="display:inline-block;margin:1px;padding:2px 5px;'
            f'border:1px solid #bbb;border-radius:3px;font-family:monospace;background:{_heat_colour(frac)}">'
            f'{html.escape(tok)}<sub style="color:#555">{s:.2g}</sub></span>')
    head = f'<div style="font-size:90%;color:#333">{html.escape(title)}</div>' if title else ""
    return f'<div class="heat-strip" style="margin:4px 0">{head}{"".join(chips)}</div>'


def significance_report_html(entries: list[dict], heading: str = "Token significance", warning: str = "") -> str:
    """A whole page: one heat strip per entry {prompt, tokens: [{token, score}], mean_norm_rms}."""
    body = [f"<p style='color:#b00;font-weight:bold'>{html.escape(warning)}</p>"] if warning else []
    for e in entries:
        title = f"{e['prompt']}   (mean L per element {e.get('mean_norm_rms', float('nan')):.4g})"
        body.append(heat_strip_html([t["token"] for t in e["tokens"]], [t["score"] for t in e["tokens"]], title))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(heading) + "</title></head>"
            "<body style='font-family:sans-serif'><h1>" + html.escape(heading) + "</h1>"
            "<p>SS<sub>i</sub> = mean over sampling steps of the squared norm of the gradient of "
            "||&epsilon;<sub>cond</sub> &minus; &epsilon;<sub>uncond</sub>|| with respect to the encoder output "
            "at token i, along the guided trajectory. Shading is relative to each prompt's largest score.</p>"
            + "".join(body) + "</body></html>")


def write_significance(out_path: str, document: dict) -> str:
    """The document as JSON at `out_path` and its page beside it (same name, .html); returns the page's path."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    write_json(out_path, document)
    html_path = os.path.splitext(out_path)[0] + ".html"
    forced = (document.get("null_condition") or {}).get("forced_without_null_condition")
    warning = ("FORCED: this model was trained with conditioning.p_uncond = 0; its null prompt was never trained, "
               "so L and these scores are meaningless.") if forced else ""
    write_text(html_path, significance_report_html(document["prompts"], warning=warning))
    return html_path
