"""The demo's headline numbers (as text lines) and its index page linking every output.

The lines are read back from the files the demo's stages wrote (the scan's metrics, the two
mitigations' summary.json), so they show exactly what those files hold.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path

from data_pipeline.atomic_files import write_text


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def planted_line(name: str, audit: dict) -> str:
    """One mitigation audit's planted ground truth, flagged share, quality and label conformance."""
    pix = audit["copying"].get("planted_pixels") or {}
    conf = (audit["quality"].get("label_conformance") or {}).get("generated") or {}
    lo, hi = pix.get("nearest_is_planted_ci95", (float("nan"), float("nan")))
    null = pix.get("null_rate")
    return (f"  {name:22s} planted generations whose nearest training image is their planted image: "
            f"{pix.get('nearest_is_planted_fraction', float('nan')):.0%} [95%: {lo:.0%}-{hi:.0%}] "
            f"(null {null if null is None else f'{null:.1%}'}); "
            f"planted flagged {audit['detection'].get('planted_flagged_fraction', float('nan')):.0%}; "
            f"FD (8x8 px) {audit['quality'].get('pixels_8x8', {}).get('frechet_to_heldout', float('nan')):.2f}; "
            f"label AUC {conf.get('macro_auc') or float('nan'):.2f}")


def headline_lines(audit: Path, guidance: Path, mitigation: Path) -> list[str]:
    """The headline numbers of the demo, as text lines (printed and put on the index page)."""
    lines = []
    metrics = _read_json(audit / "scores.metrics.json").get("metrics", {})
    if metrics:
        lines.append("Detection of planted duplicates vs frequency-matched controls (Wen score):")
        for key in ("score/planted_vs_control", "first_step_score/planted_vs_control"):
            if key in metrics:
                m = metrics[key]
                lines.append(f"  {key:40s} AUC {m['auc']:.3f}  TPR@1%FPR {m['tpr_at_1pct_fpr']:.3f}  "
                             f"balanced acc {m['best_balanced_accuracy']:.3f}")
    for title, path in (("Mitigation, guidance sweep (same prompts, seeds, threshold):", guidance),
                        ("Mitigation, prompt-embedding optimisation (same prompts, seeds, threshold):", mitigation)):
        runs = _read_json(path / "summary.json").get("runs", {})
        if runs:
            lines.append(title)
            lines += [planted_line(n, runs[n]) for n in runs]
            lines.append("  (null: how often the control prompts' generations have a given planted image as nearest)")
    return lines


def write_index(out_dir: Path, pages: list[tuple[str, Path]], lines: list[str]) -> None:
    """out/index.html: links to every output and the headline numbers."""
    items = "".join(f'<li>{html.escape(label)}: <a href="{html.escape(os.path.relpath(path, out_dir))}">'
                    f"{html.escape(os.path.relpath(path, out_dir))}</a></li>" for label, path in pages)
    text = html.escape("\n".join(lines))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>memdiff demo</title></head>"
            f"<body style='font-family:sans-serif;margin:1.5em'><h1>memdiff demo</h1><ul>{items}</ul>"
            f"<h2>Headline numbers</h2><pre>{text}</pre></body></html>")
    write_text(out_dir / "index.html", page)
