"""`vlmops download`: fetch (and convert) the configured base model."""

from __future__ import annotations

import argparse

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="download (and convert) the configured base model")
    add_config_args(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.models.download import download_command

    return download_command(args.config, args.overrides)
