"""`vlmops pull`: restore a registered version's dataset snapshot and merged model from the DVC remote."""

from __future__ import annotations

import argparse

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull",
        help="restore the dataset and model of models:/NAME@ALIAS from the DVC remote (hash-checked)",
        description="Needs only the config: tracking.uri finds the version, whose tags name the data and model "
        "by hash; versioning.remote_url, when set, replaces the remote the version recorded.",
    )
    p.add_argument("model", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    add_config_args(p)
    p.add_argument("--out", help="where to put NAME-vVERSION/ (default: <run.output_dir>/pulled)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.config import load_config
    from vlmops.redact import redact_uri
    from vlmops.registry.lineage import LINEAGE_FILE, pull_version

    pulled = pull_version(args.model, load_config(args.config, args.overrides), args.out)
    print(f"{args.model}: {pulled.name} version {pulled.version}, from {redact_uri(pulled.remote)}")
    print(f"  dataset   {pulled.dataset}  ({pulled.dataset_md5})")
    print(f"  model     {pulled.model}  ({pulled.model_md5})")
    print(f"  lineage   {pulled.folder / LINEAGE_FILE}")
    print(f"  (every file was hash-checked by DVC; `dvc status` in {pulled.folder} checks them again)")
    return 0
