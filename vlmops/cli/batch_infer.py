"""`vlmops batch-infer`: a batch inference job (streamed, sharded, resumable, exactly once); prints a summary."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING

from vlmops.cli.args import add_config_args

if TYPE_CHECKING:
    from vlmops.config import StorageConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch-infer",
        help="answer every record of jsonl/json files (or an s3:// prefix) with a model into part files",
        description="Rerun the same command to finish an interrupted job; a finished job is not redone. Ctrl-C, "
        "SIGTERM and a closed terminal (SIGHUP) stop it in order, saying how far it got (exit 130, 143, 129). "
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
    from vlmops.stopping import stop_signals_raised

    with stop_signals_raised():  # SIGTERM (`timeout`, systemd, Kubernetes, Slurm, `kill`) stops the job as Ctrl-C does
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from vlmops.config import load_config
    from vlmops.infer.batch_job import run_batch_job
    from vlmops.infer.job_status import StoppedJob
    from vlmops.infer.resolve import config_for_model
    from vlmops.infer.summary import stopped_rows, summary_rows
    from vlmops.outages import ServiceUnavailable, rerun_advice, unreachable_service
    from vlmops.stopping import StopSignal, exit_now, exit_status

    config = config_for_model(load_config(args.config, args.overrides), args.model, args.overrides)
    where = f"(vlmops batch-status {args.output} says where it stands)"
    try:
        result = run_batch_job(args.model, args.input, args.output, config, named_as=args.model_named_as)
    except (KeyboardInterrupt, StopSignal) as stop:
        # The job's processes are stopped and the part being written removed by now (the exception went through
        # them). Each part is published whole or not at all, so the same command goes on from the shards without one.
        said = _stopped(args, config.storage, stop)
        if said:
            print(said, file=sys.stderr)
        exit_now(exit_status(stop))
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


def _stopped(args: argparse.Namespace, storage: StorageConfig, stop: BaseException) -> str | None:
    """What a job stopped by Ctrl-C or a signal says: which job, how far it got, and the command that finishes it.
    Nothing when a flow runs it: the flow's line says all that, with what to run (this command line names a temporary
    config)."""
    from vlmops.infer.job_status import where_it_stopped
    from vlmops.infer.output import open_output
    from vlmops.outages import rerun_advice
    from vlmops.stopping import stop_reason

    again = rerun_advice(
        f"to answer the rest, run the same command again (vlmops batch-status {args.output} says where it stands):\n"
        f"  {same_command(args)}"
    )
    if again is None:
        return None
    job, done = where_it_stopped(open_output(args.output, storage))
    return f"{job} stopped ({stop_reason(stop)}): {done}, kept; {again}"


def same_command(args: argparse.Namespace) -> str:
    """This `vlmops batch-infer` command, to run again from the same folder (spelled from its arguments: run as
    `python -m vlmops.cli`, its own command line names no `vlmops`)."""
    words = ["vlmops", "batch-infer", "--model", args.model]
    if args.model_named_as:
        words += ["--model-named-as", args.model_named_as]
    words += ["--input", args.input, "--output", args.output]
    if args.config:
        words += ["--config", args.config]
    for override in args.overrides:
        words += ["--set", override]
    return shlex.join(words)
