"""`vlmops validate`: check a dataset and print its report."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="validate the configured dataset and print its report")
    add_config_args(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from transformers import AutoProcessor

    from vlmops.config import load_config
    from vlmops.data.prepare import prepare_from_config
    from vlmops.models.download import download_model

    config = load_config(args.config, args.overrides)
    snapshot = download_model(config.model, config.storage, Path(config.run.output_dir))
    processor = AutoProcessor.from_pretrained(snapshot.path)
    prepared = prepare_from_config(config, processor)
    print(prepared.report.summary())
    print(f"snapshot: {prepared.path}")
    print(f"report:   {prepared.path / 'report.json'}")
    return 0
