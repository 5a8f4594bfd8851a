"""`vlmops validate`: check a dataset and print its report."""

from __future__ import annotations

import argparse

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="validate the configured dataset and print its report")
    add_config_args(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.data.validate_command import validate_command

    return validate_command(args.config, args.overrides)
