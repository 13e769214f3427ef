"""A scan for tens of thousands of prompts: a denoising-free score for every prompt, full trajectories
only for the top of the ranking (`tools/scan_memorization --mode fast`).

Stage 1 scores every prompt with a detector that needs no sampling (first-step Wen by default: one
[cond; uncond] forward per generation on the scan's pure noise). Stage 2 runs the ordinary scan (the
guided sampler with Wen's per-step magnitudes, engine.audit.scan.scan_prompts) for the `confirm_top`
fraction of prompts with the highest stage-1 scores, with the same seeds a full scan would give them,
so a confirmed prompt's row equals its row in a full scan.

Both stages are journaled under `<out>.parts/` (stage 1 as `fast-*.parquet` parts, stage 2 as the
scan's own journal of `confirm.parquet`), so an interrupted fast scan resumes where it stopped; the
confirmed set is a pure function of the stage-1 scores, so a resumed run confirms the same prompts.
The final Parquet has one row per prompt: `fast_score` for all, and for confirmed rows the per-step
magnitudes and the full-scan scores (null elsewhere), `confirmed`, `flagged` and the group.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_pipeline.atomic_files import write_json
from engine.audit.batch_size import fastest_batch, fastest_scan_batch
from engine.audit.detectors.base import PromptBatch
from engine.audit.detectors.registry import get_detector
from engine.audit.intervals import detection_summary, proportion_interval
from engine.audit.prompt_lists import encode_prompts
from engine.audit.scan import (
    META_KEY,
    PART_SCHEMA,
    ScanResult,
    check_scan_meta,
    model_fingerprint,
    reference_threshold,
    scan_inputs,
    scan_metadata,
    scan_prompts,
    write_scan_table,
)
from engine.audit.wen_detector import DetectorSettings
from engine.diffusion.seeds import prompt_seeds

FAST_PART_SCHEMA = pa.schema([("prompt_index", pa.int64()), ("fast_score", pa.float64())])
JOURNAL_EVERY = 500      # stage-1 prompts per journal part: an interruption loses at most this many scores


@dataclass(frozen=True)
class FastSettings:
    detector: str = "first_step_wen"
    generations: int | None = None          # generations of stage 1 (default: the scan's)
    confirm_top: float = 0.01               # fraction of prompts confirmed with full trajectories
    params: dict | None = None              # fitted weights of a fitted detector (e.g. from a benchmark)

    def __post_init__(self) -> None:
        if not 0.0 < self.confirm_top <= 1.0:
            raise ValueError(f"confirm top: expected a fraction in (0, 1], got {self.confirm_top}")
        detector = get_detector(self.detector)
        if detector.needs_generations:
            raise ValueError(f"fast detector: {self.detector} needs full generations; choose a denoising-free one")
        if detector.fitted and self.params is None:
            raise ValueError(f"fast detector: {self.detector} combines terms with fitted weights; give its "
                             f"fitted_params (tools/benchmark_detectors writes them to detectors.json)")

    def stage_settings(self, settings: DetectorSettings) -> DetectorSettings:
        return DetectorSettings(**{**settings.to_dict(), "generations": self.generations or settings.generations})

    def to_dict(self) -> dict:
        return asdict(self)


def confirm_selection(scores: np.ndarray, confirm_top: float) -> list[int]:
    """Indices of the ceil(confirm_top * P) highest scores (at least one), ties broken by index."""
    k = max(1, math.ceil(confirm_top * len(scores) - 1e-9))
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))
    return sorted(int(i) for i in order[:k])


def _fast_parts(journal: str) -> dict[int, float]:
    done: dict[int, float] = {}
    for part in sorted(glob.glob(os.path.join(journal, "fast-*.parquet"))):
        for row in pq.read_table(part).to_pylist():
            done.setdefault(int(row["prompt_index"]), float(row["fast_score"]))
    return done


def fast_scores(loaded, tokens, journal: str, settings: DetectorSettings, fast: FastSettings, *,
                batch_prompts: int, progress: bool = True) -> np.ndarray:
    """Stage 1: the fast detector's score [P] of every prompt, resuming from the journal's fast parts."""
    detector, stage = get_detector(fast.detector), fast.stage_settings(settings)
    done = _fast_parts(journal)
    todo = [i for i in range(tokens.shape[0]) if i not in done]
    bar = tqdm(total=tokens.shape[0], initial=len(done), unit="prompt", desc=f"fast ({fast.detector})",
               disable=not progress, dynamic_ncols=True)
    pending: dict[int, float] = {}

    def flush() -> None:
        if pending:
            idx = sorted(pending)
            write_scan_table(pa.table({"prompt_index": pa.array(idx, pa.int64()),
                                       "fast_score": pa.array([pending[i] for i in idx], pa.float64())},
                                      schema=FAST_PART_SCHEMA), os.path.join(journal, f"fast-{idx[0]:09d}.parquet"))
            done.update(pending)
            pending.clear()

    for b0 in range(0, len(todo), batch_prompts):
        idx = todo[b0:b0 + batch_prompts]
        scores = detector.score(loaded, PromptBatch(tokens[idx], prompt_seeds(idx, stage.base_seed)), stage,
                                params=fast.params)
        pending.update(zip(idx, scores.tolist()))
        if len(pending) >= JOURNAL_EVERY:
            flush()
        bar.update(len(idx))
    flush()
    bar.close()
    return np.array([done[i] for i in range(tokens.shape[0])])


def auto_batch_sizes(loaded, tokens, settings: DetectorSettings, fast: FastSettings, log=print) -> tuple[int, int]:
    """(stage-1 batch, stage-2 batch) with the most prompts/s on this device, measured on the first prompts.
    Stage 2 is timed on one guided step: every sampling step is the same network call."""
    detector, stage = get_detector(fast.detector), fast.stage_settings(settings)
    n = tokens.shape[0]
    b1, rates1 = fastest_batch(lambda b: detector.score(loaded, PromptBatch(tokens[:b], list(range(b))), stage,
                                                        params=fast.params), n, time_budget_s=6.0)
    b2, rates2 = fastest_scan_batch(loaded, tokens, settings, max(1, math.ceil(fast.confirm_top * n)), 6.0)
    fmt = lambda r: ", ".join(f"{b}: {v:.0f}" for b, v in r.items())  # noqa: E731
    log(f"batch prompts auto: fast stage {b1} (prompts/s {fmt(rates1)}); confirmation {b2} "
        f"(prompt-steps/s {fmt(rates2)})")
    return b1, b2


def fast_scan(loaded, prompt_list, out_path: str, settings: DetectorSettings, fast: FastSettings, *,
              batch_prompts: int | str = 16, threshold: float | None = None, groups: list[str] | None = None,
              save_images: str | None = None, csv_too: bool = False, extra_meta: dict | None = None,
              progress: bool = True, log=print):
    """Both stages (resumably), then the final one-row-per-prompt table at `out_path`. Returns a ScanResult."""
    tokens = encode_prompts(loaded.vocab, prompt_list)
    meta = {"model": model_fingerprint(loaded), "settings": settings.to_dict(), "fast": fast.to_dict(),
            "parameterization": loaded.diffusion_config.parameterization, "n_prompts": len(prompt_list.prompts)}
    journal = out_path + ".parts"
    if os.path.exists(out_path):      # finished earlier: nothing to scan, only the flags may change
        table = pq.read_table(out_path)
        check_scan_meta(scan_metadata(table).get("scan", {}), meta, out_path)
        table = reflag(table, threshold)
        write_scan_table(table, out_path, csv_too=csv_too)
        return ScanResult(table, threshold, 0)
    os.makedirs(journal, exist_ok=True)
    meta_path = os.path.join(journal, "fast-meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            check_scan_meta(json.load(f), meta, journal)
    write_json(meta_path, meta)
    if batch_prompts == "auto":
        b1, b2 = auto_batch_sizes(loaded, tokens, settings, fast, log)
    else:
        b1 = b2 = int(batch_prompts)
    scores = fast_scores(loaded, tokens, journal, settings, fast, batch_prompts=b1, progress=progress)
    confirm = confirm_selection(scores, fast.confirm_top)
    confirmed = scan_prompts(loaded, prompt_list, os.path.join(journal, "confirm.parquet"), settings,
                             indices=confirm, batch_prompts=b2, threshold=threshold, save_images=save_images,
                             groups=groups, progress=progress, description="confirm (full trajectories)")
    table = fast_table(confirmed.table, scores, prompt_list, tokens, meta, threshold, groups, extra_meta)
    write_scan_table(table, out_path, csv_too=csv_too)
    shutil.rmtree(journal)
    return ScanResult(table, threshold, len(prompt_list.prompts))


def reflag(table: pa.Table, threshold: float | None) -> pa.Table:
    """A finished fast scan flagged anew: confirmed rows whose full score is above `threshold`."""
    score = np.array([np.nan if v is None else v for v in table.column("score").to_pylist()], np.float64)
    flagged = table.column("confirmed").to_numpy(zero_copy_only=False) & (
        score > threshold if threshold is not None else np.zeros(len(score), bool))
    table = table.set_column(table.column_names.index("flagged"), "flagged", pa.array(flagged, pa.bool_()))
    info = {**scan_metadata(table), "threshold": threshold}
    return table.replace_schema_metadata({META_KEY: json.dumps(info).encode()})


def fast_table(confirmed: pa.Table, scores: np.ndarray, prompt_list, tokens, meta: dict, threshold: float | None,
               groups: list[str] | None, extra_meta: dict | None) -> pa.Table:
    """Every prompt's row: the confirmation scan's row where there is one, otherwise prompt, seed and the
    stage-1 score with the full-scan columns null."""
    by_index = {int(r["prompt_index"]): r for r in confirmed.to_pylist()}
    derived = ("score", "score_raw", "first_step_score", "first_step_score_raw")
    rows = []
    for i, prompt in enumerate(prompt_list.prompts):
        row = by_index.get(i)
        if row is None:
            row = {"prompt_index": i, "prompt": prompt, "tokens": tokens[i].tolist(),
                   "train_count": prompt_list.train_counts[i] if prompt_list.train_counts else None,
                   "seed": prompt_seeds([i], meta["settings"]["base_seed"])[0], "norms_raw": None,
                   "norms_rms": None, **{k: None for k in derived}, "flagged": False}
        rows.append({**row, "fast_score": float(scores[i]), "confirmed": i in by_index,
                     **({"group": groups[i]} if groups is not None else {})})
    schema = pa.schema([*PART_SCHEMA, *[(k, pa.float32()) for k in derived], ("flagged", pa.bool_()),
                        ("fast_score", pa.float64()), ("confirmed", pa.bool_()),
                        *([("group", pa.string())] if groups is not None else [])])
    info = {**scan_metadata(confirmed), "scan": meta, "mode": "fast", "threshold": threshold,
            "confirmed": int(sum(r["confirmed"] for r in rows)), **(extra_meta or {})}
    return pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata({META_KEY: json.dumps(info).encode()})


def fast_metrics(table: pa.Table) -> dict:
    """Detection by the stage-1 score of planted prompts against controls, ordinary prompts and both (AUC
    and TPR@1%FPR with intervals and n), and the share of planted prompts that stage 2 confirmed."""
    if "group" not in table.column_names:
        return {}
    group = np.array(table.column("group").to_pylist())
    score = table.column("fast_score").to_numpy()
    planted = group == "planted"
    out = {}
    for name, negative in (("control", group == "control"), ("ordinary", group == "ordinary"),
                           ("all", ~planted)):
        if planted.sum() >= 2 and negative.sum() >= 2:
            out[f"fast_score/planted_vs_{name}"] = detection_summary(score[planted], score[negative]).to_dict()
    if planted.any():
        confirmed = table.column("confirmed").to_numpy(zero_copy_only=False)
        k, n = int((confirmed & planted).sum()), int(planted.sum())
        out["planted_confirmed"] = {"fraction": k / n, "ci95": list(proportion_interval(k, n)), "k": k, "n": n,
                                    "n_confirmed": int(confirmed.sum())}
    return out


def format_fast_metrics(metrics: dict) -> str:
    lines = []
    for name, m in metrics.items():
        if name == "planted_confirmed":
            lines.append(f"planted prompts confirmed: {m['k']}/{m['n']} ({m['fraction']:.0%}, 95% CI "
                         f"{m['ci95'][0]:.0%}-{m['ci95'][1]:.0%}) among {m['n_confirmed']} confirmed prompts")
        else:
            lines.append(f"{name:38s} AUC {m['auc']:.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}]  TPR@1%FPR "
                         f"{m['tpr_at_1pct_fpr']:.3f} [{m['tpr_ci'][0]:.3f}, {m['tpr_ci'][1]:.3f}]  "
                         f"(n+ {m['n_positive']}, n- {m['n_negative']})")
    return "\n".join(lines)


def fast_scan_checkpoint(checkpoint: str, out_path: str, settings: DetectorSettings, fast: FastSettings, *,
                         prompts_file: str | None = None, column: str = "prompt", train_prompts: bool = False,
                         batch_prompts: int | str = "auto", threshold: float | None = None,
                         calibrate_fpr: float | None = None, reference_prompts: str | None = None,
                         save_images: str | None = None, csv_too: bool = False, device: str = "cpu",
                         max_prompts: int | None = None, force: bool = False, progress: bool = True,
                         log=print) -> ScanResult:
    """tools/scan_memorization --mode fast: the scan of engine.audit.scan.scan_checkpoint in two stages.
    Writes `out_path` and, with planted ground truth, `<out stem>.metrics.json` (fast_metrics)."""
    inputs = scan_inputs(checkpoint, out_path, settings, prompts_file=prompts_file, column=column,
                         train_prompts=train_prompts, threshold=threshold, calibrate_fpr=calibrate_fpr,
                         reference_prompts=reference_prompts, save_images=save_images, device=device,
                         max_prompts=max_prompts, force=force, log=log)
    if inputs.reference is not None:
        threshold = reference_threshold(inputs, out_path, settings, calibrate_fpr,
                                        batch_prompts=16 if batch_prompts == "auto" else int(batch_prompts),
                                        progress=progress, log=log)
    result = fast_scan(inputs.loaded, inputs.prompts, out_path, settings, fast, batch_prompts=batch_prompts,
                       threshold=threshold, groups=inputs.groups, save_images=save_images, csv_too=csv_too,
                       extra_meta={"null_condition": inputs.null_condition}, progress=progress, log=log)
    result.metrics = fast_metrics(result.table)
    if result.metrics:
        write_json(os.path.splitext(out_path)[0] + ".metrics.json",
                   {"threshold": threshold, "metrics": result.metrics, "null_condition": inputs.null_condition})
    return result
