"""`vlmops sft`: fine-tune with LoRA or full SFT in a child process (torchrun for several GPUs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vlmops.cli.args import add_config_args
from vlmops.errors import RunFailed
from vlmops.plural import counted

if TYPE_CHECKING:
    from vlmops.train.sft import TrainResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="fine-tune with LoRA or full SFT (NPROC_PER_NODE=N for N GPUs)")
    add_config_args(p)
    p.add_argument("--run-dir", help="where checkpoints go (default: <output_dir>/runs/<run.name>-<time>)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Fetch the base model, validate the data, then train in a child process; print a summary."""
    from vlmops.config import load_config
    from vlmops.data.prepare import prepare_from_config
    from vlmops.models.download import download_model
    from vlmops.models.loading import load_processor
    from vlmops.train.launch import TRAIN_LOG, TrainingFailed, default_run_dir, launch_training

    config = load_config(args.config, args.overrides)
    base_model = download_model(config.model, config.storage, config.run.output_dir).path
    prepared = prepare_from_config(config, load_processor(base_model))
    folder = Path(args.run_dir) if args.run_dir else default_run_dir(config)
    print(f"run folder: {folder} (resume a stopped run with --run-dir {folder})", file=sys.stderr)
    config_file = Path(args.config) if args.config else None
    try:
        result = launch_training(config_file, base_model, prepared.path, folder, args.overrides)
    except TrainingFailed as err:
        # The child's output already streamed to the terminal: point at the saved copy, not a second tail.
        raise RunFailed(f"training failed (exit code {err.returncode}); see {TRAIN_LOG} in the run folder") from err
    print(summary(result))
    return 0


def summary(result: TrainResult) -> str:
    """A few lines a person can read at the end of a run."""
    steps = counted(result.steps, "step")
    lines = [
        f"trained {steps}: train loss {result.train_loss:.4f}, best eval loss {result.eval_loss:.4f}",
        f"trainable params {result.trainable_params:,} of {result.total_params:,}; "
        f"{result.tokens_per_s:,.0f} tokens/s, {result.samples_per_s:.1f} samples/s",
        f"result: {result.final_dir}",
        f"best checkpoint: {result.best_checkpoint}; last: {result.last_checkpoint}",
    ]
    if result.dropped_records or result.truncated_records:
        lines.append(
            f"data.max_length: {counted(len(result.dropped_records), 'record')} dropped, "
            f"{len(result.truncated_records)} truncated"
        )
    return "\n".join(lines)
