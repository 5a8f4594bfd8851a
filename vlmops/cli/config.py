"""`vlmops config [--show]`: validate the config and print it resolved, every key with its value.

`--show` is the spelling error messages point to; plain `vlmops config` does the same, so both work.
"""

from __future__ import annotations

import argparse

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved config, every key (validates it)")
    add_config_args(p)
    p.add_argument("--show", action="store_true", help="print the resolved config with every key (the default action)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0
