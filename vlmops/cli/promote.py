"""`vlmops promote`: the promote flow (challenger vs champion on one evaluation set, the gate in the config)."""

from __future__ import annotations

import argparse

from vlmops.cli.args import add_config_args
from vlmops.plural import counted


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote",
        help="compare the challenger with the champion and move `champion` if the gate passes",
        description="The gate is registry.promotion in the config (metric, min_margin, eval_file).",
    )
    add_config_args(p)
    p.add_argument(
        "--challenger",
        help="the version to promote: a number or models:/NAME/VERSION (default: models:/NAME@<registry.alias>)",
    )
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    # Like `vlmops run`, the launcher of a flow: Prefect's ephemeral API unless PREFECT_API_URL names a server.
    from flows.promote import promote_from_cli

    result = promote_from_cli(args.config, args.overrides, args.challenger)
    if result["decision"] == "unchanged":
        print(f"{result['model_name']} version {result['champion']} is the champion already: nothing to do")
        return 0
    print(f"promotion of {result['name']} version {result['challenger']}: {result['decision']}")
    print(f"  {result['reason']}")
    print(f"  evaluation set    {result['eval_file']} ({counted(result['total'], 'record')})")
    print(f"  MLflow run        {result['mlflow_run_id']}")
    print(f"  predictions       {result['work_dir']}")
    return 0
