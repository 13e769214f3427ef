"""Scanning thousands of prompts for memorization, resumably, into one Parquet row per prompt.

Work is journaled: every finished batch of prompts is written atomically as its own part file under
`<out>.parts/`, next to a `meta.json` holding the settings. A rerun with the same output reads the
finished prompts back (from the parts and from a previous final file) and scans only the rest, so an
interrupted scan loses no finished row and no row is ever written twice. The final Parquet is rebuilt
from all rows at the end (atomically) and the journal removed.

Parts hold only the raw record (per-step magnitudes); scores, thresholds and flags are derived when
the final file is written, so re-thresholding or another step range never needs a rescan.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from data_pipeline.atomic_files import atomic_path, check_writable, write_json
from data_pipeline.config_schema import build
from data_pipeline.images import to_uint8, write_png
from engine.audit.batch_size import fastest_scan_batch
from engine.audit.detection_metrics import comparisons, detection_metrics, operating_point, prompt_kinds
from engine.audit.planted_truth import prompt_groups, prompt_splits
from engine.audit.prompt_lists import PromptList, encode_prompts, load_prompts, training_prompt_list
from engine.audit.roc import calibrate_threshold
from engine.audit.run_data import prompt_counts, read_manifest
from engine.audit.wen_detector import DetectorSettings, detect, first_step_score, mean_score
from engine.diffusion.finite import require_finite
from engine.diffusion.seeds import prompt_seeds
from engine.model.network_files import file_sha1

META_KEY = b"memdiff_scan"
PART_SCHEMA = pa.schema([
    ("prompt_index", pa.int64()), ("prompt", pa.string()), ("tokens", pa.list_(pa.int32())),
    ("train_count", pa.int64()), ("seed", pa.int64()),
    ("norms_raw", pa.list_(pa.list_(pa.float32()))), ("norms_rms", pa.list_(pa.list_(pa.float32()))),
])


def model_fingerprint(loaded) -> str:
    """Content hash of the exported weights: a resumed scan must use the same model."""
    return file_sha1(os.path.join(str(loaded.path), "model.safetensors"))[:16]


# ---- journal ------------------------------------------------------------------------------------

def write_scan_table(table: pa.Table, path: str, csv_too: bool = False) -> None:
    """A scan table as Parquet (atomically); with csv_too also <path stem>.csv (nested columns as JSON)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    if csv_too:
        import pyarrow.csv as pacsv
        flat = table
        for name in ("tokens", "norms_raw", "norms_rms"):
            if name in flat.column_names:  # CSV has no lists: nested columns become JSON text
                col = [json.dumps(v) for v in flat.column(name).to_pylist()]
                flat = flat.set_column(flat.column_names.index(name), name, pa.array(col, pa.string()))
        with atomic_path(os.path.splitext(path)[0] + ".csv") as tmp:
            pacsv.write_csv(flat, str(tmp))


def _journal_dir(out_path: str) -> str:
    return out_path + ".parts"


def check_scan_meta(found: dict, expected: dict, where: str) -> None:
    """A one-line error when a journal or finished file was made with other settings than this run's."""
    for key, value in expected.items():
        if found.get(key) != value:
            raise ValueError(f"{where}: was scanned with {key}={found.get(key)!r}, now {value!r}; "
                             f"use another --out or delete it to rescan")


def _read_table(path: str) -> pa.Table:
    """A Parquet file this scan wrote earlier; anything else there is a one-line error, never overwritten."""
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: exists and is not a memdiff scan ({' '.join(str(e).split())[:120]}); "
                         f"use another --out") from None


