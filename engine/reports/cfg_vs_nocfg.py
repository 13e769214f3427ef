"""Two training runs side by side, as a page a person can look at.

    <out>/loss_curves.png   both runs' loss curves overlaid (raw faint, smoothed solid)
    <out>/samples.png       the same prompts and seeds from both runs: a CFG run at several guidance
                            weights, a run trained without the null prompt at w = 1
    <out>/quantified.json   with `quantify`: label conformance, Fréchet distance, memorization and
                            detection per run and guidance weight, with intervals and paired
                            differences (engine.audit.conditioning_study)
    <out>/index.html        the two images, each run's key settings and final loss, and the numbers
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence

from data_pipeline.atomic_files import write_json, write_text
from data_pipeline.images import to_uint8
from data_pipeline.json_files import read_json_object
from engine.audit.conditioning_study import StudyOptions, quantify_runs
from engine.audit.run_data import read_manifest, run_real_images, split_prompts
from engine.diffusion.generate import generate
from engine.model.export import load_model
from engine.reports.conditions_table import conditions_table
from engine.reports.image_grid import panels_figure, save_figure
from engine.reports.loss_curves import plot_loss_curves, read_metrics


def _run_info(run: Path) -> dict:
    cfg_path = run / "config.json"
    cfg = read_json_object(cfg_path) if cfg_path.is_file() else {}
    metrics = read_metrics(run)
    conditioning = cfg.get("conditioning", {})
    p_uncond = conditioning.get("p_uncond") if isinstance(conditioning, dict) else None
    if p_uncond is not None and not (isinstance(p_uncond, (int, float)) and not isinstance(p_uncond, bool)
                                     and 0 <= p_uncond <= 1):
        raise ValueError(f"{cfg_path}: conditioning.p_uncond: expected a number in [0, 1], got {str(p_uncond)[:40]}")
    return {"name": run.name, "config": cfg, "metrics": metrics,
            "p_uncond": p_uncond,
            "final_loss": next((r["loss"] for r in reversed(metrics) if "loss" in r), None),
            "steps": metrics[-1]["step"] if metrics else None}


def _default_prompts(runs: Sequence[Path]) -> tuple[list[str], list[int]]:
    for run in runs:
        path = run / "sample_prompts.json"
        if path.is_file():
            d = read_json_object(path)
            prompts, seeds = d.get("prompts"), d.get("seeds")
            if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts) and isinstance(seeds, list)
                    and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
                raise ValueError(f"{path}: expected \"prompts\" (texts) and \"seeds\" (integers >= 0)")
            return prompts, seeds
    raise FileNotFoundError(f"none of {', '.join(map(str, runs))} has sample_prompts.json: pass prompts explicitly")


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike, out_dir: str | os.PathLike, *,
                 guidance: Sequence[float] = (1.0, 3.0, 7.5), prompts: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None, steps: int = 50, sampler: str = "ddim",
                 device: str = "cpu", quantify: StudyOptions | None = None, copy_detector=None,
                 label_classifier=None, log=lambda s: None) -> Path:
    """Write the comparison page; returns the path of index.html. With `quantify`, both runs are also
    measured on the same prompts and seeds (RUN_A's ground truth and real images)."""
    runs = [Path(run_a), Path(run_b)]
    infos = [_run_info(r) for r in runs]   # both runs' files checked before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [f"{i['name']}" if infos[0]["name"] != infos[1]["name"] else f"{tag}: {i['name']}"
              for tag, i in zip("AB", infos)]
    plot_loss_curves({label: info["metrics"] for label, info in zip(labels, infos)}, out / "loss_curves.png",
                     title="training loss")

    default_prompts, default_seeds = _default_prompts(runs) if prompts is None or seeds is None else ([], [])
    prompts = list(prompts) if prompts is not None else default_prompts
    seeds = list(seeds) if seeds is not None else default_seeds
    panels, loaded_runs, run_weights = [], [], []
    for run, label, info in zip(runs, labels, infos):
        loaded = load_model(run, device)
        tokens = loaded.vocab.encode_batch(prompts)
        p_uncond = info["p_uncond"] if info["p_uncond"] is not None else loaded.metadata.get("p_uncond")
        weights = list(guidance) if (p_uncond or 0) > 0 else [1.0]
        loaded.metadata.setdefault("p_uncond", p_uncond)
        loaded_runs.append(loaded)
        run_weights.append(weights)
        for w in weights:
            images = generate(loaded.model, loaded.schedule, tokens, seeds, guidance=w, steps=steps, sampler=sampler,
                              parameterization=loaded.diffusion_config.parameterization, device=device)
            panels.append((f"{label}\nw = {w:g}", to_uint8(images)))
    save_figure(panels_figure(panels, prompts, title="same prompts (rows) and seeds (columns)"), out / "samples.png")

    numbers_html = ""
    if quantify is not None:
        q = quantify_runs(loaded_runs, labels, run_weights, run_real_images(str(run_a), "val", progress=False),
                          read_manifest(str(run_a)), split_prompts(str(run_a), "train"), copy_detector=copy_detector,
                          label_classifier=label_classifier, opts=quantify, log=log)
        write_json(out / "quantified.json", q)
        numbers_html = f"<h2>Label adherence, quality and memorization</h2>{conditions_table(q)}"

    def loss_text(info: dict) -> str:
        return "" if info["final_loss"] is None else f"{info['final_loss']:.4f}"

    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{html.escape(str(run))}</td><td>{html.escape(str(info['p_uncond']))}</td>"
        f"<td>{html.escape(str(info['steps']))}</td><td>{loss_text(info)}</td></tr>"
        for label, run, info in zip(labels, runs, infos))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>memdiff: {html.escape(labels[0])} vs {html.escape(labels[1])}</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:1em auto}} td,th{{padding:2px 10px;text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>{html.escape(labels[0])} vs {html.escape(labels[1])}</h1>
<table><tr><th>run</th><th>directory</th><th>p_uncond</th><th>steps</th><th>final loss</th></tr>{rows}</table>
<h2>Loss curves</h2><img src="loss_curves.png" alt="loss curves">
<h2>Samples</h2>
<p>Every panel starts from the same initial noise per column (seeds {html.escape(str(seeds))}), {html.escape(str(steps))} {html.escape(sampler.upper())}
steps. Runs trained with the null prompt (p_uncond &gt; 0) are shown at several guidance weights w; a run trained
without it only at w = 1 (its unconditional branch was never trained).</p>
<img src="samples.png" alt="sample grids">
{numbers_html}
</body></html>
"""
    return write_text(out / "index.html", page)
