"""Tables of engine.audit.conditioning_study results: one row per condition (a run at a guidance
weight, a mitigation) with every number's 95% interval, then the paired differences against each
condition's reference. Used by the CFG vs no-CFG page and the mitigation study page."""
from __future__ import annotations

import html


def _ci(d: dict | None, key: str, pct: bool) -> str:
    if not d or d.get(key) is None or d["ci95"][0] is None:
        return "–"
    f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.3f}")
    return f"{f(d[key])} [{f(d['ci95'][0])}–{f(d['ci95'][1])}]"


def _diff(d: dict | None, pct: bool) -> str:
    if not d:
        return "–"
    f = (lambda x: f"{100 * x:+.1f} pts") if pct else (lambda x: f"{x:+.3f}")
    return f"{f(d['difference'])} [{f(d['ci95'][0])}, {f(d['ci95'][1])}]"


def _privacy(r: dict) -> str:
    p = r.get("privacy")
    return "–" if not p else f"ε {p['epsilon']:.3g} (δ {p.get('delta', 1e-5):g}, σ {p.get('noise_multiplier', float('nan')):.3g})"


def _row(r: dict, fd_names: list[str], extra: bool) -> str:
    fd = "".join(f"<td>{_ci(r['frechet'][n], 'value', False)} (real {r['frechet'][n]['real_train_vs_heldout']:.3f})"
                 f"</td>" for n in fd_names)
    nip = r.get("planted_nearest_is_planted")
    nip_txt = (f"{_ci(nip, 'mean', True)} ({100 * nip['null_rate']:.1f}%)" if nip and nip.get("null_rate") is not None
               else _ci(nip, "mean", True))
    cr = r.get("copy_rate") or {}
    copy_txt = " / ".join(_ci(cr.get(g), "mean", True) for g in ("planted", "control", "ordinary")) if cr else "–"
    det = r.get("detection") or {}
    det_txt = _ci(det, "auc", False) if "auc" in det else html.escape(det.get("not_applicable", "–"))
    lc = r.get("label_conformance")
    cells = f"<td>{html.escape(r['name'])}</td>"
    if extra:
        minutes = r.get("training_seconds_logged")
        cells += (f"<td>{r.get('steps', '–')}</td><td>{'–' if minutes is None else f'{minutes / 60:.1f}'}</td>"
                  f"<td>{_privacy(r)}</td>")
    return f"<tr>{cells}<td>{_ci(lc, 'value', False)}</td>{fd}<td>{nip_txt}</td><td>{copy_txt}</td><td>{det_txt}</td></tr>"


def conditions_table(q: dict) -> str:
    """HTML: the conditions' numbers, then their paired differences; `q` has "results", "options" or
    "spec"["audit"], "prompts"."""
    results = q["results"]
    extra = any("steps" in r or "privacy" in r for r in results)
    fd_names = list(results[0]["frechet"])
    head = ("<tr><th>condition</th>" + ("<th>steps</th><th>training min</th><th>privacy</th>" if extra else "")
            + "<th>label macro AUC</th>" + "".join(f"<th>FD {html.escape(n)}</th>" for n in fd_names)
            + "<th>nearest is planted (null)</th><th>copy rate planted / control / ordinary</th>"
              "<th>Wen AUC planted vs control</th></tr>")
    rows = "".join(_row(r, fd_names, extra) for r in results)
    paired = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['paired_vs_reference']['reference'])}</td>"
        f"<td>{_diff(r['paired_vs_reference'].get('planted_nearest_is_planted'), True)}</td>"
        f"<td>{_diff(r['paired_vs_reference'].get('copy_rate_all'), True)}</td>"
        f"<td>{_diff(r['paired_vs_reference'].get('label_conformance_macro_auc'), False)}</td>"
        f"<td>{_diff(r['paired_vs_reference'].get('wen_auc_planted_vs_control'), False)}</td></tr>"
        for r in results if r.get("paired_vs_reference"))
    o = q.get("options") or q["spec"]["audit"]
    groups = results[0]["groups"]
    real = (results[0].get("label_conformance") or {}).get("real_heldout") or {}
    real_auc = real.get("macro_auc")
    return (f"<p>{len(q['prompts'])} prompts ({', '.join(f'{v} {k}' for k, v in groups.items())}) x {o['generations']} "
            f"generations, DDIM {o['steps']} steps, seed of prompt i = {o['base_seed']} + i. Label conformance of real "
            f"held-out images: {'–' if real_auc is None else f'{real_auc:.3f}'}. 95% intervals resample prompts "
            f"(Fréchet distance and label AUC by bootstrap, rates prompt-clustered); Wen AUC by DeLong. Nearest is "
            f"planted: planted prompts' generations whose nearest training image (raw pixels) is their planted "
            f"image; in brackets the null rate (other prompts' generations landing on a planted image).</p>"
            f"<table>{head}{rows}</table>"
            + (f"<h3>Paired differences (same prompts and seeds, prompts resampled once for both sides)</h3>"
               f"<table><tr><th>condition</th><th>minus</th><th>nearest is planted</th><th>copy rate (all prompts)"
               f"</th><th>label macro AUC</th><th>Wen AUC</th></tr>{paired}</table>" if paired else ""))
