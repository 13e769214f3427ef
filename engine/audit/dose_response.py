"""Did memorization happen? The planted ground truth against copies x training length (the dose-response).

Before any detector is judged, a study must show that planted duplicates were memorized at all. For
every EMA snapshot of a run (<run>/exports/step_N/ from training.export_every, then the final
<run>/export) this module generates the same prompts from the same seeds — every planted prompt, every
control and a seeded sample of ordinary training prompts — and measures, in raw pixels (no learned
model):
- nearest-is-planted per (dose, kind) cell, per dose, per kind and overall, each against its null rate
  (engine.audit.planted_truth.nearest_is_planted_by_cell), with prompt-resampled 95% intervals;
- the copy rate per group under the fixed copy rule (engine.audit.copy_rule);
- Wen's score and its detection AUC per dose (evaluation-half planted prompts of that dose against
  evaluation-half controls, DeLong interval): detection against copies x training length.
A cell is "memorized" at a snapshot when the lower end of its nearest-is-planted interval lies above
the upper end of its null rate's interval. Generations are scanned resumably into <out>/step_N/.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from engine.audit.copy_rule import RULE, pixel_copy_threshold, pixel_nearest
from engine.audit.generation_audit import GROUPS, scan_generations
from engine.audit.intervals import auc_interval, cluster_bootstrap_mean
from engine.audit.planted_truth import nearest_is_planted_by_cell, planted_entry, prompt_groups, prompt_splits
from engine.audit.run_data import TrainingImages, read_manifest, run_prompts, split_images
from engine.audit.scan import subsample_prompts
from engine.audit.wen_detector import DetectorSettings, mean_score
from engine.model.export import CONFIG, WEIGHTS, load_model

SNAPSHOT_DIR = re.compile(r"step_(\d+)")


@dataclass(frozen=True)
class DoseResponseOptions:
    generations: int = 4
    steps: int = 20
    guidance: float = 7.5
    ordinary: int = 64            # ordinary training prompts generated next to planted and controls
    batch_prompts: int = 32
    seed: int = 0

    def settings(self) -> DetectorSettings:
        return DetectorSettings(generations=self.generations, steps=self.steps, guidance=self.guidance,
                                base_seed=self.seed)


def snapshots(run_dir: str) -> list[tuple[int, str]]:
    """(step, export dir) of every snapshot under <run>/exports/ and the final <run>/export, by step."""
    found = {}
    exports = os.path.join(run_dir, "exports")
    for name in sorted(os.listdir(exports)) if os.path.isdir(exports) else []:
        m = SNAPSHOT_DIR.fullmatch(name)
        if m and os.path.isfile(os.path.join(exports, name, WEIGHTS)):
            found[int(m.group(1))] = os.path.join(exports, name)
    final = os.path.join(run_dir, "export")
    if os.path.isfile(os.path.join(final, CONFIG)):
        with open(os.path.join(final, CONFIG)) as f:
            step = json.load(f).get("metadata", {}).get("step")
        if isinstance(step, int) and step not in found:
            found[step] = final
    if not found:
        raise ValueError(f"{run_dir}: no exported model (export/ or exports/step_N/)")
    return sorted(found.items())


def study_prompts(run_dir: str, manifest: dict, ordinary: int, seed: int):
    """Every planted and control prompt of the run's training split plus `ordinary` seeded ordinary ones."""
    plist = run_prompts(run_dir)
    groups = prompt_groups(plist.prompts, manifest)
    n_truth = sum(g != "ordinary" for g in groups)
    return subsample_prompts(plist, groups, n_truth + ordinary, seed)


def detection_by_dose(score: np.ndarray, prompts: list[str], groups: list[str], manifest: dict) -> list[dict]:
    """AUC (DeLong 95% interval) of evaluation-half planted prompts of each dose against evaluation-half controls."""
    halves = np.array(prompt_splits(prompts, manifest))
    groups = np.array(groups)
    dose = np.array([e.copies if e is not None else 0 for e in (planted_entry(p, manifest) for p in prompts)])
    negatives = score[(groups == "control") & (halves == "evaluation")]
    out = []
    for d in sorted(set(dose[groups == "planted"])):
        positives = score[(groups == "planted") & (dose == d) & (halves == "evaluation")]
        if len(positives) >= 2 and len(negatives) >= 2:
            a = auc_interval(positives, negatives)
            out.append({"copies": int(d), "auc": a["auc"], "ci95": a["ci95"], "n_positive": a["n_positive"],
                        "n_negative": a["n_negative"]})
    return out


