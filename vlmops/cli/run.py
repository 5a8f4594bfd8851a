"""`vlmops run`: the whole retrain flow (download, validate, train, merge, eval, register)."""

from __future__ import annotations

import argparse

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the retrain flow (download, validate, train, merge, eval, register)")
    add_config_args(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    # The one place the library reaches up to the orchestration layer: `vlmops run` is the flow's launcher.
    from flows.retrain import run_from_cli

    return run_from_cli(args.config, args.overrides)