def _finished_rows(out_path: str, meta: dict) -> list[dict]:
    """Rows already finished: from a previous final file and from the journal's part files."""
    rows: dict[int, dict] = {}
    sources = []
    if os.path.exists(out_path):
        table = _read_table(out_path)
        found = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
        check_scan_meta(found.get("scan", {}), meta, out_path)
        sources.append((out_path, table.select(PART_SCHEMA.names)))
    journal = _journal_dir(out_path)
    if os.path.isdir(journal):
        meta_path = os.path.join(journal, "meta.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                check_scan_meta(json.load(f), meta, journal)
        for part in sorted(glob.glob(os.path.join(journal, "part-*.parquet"))):
            sources.append((part, _read_table(part)))
    for where, table in sources:
        for name in ("norms_raw", "norms_rms"):   # a damaged journal must not come back as "not flagged"
            require_finite(pc.list_flatten(pc.list_flatten(table.column(name))).to_numpy(), f"{where}: {name}")
        for row in table.to_pylist():
            rows.setdefault(int(row["prompt_index"]), row)  # a prompt is in at most one source; first wins
    return [rows[i] for i in sorted(rows)]


# ---- the scan ------------------------------------------------------------------------------------

@dataclass
class ScanResult:
    table: pa.Table
    threshold: float | None
    n_scanned_now: int
    metrics: dict = field(default_factory=dict)


def scan_prompts(loaded, prompt_list: PromptList, out_path: str, settings: DetectorSettings, *,
                 batch_prompts: int = 16, step_range: tuple[int, int] | None = None,
                 threshold: float | None = None, save_images: str | None = None, csv_too: bool = False,
                 groups: list[str] | None = None, progress: bool = True, description: str = "scan",
                 indices: list[int] | None = None, notes: dict | None = None,
                 on_batch: Callable[[int], None] | None = None) -> ScanResult:
    """Scan every prompt (resuming from `out_path` and its journal), then write the final table.

    `indices` restricts the scan to those positions of the list (the confirmation stage of a fast scan):
    each keeps its position as prompt_index, hence the seed a full scan would give it. `notes` (JSON-able)
    go into the final table's metadata (e.g. the null-condition record). `on_batch(n_done)` is called
    after each batch is journaled (tests use it to interrupt a scan).
    """
    if batch_prompts < 1:
        raise ValueError(f"batch prompts: expected >= 1, got {batch_prompts}")
    model, schedule = loaded.model, loaded.schedule
    cfg = loaded.unet_config
    image_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    tokens = encode_prompts(loaded.vocab, prompt_list)
    meta = {"model": model_fingerprint(loaded), "settings": settings.to_dict(),
            "parameterization": loaded.diffusion_config.parameterization, "image_shape": list(image_shape)}
    done = _finished_rows(out_path, meta)
    for row in done:
        i = row["prompt_index"]
        if i >= len(prompt_list.prompts) or prompt_list.prompts[i] != row["prompt"]:
            now = prompt_list.prompts[i] if i < len(prompt_list.prompts) else "<none>"
            raise ValueError(f"{out_path}: row {i} holds prompt {row['prompt']!r} but the prompt list has "
                             f"{now!r} there; use another --out for another prompt list")
    done_idx = {row["prompt_index"] for row in done}
    wanted = range(len(prompt_list.prompts)) if indices is None else sorted(set(indices))
    todo = [i for i in wanted if i not in done_idx]

    journal = _journal_dir(out_path)

    bar = tqdm(total=len(wanted), initial=len(done_idx), unit="prompt", desc=description,
               disable=not progress, dynamic_ncols=True)
    for b0 in range(0, len(todo), batch_prompts):
        idx = todo[b0:b0 + batch_prompts]
        seeds = prompt_seeds(idx, settings.base_seed)
        det = detect(model, schedule, tokens[idx], seeds, settings, image_shape=image_shape,
                     parameterization=loaded.diffusion_config.parameterization, keep_images=bool(save_images))
        part = pa.table({
            "prompt_index": pa.array(idx, pa.int64()),
            "prompt": [prompt_list.prompts[i] for i in idx],
            "tokens": pa.array([tokens[i].tolist() for i in idx], pa.list_(pa.int32())),
            "train_count": pa.array([prompt_list.train_counts[i] if prompt_list.train_counts else None
                                     for i in idx], pa.int64()),
            "seed": pa.array(seeds, pa.int64()),
            "norms_raw": pa.array(det.norms_raw.tolist(), PART_SCHEMA.field("norms_raw").type),
            "norms_rms": pa.array(det.norms_rms.tolist(), PART_SCHEMA.field("norms_rms").type),
        }, schema=PART_SCHEMA)
        if not os.path.isdir(journal):   # made with the first finished batch: a failed first batch leaves nothing
            os.makedirs(journal)
            write_json(os.path.join(journal, "meta.json"), meta)
        if det.images is not None:
            _save_images(save_images, idx, det.images)
        write_scan_table(part, os.path.join(journal, f"part-{idx[0]:09d}.parquet"))
        bar.update(len(idx))
        if on_batch is not None:
            on_batch(b0 + len(idx))
    bar.close()

    rows = _finished_rows(out_path, meta)
    table = finalize_table(rows, meta, step_range=step_range, threshold=threshold, groups=groups, notes=notes)
    write_scan_table(table, out_path, csv_too=csv_too)
    if os.path.isdir(journal):
        shutil.rmtree(journal)  # every journaled row is now in the final file
    return ScanResult(table, threshold, len(todo))


def _save_images(out_dir: str, prompt_indices: list[int], images: torch.Tensor) -> None:
    pixels = to_uint8(images)
    for row, i in enumerate(prompt_indices):
        for g in range(pixels.shape[1]):
            write_png(os.path.join(out_dir, f"{i:06d}_g{g}.png"), pixels[row, g])


def finalize_table(rows: list[dict], meta: dict, *, step_range: tuple[int, int] | None = None,
                   threshold: float | None = None, groups: list[str] | None = None,
                   notes: dict | None = None) -> pa.Table:
    """Rows + derived scores (rms and raw, mean and first step) + flags, with the settings as metadata."""
    raw = torch.tensor([r["norms_raw"] for r in rows], dtype=torch.float32) if rows else torch.zeros(0, 1, 1)
    rms = torch.tensor([r["norms_rms"] for r in rows], dtype=torch.float32) if rows else torch.zeros(0, 1, 1)
    score = mean_score(rms, step_range).numpy()
    columns = {name: [r[name] for r in rows] for name in PART_SCHEMA.names}
    table = pa.table(columns, schema=PART_SCHEMA)
    table = table.append_column("score", pa.array(score, pa.float32()))
    table = table.append_column("score_raw", pa.array(mean_score(raw, step_range).numpy(), pa.float32()))
    table = table.append_column("first_step_score", pa.array(first_step_score(rms).numpy(), pa.float32()))
    table = table.append_column("first_step_score_raw", pa.array(first_step_score(raw).numpy(), pa.float32()))
    flagged = score > threshold if threshold is not None else np.zeros(len(rows), bool)
    table = table.append_column("flagged", pa.array(flagged, pa.bool_()))
    if groups is not None:
        table = table.append_column("group", pa.array([groups[r["prompt_index"]] for r in rows], pa.string()))
    info = {"scan": meta, "threshold": threshold, "step_range": list(step_range) if step_range else None,
            "score": "mean over generations and steps of ||eps_c - eps_u|| / sqrt(C*H*W) (rms); *_raw: unscaled",
            **(notes or {})}
    return table.replace_schema_metadata({META_KEY: json.dumps(info).encode()})


def scan_metadata(table: pa.Table) -> dict:
    return json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))


