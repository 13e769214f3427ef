#!/usr/bin/env python3
"""Train a conditional diffusion model on chest X-rays.

    deepspeed engine/train.py --config configs/cfg.json [--set data.root=/data/CheXpert-v1.0-small]
    deepspeed --num_gpus 8 engine/train.py --config configs/cfg.json --resume auto
    python engine/train.py --config configs/demo_cpu.json          # one process, no launcher

The config is validated before anything else runs; errors are one line naming the key. Every
other error of ours (output folder, data files, checkpoints, divergence) is one line naming the
file, row or key, exit status 3; a traceback means a bug.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click  # noqa: E402

from engine.cli import one_line  # noqa: E402
from engine.training.config import ConfigError, load_config  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="training config JSON (see configs/ and engine/training/config.py)")
@click.option("--set", "overrides", multiple=True, metavar="KEY.SUB=VALUE",
              help="override one config value (JSON value, else a string); repeatable")
@click.option("--resume", type=click.Choice(["auto", "never"]), default="never", show_default=True,
              help="auto: continue from the latest checkpoint in output_dir if there is one")
@click.option("--stop-at", type=click.IntRange(min=1), default=None,
              help="checkpoint and exit after this optimizer step (e.g. to fit a job time limit); "
                   "the schedule still follows training.steps, so --resume auto continues seamlessly")
@click.option("--local_rank", "--local-rank", type=int, default=None, hidden=True)  # set by the deepspeed launcher
def main(config_path: str, overrides: tuple[str, ...], resume: str, stop_at: int | None, local_rank: int | None) -> None:
    """Train a conditional U-Net diffusion model (DeepSpeed, any ZeRO stage, 1..N processes)."""
    try:
        cfg = load_config(config_path, list(overrides))
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    from engine.training.checkpointing import CheckpointError
    from engine.training.trainer import TrainingError, train
    try:
        train(cfg, resume=resume == "auto", stop_at=stop_at)
    except (TrainingError, CheckpointError, ValueError, OSError) as exc:
        # ValueError: data_pipeline's readers and checks (bad rows, non-UTF-8 files, paths outside the
        # dataset root, vocabulary, privacy state); OSError: unreadable input, unwritable output.
        if os.environ.get("RANK", "0") == "0":
            click.echo(f"error: {one_line(exc)}", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
