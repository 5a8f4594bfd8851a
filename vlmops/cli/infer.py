"""`vlmops infer`: interactive chat with a model, `<img>path-or-URL</img>` in a query adds an image."""

from __future__ import annotations

import argparse
import logging

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="chat with a model; <img>path-or-URL</img> in a query adds an image")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", "-m", help="catalog name, checkpoint folder, or models:/NAME@ALIAS")
    source.add_argument("--ckpt", help="a training run (or checkpoint) folder: base model + trained weights")
    add_config_args(p, default=None)
    p.add_argument("--system", help="system prompt (default: the model's; '' for none)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.infer.interactive import infer_command

    if not args.verbose:  # a chat session shows answers, not library progress logs
        logging.getLogger().setLevel(logging.WARNING)
    return infer_command(args.model, args.ckpt, args.config, args.overrides, args.system)
