"""`vlmops eval`: accuracy of a trained run on its saved eval split (and the base model's, to compare)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmops.cli.args import add_config_args
from vlmops.plural import counted


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run on its saved eval split")
    p.add_argument("--ckpt", required=True, help="training run or checkpoint folder")
    add_config_args(p, default=None)
    p.add_argument("--out", help="folder for predictions and metrics (default: <ckpt>/eval)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.evaluate.checkpoint import evaluate_checkpoint
    from vlmops.evaluate.run import EVAL_DIR
    from vlmops.train.rundir import run_config

    config = run_config(args.ckpt, args.config, args.overrides)
    result = evaluate_checkpoint(args.ckpt, config, args.out if args.out is not None else Path(args.ckpt) / EVAL_DIR)
    tuned = result.tuned
    speed = f"  [{result.tuned_batch.tokens_per_s:.1f} tokens/s]" if result.tuned_batch is not None else ""
    print(f"eval split: {result.eval_file} ({counted(tuned.total, 'record')}, metric {tuned.metric})")
    print(f"fine-tuned: accuracy {tuned.accuracy:.1%} ({tuned.correct}/{tuned.total}){speed}")
    if result.base is not None and result.comparison is not None:
        c = result.comparison
        print(f"base:       accuracy {result.base.accuracy:.1%} ({result.base.correct}/{result.base.total})")
        print(f"gain:       {c['gain'] * 100:+.1f} points (fixed {c['fixed']}, broke {c['broken']})")
    print(
        f"wrote {result.out_dir}/ (predictions.jsonl, metrics.json"
        + (", comparison.png)" if result.base is not None else ")")
    )
    return 0
