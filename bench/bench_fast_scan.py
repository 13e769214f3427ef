"""Wall clock of `tools/scan_memorization --mode fast` on N distinct prompts (default 10,000) of a trained run,
start-up included, and its detection AUC against the full scan's interval on the same ground-truth prompts.

    OMP_NUM_THREADS=2 python bench/bench_fast_scan.py --checkpoint RUN --out DIR

1. N distinct prompts: the run's own training prompts (planted, control, ordinary: the ground truth), then
   prompts drawn from the grammar (bench/fast_scan_prompts.py).
2. The fast scan of all N (first-step Wen for every prompt, full trajectories for the top --confirm-top),
   timed as a subprocess: what a user waits for.
3. The full scan (every step, the reference) of the run's training prompts only, and the AUC of planted vs
   control prompts with its DeLong interval; the fast scan's stage-1 AUC on the same prompts must fall
   inside it. Also: how many planted prompts the fast scan confirmed.
Prints a Markdown block for bench/RESULTS.md and writes DIR/bench_fast_scan.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from fast_scan_prompts import build_prompts  # noqa: E402

from data_pipeline.atomic_files import write_json, write_text  # noqa: E402
from engine.audit.intervals import auc_interval  # noqa: E402
from engine.audit.run_data import split_prompts  # noqa: E402
from engine.model.export import load_model  # noqa: E402


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def auc_by_group(path: str, column: str, negatives: str = "control") -> tuple[float, list[float], int, int]:
    t = pq.read_table(path, columns=["prompt", "group", column]).to_pydict()
    group, score = np.array(t["group"]), np.array(t[column], np.float64)
    a = auc_interval(score[group == "planted"], score[group == negatives])
    return a["auc"], a["ci95"], a["n_positive"], a["n_negative"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--confirm-top", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--fast-generations", type=int, default=1, help="generations per prompt of the fast stage")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-full", action="store_true", help="reuse DIR/full.parquet if it exists")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    py, tool = sys.executable, str(REPO / "tools" / "scan_memorization")

    training = split_prompts(args.checkpoint, "train")
    prompts = build_prompts(load_model(args.checkpoint).vocab, training, args.n)
    prompts_file = out / f"prompts_{args.n}.txt"
    write_text(prompts_file, "".join(p + "\n" for p in prompts))
    common = ["--checkpoint", args.checkpoint, "--steps", str(args.steps), "--generations", str(args.generations),
              "--quiet"]

    fast_out = out / "fast.parquet"
    for stale in (fast_out, out / "fast.metrics.json"):
        if stale.exists():
            stale.unlink()
    load_before = os.getloadavg()
    fast_s, fast_log = timed([py, tool, *common, "--prompts", str(prompts_file), "--mode", "fast",
                              "--confirm-top", str(args.confirm_top), "--batch-prompts", "auto",
                              "--fast-generations", str(args.fast_generations),
                              "--out", str(fast_out)], env)
    load_after = os.getloadavg()

    full_out = out / "full.parquet"
    full_s = None
    if not (args.skip_full and full_out.exists()):
        full_s, _ = timed([py, tool, *common, "--train-prompts", "--batch-prompts", "auto", "--out", str(full_out)],
                          env)
    fast_table = pq.read_table(fast_out, columns=["prompt", "group", "fast_score", "confirmed"]).to_pydict()
    truth = set(dict.fromkeys(training))
    keep = [i for i, p in enumerate(fast_table["prompt"]) if p in truth]
    group = np.array(fast_table["group"])[keep]
    fast = np.array(fast_table["fast_score"], np.float64)[keep]
    fast_auc = auc_interval(fast[group == "planted"], fast[group == "control"])
    full_auc = auc_by_group(str(full_out), "score")
    full_first = auc_by_group(str(full_out), "first_step_score")
    confirmed = np.array(fast_table["confirmed"])
    planted_all = np.array(fast_table["group"]) == "planted"
    result = {
        "n_prompts": len(prompts), "confirm_top": args.confirm_top, "confirmed": int(confirmed.sum()),
        "steps": args.steps, "generations": args.generations, "fast_generations": args.fast_generations,
        "threads": args.threads,
        "fast_scan_seconds": fast_s, "full_scan_of_training_prompts_seconds": full_s,
        "load_average_before_after": [load_before[0], load_after[0]],
        "fast_auc_planted_vs_control": [fast_auc["auc"], fast_auc["ci95"]],
        "full_auc_planted_vs_control": [full_auc[0], full_auc[1]],
        "full_first_step_auc_planted_vs_control": [full_first[0], full_first[1]],
        "n_planted": full_auc[2], "n_control": full_auc[3],
        "fast_auc_inside_full_interval": bool(full_auc[1][0] <= fast_auc["auc"] <= full_auc[1][1]),
        "planted_confirmed": [int((confirmed & planted_all).sum()), int(planted_all.sum())],
        "batch_choice": [ln for ln in fast_log.splitlines() if "batch prompts auto" in ln],
    }
    write_json(out / "bench_fast_scan.json", result)
    print(json.dumps(result, indent=1))
    print(f"\n| prompts | confirmed (top {args.confirm_top:.0%}) | wall clock, start-up included | "
          f"stage-1 AUC planted vs control | full-scan AUC [95%] | inside | planted confirmed |\n|---|---|---|---|---|---|---|\n"
          f"| {len(prompts):,} | {result['confirmed']} | {fast_s:.0f} s | {fast_auc['auc']:.3f} | "
          f"{full_auc[0]:.3f} [{full_auc[1][0]:.3f}, {full_auc[1][1]:.3f}] (n+ {full_auc[2]}, n- {full_auc[3]}) | "
          f"{'yes' if result['fast_auc_inside_full_interval'] else 'NO'} | "
          f"{result['planted_confirmed'][0]}/{result['planted_confirmed'][1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
