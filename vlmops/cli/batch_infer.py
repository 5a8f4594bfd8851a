"""`vlmops batch-infer`: a batch inference job (streamed, sharded, resumable, exactly once); prints a summary."""

from __future__ import annotations

import argparse
import sys

from vlmops.cli.args import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch-infer",
        help="answer every record of jsonl/json files (or an s3:// prefix) with a model into part files",
        description="Rerun the same command to finish an interrupted job; a finished job is not redone. "
        "--set infer.max_shards=1 is a trial run: the first shard only, then the same command without it goes on.",
    )
    p.add_argument(
        "--model",
        "-m",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, run or checkpoint folder, catalog name",
    )
    p.add_argument(
        "--model-named-as",
        metavar="models:/NAME@ALIAS",
        help="record the job's model as this alias, --model being the version it was resolved to (models:/NAME/N); "
        "the batch-inference flow passes it, so that every process of the job loads one version",
    )
    p.add_argument(
        "--input", "-i", required=True, help="a .jsonl/.json file, a folder or glob of them, or an s3:// prefix"
    )
    p.add_argument(
        "--output", "-o", required=True, help="a folder or an s3:// prefix (part-*.jsonl, rejects.jsonl, manifest.json)"
    )
    add_config_args(p, default=None)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.config import load_config
    from vlmops.infer.batch_job import run_batch_job
    from vlmops.infer.job_status import StoppedJob
    from vlmops.infer.resolve import config_for_model
    from vlmops.infer.summary import stopped_rows, summary_rows
    from vlmops.outages import ServiceUnavailable, rerun_advice, unreachable_service

    config = config_for_model(load_config(args.config, args.overrides), args.model, args.overrides)
    where = f"(vlmops batch-status {args.output} says where it stands)"
    try:
        result = run_batch_job(args.model, args.input, args.output, config, named_as=args.model_named_as)
    except KeyboardInterrupt:
        # Each part is published whole or not at all, so a rerun goes on from the shards without one. Run by a flow,
        # the flow says how to go on: this command line names a temporary config.
        again = rerun_advice(f"run the same command again to answer the rest {where}")
        print("interrupted: the parts written so far are kept" + (f"; {again}" if again else ""), file=sys.stderr)
        return 130
    except Exception as err:
        outage = unreachable_service(err)  # in this process, or in a worker's (read off its last lines)
        if outage is None:
            raise
        again = rerun_advice(
            f"run the same command again to answer the rest: the parts written so far are kept {where}"
        )
        raise ServiceUnavailable(outage, again) from err
    if isinstance(result, StoppedJob):
        job_id = result.status.plan.job_id
        state = f"stopped after infer.max_shards={config.infer.max_shards}"
        rows = stopped_rows(result)
    else:
        job_id = result.manifest["job_id"]
        state = "done"
        if result.finished_before:
            state = "finished before, nothing to do"
        elif not result.ran:  # a run stopped between its last shard and its manifest
            state = "done (every shard was answered before: gathered them and wrote the manifest)"
        if not result.ran and not result.records:
            state = "the input holds no records"
        rows = summary_rows(result)
    print(f"batch inference job {job_id}: {state}")
    for label, text in rows:
        print(f"  {label:<17} {text}")
    return 0
