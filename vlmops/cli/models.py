"""`vlmops models`: the model catalog."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model catalog")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.models.catalog import models_command

    return models_command()
