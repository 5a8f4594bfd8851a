"""`vlmops config`: print the resolved config (and so validate it)."""

from __future__ import annotations

import argparse

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved config (validates it)")
    add_config_args(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0