def snapshot_truth(loaded, plist, groups: list[str], manifest: dict, train: TrainingImages, copy_threshold: float,
                   opts: DoseResponseOptions, out_dir: str, progress: bool = True) -> dict:
    """Ground truth, copy rates and detection of one snapshot (its generations scanned into out_dir)."""
    gens = scan_generations(loaded, plist, opts.settings(), out_dir, manifest=manifest, groups=groups,
                            batch_prompts=opts.batch_prompts, progress=progress, description="dose-response")
    p, g = gens.images.shape[:2]
    values, index = pixel_nearest(gens.images.reshape(p * g, *gens.images.shape[2:]), train.images)
    nearest_paths = np.asarray(train.image_paths)[index].reshape(p, g)
    copies = (values > copy_threshold).reshape(p, g).astype(np.float64)
    group = np.array(gens.groups)
    copy_rate = {}
    for name in GROUPS:
        if (group == name).any():
            c = cluster_bootstrap_mean(copies[group == name])
            copy_rate[name] = {"rate": c["mean"], "ci95": c["ci95"], "n_prompts": c["n_prompts"]}
    score = mean_score(torch.from_numpy(gens.norms_rms)).numpy().astype(np.float64)
    return {"truth": nearest_is_planted_by_cell(nearest_paths, gens.prompts, manifest, gens.groups),
            "copy_rate": copy_rate, "detection_by_dose": detection_by_dose(score, gens.prompts, gens.groups, manifest),
            "nearest_correlation_median": float(np.median(values))}


def memorized_cells(truth: dict) -> list[dict]:
    """Cells whose nearest-is-planted interval lies above their null rate's interval."""
    out = []
    for cell in truth.get("by_cell", []):
        null_hi = (cell.get("null_ci95") or [0.0, 0.0])[1]
        if cell["ci95"][0] > null_hi:
            out.append({"copies": cell["copies"], "kind": cell["kind"], "rate": cell["rate"], "ci95": cell["ci95"]})
    return out


def dose_response(run_dir: str, out_dir: str, opts: DoseResponseOptions = DoseResponseOptions(), *,
                  device: str = "cpu", progress: bool = True, log: Callable[[str], None] = print,
                  load: Callable = load_model) -> dict:
    """The study over every snapshot of `run_dir` (JSON-able); generations under out_dir/step_N/.
    `load(path, device)` loads a snapshot (engine.model.export.load_model; tests pass an oracle)."""
    manifest = read_manifest(run_dir)
    if not manifest:
        raise ValueError(f"{run_dir}: no planted_manifest.json (the dose-response needs planted duplicates)")
    found = snapshots(run_dir)
    train = split_images(run_dir, "train", progress=progress)
    copy_threshold = pixel_copy_threshold(train.images, split_images(run_dir, "val", progress=progress).images)
    plist, groups = study_prompts(run_dir, manifest, opts.ordinary, opts.seed)
    loaded_models = []
    for step, path in found:                        # every model checked before any sampling
        loaded = load(path, device)
        if not loaded.metadata.get("p_uncond", 1.0) > 0:
            raise ValueError(f"{path}: trained with conditioning.p_uncond 0, so it has no null condition for "
                             f"guided generation; audit the run's CFG counterpart")
        loaded_models.append((step, path, loaded))
    log(f"dose-response: {len(found)} snapshots (steps {', '.join(str(s) for s, _ in found)}), "
        f"{len(plist.prompts)} prompts ({groups.count('planted')} planted, {groups.count('control')} controls, "
        f"{groups.count('ordinary')} ordinary) x {opts.generations} generations")
    rows = []
    for step, path, loaded in loaded_models:
        entry = snapshot_truth(loaded, plist, groups, manifest, train, copy_threshold, opts,
                               os.path.join(out_dir, f"step_{step}"), progress)
        rows.append({"step": step, "export": path, **entry, "memorized": memorized_cells(entry["truth"])})
        log(f"  step {step}: nearest-is-planted {entry['truth']['all']['rate']:.1%} (null "
            f"{entry['truth']['all'].get('null_rate', float('nan')):.2%}); memorized cells: "
            + (", ".join(f"{c['copies']}x {c['kind']}" for c in rows[-1]["memorized"]) or "none"))
    return {"run": os.path.abspath(run_dir), "options": asdict(opts), "copy_rule": RULE,
            "copy_threshold": copy_threshold, "n_train_images": int(len(train.images)),
            "dose_levels": manifest.get("dose_levels"), "kinds": manifest.get("kinds", ["exact"]),
            "n_prompts": {name: groups.count(name) for name in GROUPS}, "snapshots": rows,
            "regime": regime_summary(rows)}


def regime_summary(rows: list[dict]) -> str:
    """One sentence: at the last snapshot, which cells are memorized, and since which step each."""
    last = rows[-1]
    if not last["memorized"]:
        return (f"no planted cell is memorized above its null rate by step {last['step']}: detectors cannot be "
                f"judged on this run")
    first_seen = {}
    for row in rows:
        for c in row["memorized"]:
            first_seen.setdefault((c["copies"], c["kind"]), row["step"])
    cells = ", ".join(f"{c['copies']} copies {c['kind']} ({c['rate']:.0%} [{c['ci95'][0]:.0%}, {c['ci95'][1]:.0%}], "
                      f"from step {first_seen[(c['copies'], c['kind'])]})" for c in last["memorized"])
    return f"memorized at step {last['step']} (nearest-is-planted interval above the null): {cells}"
