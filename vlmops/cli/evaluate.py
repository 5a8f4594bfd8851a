"""`vlmops eval`: accuracy of a trained run on its saved eval split (and the base model's, to compare)."""

from __future__ import annotations

import argparse

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run on its saved eval split")
    p.add_argument("--ckpt", required=True, help="training run or checkpoint folder")
    add_config_args(p, default=None)
    p.add_argument("--out", help="folder for predictions and metrics (default: <ckpt>/eval)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.evaluate.metrics import eval_command

    return eval_command(args.ckpt, args.config, args.overrides, args.out)
