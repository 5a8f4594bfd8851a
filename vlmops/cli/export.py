"""`vlmops export --merge-lora`: merge a run's LoRA adapter into a plain checkpoint (parity-checked)."""

from __future__ import annotations

import argparse

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained run; --merge-lora merges the adapter into the base")
    p.add_argument("--ckpt", required=True, help="training run or checkpoint folder")
    p.add_argument("--merge-lora", action="store_true", help="merge the LoRA adapter (as swift export --merge_lora)")
    p.add_argument("--out", help="output folder (default: <ckpt>-merged)")
    add_config_args(p, default=None)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.train.merge import export_command

    return export_command(args.ckpt, args.merge_lora, args.out, args.config, args.overrides)
