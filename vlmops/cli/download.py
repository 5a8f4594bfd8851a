"""`vlmops download [NAME] [--refresh]`: fetch (and convert) the configured base model, or a catalog model."""

from __future__ import annotations

import argparse

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="download (and convert) the configured base model, or a catalog model")
    p.add_argument(
        "name",
        nargs="?",
        help="a catalog model (`vlmops models`) to fetch into the config's model.cache_dir, from the catalog's "
        "source unless --set model.source=... says otherwise (default: the config's model section)",
    )
    p.add_argument("--refresh", action="store_true", help="download again and re-hash every file, whatever is cached")
    add_config_args(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.config import load_config
    from vlmops.models.catalog import catalog_model_config
    from vlmops.models.download import download_model

    config = load_config(args.config, args.overrides)
    model_cfg = catalog_model_config(config, args.name, args.overrides) if args.name else config.model
    snapshot = download_model(model_cfg, config.storage, config.run.output_dir, refresh=args.refresh)
    print(
        f"model {model_cfg.name}: {snapshot.source} {snapshot.id}"
        + (f"@{snapshot.revision}" if snapshot.revision else "")
    )
    if snapshot.converted:
        print(f"  release layout:  {snapshot.original_path}")
        print(f"  converted:       {snapshot.path}")
    else:
        print(f"  checkpoint:      {snapshot.path}")
    print(f"  manifest:        {snapshot.manifest_path} (sha256 {snapshot.digest[:16]}...)")
    return 0
