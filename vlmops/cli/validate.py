"""`vlmops validate [PATH ...]`: check dataset files (or the configured dataset) and print the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmops.cli.args import add_config_args
from vlmops.plural import counted

DEFAULT_CONFIG = "pipeline.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check dataset files (or the configured dataset) and print the report",
        description="Check every record of the given .json/.jsonl files or folders (or s3:// objects and prefixes), "
        "as one set: counts, token lengths (image tokens included, with the configured model's tokenizer), and every "
        "problem with its file, line, field and reason. Without PATH: the configured data.train / data.eval, frozen into a "
        "dataset snapshot as training would. Rejected records go to the rejects file (data.rejects_file).",
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="dataset files (.json, .jsonl) or folders of them; s3://bucket/key objects or s3://bucket/prefix prefixes",
    )
    add_config_args(p, default=None, default_text=f"./{DEFAULT_CONFIG} where there is one, else built-in defaults")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.config import load_config
    from vlmops.data.prepare import DATASETS_DIR, prepare_from_config
    from vlmops.data.problems import DatasetError
    from vlmops.data.validation import rejects_path, validate_files
    from vlmops.models.download import download_model
    from vlmops.models.loading import load_processor

    # Without --config: ./pipeline.yaml when there is one (as the other commands), else the built-in defaults.
    config_file = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    config = load_config(config_file, args.overrides)
    snapshot = download_model(config.model, config.storage, Path(config.run.output_dir))
    processor = load_processor(snapshot.path)
    try:
        if not args.paths:
            prepared = prepare_from_config(config, processor)
            print(prepared.report.summary())
            print(f"snapshot: {prepared.path}")
            print(f"report:   {prepared.path / 'report.json'}")
            return 0
        data = config.data
        report = validate_files(
            args.paths,
            data,
            processor.tokenizer,
            int(processor.num_image_tokens),
            rejects_path(data, Path(config.run.output_dir) / DATASETS_DIR),
            system_prompt=config.model.system_prompt,
            storage=config.storage,
        )
    except DatasetError as err:
        if err.report is not None:  # the counts so far, then the error with every problem
            print(err.report.summary(), file=sys.stderr)
        raise
    print(report.summary())
    print(f"rejects:  {report.rejects_file} ({counted(report.rejected_count, 'record')})")
    return 0
