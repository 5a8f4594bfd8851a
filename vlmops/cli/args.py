"""Arguments several commands share."""

from __future__ import annotations

import argparse


def add_config_args(
    parser: argparse.ArgumentParser, default: str | None = "pipeline.yaml", default_text: str | None = None
) -> None:
    """`--config FILE` and repeatable `--set KEY=VALUE` overrides; `default_text` says what an absent --config means
    where the command decides it (default: `default`, or the built-in defaults)."""
    said = default_text or default or "built-in defaults"
    parser.add_argument("--config", "-c", default=default, help=f"pipeline config file (default: {said})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=2 (repeatable)",
    )
