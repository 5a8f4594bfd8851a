"""Arguments several commands share."""

from __future__ import annotations

import argparse


def add_config_args(parser: argparse.ArgumentParser, default: str | None = "pipeline.yaml") -> None:
    """`--config FILE` and repeatable `--set KEY=VALUE` overrides."""
    parser.add_argument(
        "--config", "-c", default=default, help=f"pipeline config file (default: {default or 'built-in defaults'})"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=2 (repeatable)",
    )
