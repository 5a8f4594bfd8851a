"""`vlmops sft`: fine-tune with LoRA or full SFT in a child process (torchrun for several GPUs)."""

from __future__ import annotations

import argparse

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="fine-tune with LoRA or full SFT (NPROC_PER_NODE=N for N GPUs)")
    add_config_args(p)
    p.add_argument("--run-dir", help="where checkpoints go (default: <output_dir>/runs/<run.name>-<time>)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.train.launch import sft_command

    return sft_command(args.config, args.overrides, args.run_dir)