def read_scores(path: str) -> pa.Table:
    """A finished scan's table; a one-line error if the file is not one."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: scores file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a Parquet file ({e})") from None
    missing = [c for c in ("prompt_index", "prompt", "score", "first_step_score", "seed") if c not in table.column_names]
    if missing or META_KEY not in (table.schema.metadata or {}):
        raise ValueError(f"{path}: not a memdiff scan (missing {missing or 'scan metadata'})")
    for column in ("score", "first_step_score"):
        require_finite(table.column(column).to_numpy(), f"{path}: column {column!r}")
    try:
        scan_settings(table)
    except ValueError as e:
        raise ValueError(f"{path}: scan metadata: {e}") from None
    return table


def scan_settings(table: pa.Table) -> DetectorSettings:
    """The detector settings a scan was made with, checked like a config section (the file may be
    anyone's)."""
    try:
        meta = scan_metadata(table)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    scan = meta.get("scan") if isinstance(meta, dict) else None
    if not isinstance(scan, dict):
        raise ValueError("no 'scan' object")
    return build(DetectorSettings, scan.get("settings"), "scan.settings")


# ---- detection against the planted ground truth (engine.audit.planted_truth) ---------------------

def _table_groups(table: pa.Table) -> list[str] | None:
    return table.column("group").to_pylist() if "group" in table.column_names else None


def planted_comparisons(table: pa.Table, manifest: dict | None = None):
    """Yield (`<score>/<comparison>`, positive scores, negative scores) on the evaluation half
    (engine.audit.detection_metrics.comparisons) for the mean and first-step scores (scans with groups only)."""
    groups = _table_groups(table)
    if groups is None:
        return
    prompts = table.column("prompt").to_pylist()
    g, halves = np.array(groups), np.array(prompt_splits(prompts, manifest))
    kinds = prompt_kinds(prompts, groups, manifest)
    for score_name in ("score", "first_step_score"):
        s = table.column(score_name).to_numpy()
        for name, pos, neg in comparisons(g, halves, kinds):
            if pos.any() and neg.any():
                yield f"{score_name}/{name}", s[pos], s[neg]


def ground_truth_metrics(table: pa.Table, manifest: dict | None = None) -> dict:
    """Detection summaries (AUC and TPR@1%FPR with intervals, n) of planted prompts against controls,
    ordinary prompts and by kind, on the evaluation half, plus `operating_point`: the threshold from the
    calibration half and the evaluation half's flagged shares (engine.audit.detection_metrics)."""
    groups = _table_groups(table)
    if groups is None or "planted" not in groups:
        return {}
    prompts = table.column("prompt").to_pylist()
    scores = {name: table.column(name).to_numpy().astype(np.float64) for name in ("score", "first_step_score")}
    out = detection_metrics(scores, prompts, groups, manifest)
    out["operating_point"] = operating_point(scores["score"], prompts, groups, manifest)
    return out


def threshold_from_reference(reference_table: pa.Table, target_fpr: float) -> float:
    return calibrate_threshold(reference_table.column("score").to_numpy(), target_fpr)


def format_metrics(metrics: dict) -> str:
    lines = []
    for name, m in metrics.items():
        if name == "operating_point":
            if "threshold" in m:
                t, f = m["tpr"], m["fpr_control"]
                lines.append(f"{'threshold (calibration half, 1% FPR)':42s} {m['threshold']:.6g}: evaluation half "
                             f"planted flagged {t['k']}/{t['n']}, controls flagged {f['k']}/{f['n']}, ordinary "
                             f"flagged {m['fpr_ordinary']['k']}/{m['fpr_ordinary']['n']}")
        elif "auc" in m:
            lines.append(f"{name:42s} AUC {m['auc']:.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}]  TPR@1%FPR "
                         f"{m['tpr_at_1pct_fpr']:.3f} [{m['tpr_ci'][0]:.3f}, {m['tpr_ci'][1]:.3f}]  best bal. acc "
                         f"{m['best_balanced_accuracy']:.3f}  (evaluation half: n+ {m['n_positive']}, n- {m['n_negative']})")
        else:
            lines.append(f"{name:42s} {m['note']} (n+ {m['n_positive']}, n- {m['n_negative']})")
    return "\n".join(lines)


def subsample_prompts(plist: PromptList, groups: list[str] | None, max_prompts: int,
                      seed: int) -> tuple[PromptList, list[str] | None]:
    """At most `max_prompts` prompts: every planted and control prompt, then a seeded random sample of
    the others, in their original order (the same arguments always give the same list, so resuming works)."""
    if max_prompts < 1:
        raise ValueError(f"max prompts: expected >= 1, got {max_prompts}")
    n = len(plist.prompts)
    ground_truth = [i for i in range(n) if groups and groups[i] != "ordinary"]
    others = [i for i in range(n) if not (groups and groups[i] != "ordinary")]
    rng = np.random.default_rng(seed)
    room = max(0, max_prompts - len(ground_truth))
    keep = sorted(ground_truth + [int(i) for i in rng.permutation(others)[:room]])
    pick = lambda xs: [xs[i] for i in keep] if xs is not None else None  # noqa: E731
    return PromptList(pick(plist.prompts), pick(plist.locations), pick(plist.train_counts),
                      plist.duplicates_dropped), pick(groups)


# ---- the whole audit scan of a run (what tools/scan_memorization does) -----------------------------

@dataclass
class ScanInputs:
    """Everything a scan of a run needs, checked before the first forward pass."""
    loaded: object                              # engine.model.export.LoadedModel
    prompts: PromptList
    groups: list[str] | None                    # planted / control / ordinary, when the run has a manifest
    reference: PromptList | None                # prompts taken as not memorized (threshold calibration)
    null_condition: dict                        # engine.model.null_condition record, written into every output


def scan_inputs(checkpoint: str, out_path: str, settings: DetectorSettings, *, prompts_file: str | None = None,
                column: str = "prompt", train_prompts: bool = False, threshold: float | None = None,
                calibrate_fpr: float | None = None, reference_prompts: str | None = None,
                save_images: str | None = None, device: str = "cpu", max_prompts: int | None = None,
                force: bool = False, log=print) -> ScanInputs:
    """Check the arguments, load the model (refusing one without a trained null condition unless `force`:
    Wen's score needs it), gather and encode the prompts, and find their planted-truth groups."""
    from engine.model.export import load_model
    from engine.model.null_condition import require_null_condition

    if (prompts_file is None) == (not train_prompts):
        raise ValueError("give exactly one of --prompts FILE or --train-prompts")
    if threshold is not None and calibrate_fpr is not None:
        raise ValueError("give either --threshold or --calibrate-fpr, not both")
    if calibrate_fpr is not None and reference_prompts is None:
        raise ValueError("--calibrate-fpr needs --reference-prompts FILE (prompts taken as not memorized)")
    check_writable(os.path.dirname(os.path.abspath(out_path)))
    if save_images:
        check_writable(save_images)
    loaded = load_model(checkpoint, device=device)
    record = require_null_condition(loaded, "Wen's score (tools/scan_memorization)", force)
    if "note" in record:
        log(record["note"])
    if train_prompts:
        counts = prompt_counts(checkpoint)
        plist = training_prompt_list(list(counts.elements()), "train split")
    else:
        plist = load_prompts(prompts_file, column)
        try:
            counts = prompt_counts(checkpoint)
        except ValueError:
            counts = None            # an export without its run: training counts unknown
        if counts is not None:
            plist.train_counts = [counts.get(p, 0) for p in plist.prompts]
    if plist.duplicates_dropped:
        log(f"{plist.duplicates_dropped} repeated prompts kept once")
    reference = load_prompts(reference_prompts, column) if reference_prompts else None
    encode_prompts(loaded.vocab, plist)                          # fail fast on unknown phrases
    if reference is not None:
        encode_prompts(loaded.vocab, reference)
    groups = prompt_groups(plist.prompts, read_manifest(checkpoint))
    if max_prompts is not None and len(plist.prompts) > max_prompts:
        plist, groups = subsample_prompts(plist, groups, max_prompts, settings.base_seed)
        log(f"scanning {len(plist.prompts)} prompts (planted and control prompts kept, others sampled)")
    return ScanInputs(loaded, plist, groups, reference, record)


def reference_threshold(inputs: ScanInputs, out_path: str, settings: DetectorSettings, calibrate_fpr: float, *,
                        batch_prompts: int = 16, step_range: tuple[int, int] | None = None, progress: bool = True,
                        log=print) -> float:
    """Scan the reference prompts (full trajectories, into <out stem>.reference.parquet) and return the
    threshold that flags at most `calibrate_fpr` of them."""
    ref_out = os.path.splitext(out_path)[0] + ".reference.parquet"
    ref = scan_prompts(inputs.loaded, inputs.reference, ref_out, settings, batch_prompts=batch_prompts,
                       step_range=step_range, progress=progress, description="reference",
                       notes={"null_condition": inputs.null_condition})
    threshold = threshold_from_reference(ref.table, calibrate_fpr)
    log(f"threshold {threshold:.6g} (FPR <= {calibrate_fpr} on {len(inputs.reference.prompts)} reference prompts)")
    return threshold


def scan_checkpoint(checkpoint: str, out_path: str, settings: DetectorSettings, *, prompts_file: str | None = None,
                    column: str = "prompt", train_prompts: bool = False, batch_prompts: int | str = 16,
                    step_range: tuple[int, int] | None = None, threshold: float | None = None,
                    calibrate_fpr: float | None = None, reference_prompts: str | None = None,
                    save_images: str | None = None, csv_too: bool = False, device: str = "cpu",
                    max_prompts: int | None = None, force: bool = False, progress: bool = True,
                    log=print) -> ScanResult:
    """Load the model, gather prompts, scan (resumably), calibrate, and score against planted ground truth.

    Every input is checked before the first forward pass. Writes `out_path` (and `<out>.metrics.json`
    when the run has a planted manifest; `<out stem>.reference.parquet` when calibrating). `batch_prompts`
    "auto" measures the fastest batch on this device first. The model's null-condition record (engine.model.null_condition) goes into every one of them.
    """
    inputs = scan_inputs(checkpoint, out_path, settings, prompts_file=prompts_file, column=column,
                         train_prompts=train_prompts, threshold=threshold, calibrate_fpr=calibrate_fpr,
                         reference_prompts=reference_prompts, save_images=save_images, device=device,
                         max_prompts=max_prompts, force=force, log=log)
    if batch_prompts == "auto":
        tokens = encode_prompts(inputs.loaded.vocab, inputs.prompts)
        batch_prompts, rates = fastest_scan_batch(inputs.loaded, tokens, settings, len(inputs.prompts.prompts))
        log(f"batch prompts auto: {batch_prompts} (prompt-steps/s " + ", ".join(f"{b}: {r:.0f}" for b, r in
                                                                             rates.items()) + ")")
    if inputs.reference is not None:
        threshold = reference_threshold(inputs, out_path, settings, calibrate_fpr, batch_prompts=batch_prompts,
                                        step_range=step_range, progress=progress, log=log)
    result = scan_prompts(inputs.loaded, inputs.prompts, out_path, settings, batch_prompts=batch_prompts,
                          step_range=step_range, threshold=threshold, save_images=save_images, csv_too=csv_too,
                          groups=inputs.groups, progress=progress, notes={"null_condition": inputs.null_condition})
    result.threshold = threshold
    result.metrics = ground_truth_metrics(result.table, read_manifest(checkpoint))
    if result.metrics:
        write_json(os.path.splitext(out_path)[0] + ".metrics.json",
                   {"threshold": threshold, "metrics": result.metrics, "null_condition": inputs.null_condition})
    return result
