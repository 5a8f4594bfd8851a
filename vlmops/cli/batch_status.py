"""`vlmops batch-status OUT`: where a batch inference job stands, read from its output folder or prefix alone."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vlmops.cli.args import add_config_args
from vlmops.errors import UserInputError
from vlmops.plural import counted, counted_of

if TYPE_CHECKING:
    from vlmops.infer.job_status import JobStatus

SHOWN_PENDING = 8


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch-status",
        help="where a batch inference job stands: shards done and to do, records and rejects so far",
        description="Reads the job's output (a folder or an s3:// prefix) alone: no model, no input, no GPU. "
        "Run it from another terminal or machine while the job runs, or after it stopped: it says which, and which "
        "process runs it.",
    )
    p.add_argument("output", help="the job's --output: a folder or an s3:// prefix")
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    add_config_args(p, default=None)  # storage.* for an s3:// output
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from vlmops.config import load_config
    from vlmops.infer.job_status import job_status
    from vlmops.infer.output import open_output
    from vlmops.infer.summary import reason_rows, score_text, token_choice

    config = load_config(args.config, args.overrides)
    if not args.output.startswith("s3://") and not Path(args.output).expanduser().is_dir():
        raise UserInputError(f"{args.output}: no such folder; give the --output of a `vlmops batch-infer` command")
    status = job_status(open_output(args.output, config.storage), who_runs=True)
    if args.json:
        print(json.dumps(status.as_dict(), indent=2))
        return 0
    plan, done, pending = status.plan, status.done, status.pending
    shards = len(plan.shards)
    share = f"{100 * len(done) / shards:.0f}%" if shards else "no records"
    progress = f"{counted_of(len(done), shards, 'shard')} done ({share})"
    if status.manifest:
        state = f"finished at {status.manifest.get('finished_at', '?')}"
    elif status.state == "stopped":
        state = f"{progress}; stopped: the same command resumes it"
    elif status.state == "running":
        holder = status.run.holder if status.run is not None else None
        by = f": pid {holder.pid} on {holder.host}, since {holder.started_at}" if holder else ""
        state = f"{progress}; running{by}"
    else:
        state = f"{progress}; running, or stopped: the same command resumes it"
    print(f"batch inference job {plan.job_id}: {state}")
    if status.state == "running" and status.run is not None and status.run.holder is not None:
        print(f"  run by            {status.run.holder.command}")
    print(f"  model             {plan.model.uri} ({plan.model.content_hash[:19]})")
    print(f"  input             {plan.input} ({counted(len(plan.files), 'file')}, {counted(plan.records, 'record')})")
    if plan.retry_of:
        print(f"  retry of          the records {plan.retry_of} rejected")
    print(f"  answers           {token_choice(plan.settings)}, max_new_tokens {plan.settings.get('max_new_tokens')}")
    print(
        f"  done              {counted(len(done), 'shard')}: {counted(status.records_done, 'record')}, "
        f"{status.records_done - status.rejects} answered, {status.rejects} rejected"
    )
    for label, text in reason_rows(status.rejects_by_reason):
        print(f"  {label:<17} {text}")
    if status.manifest and (score := status.manifest.get("score")):
        print(f"  exact match       {score_text(score)}")
    if pending:
        names = ", ".join(s.name for s in pending[:SHOWN_PENDING]) + (", ..." if len(pending) > SHOWN_PENDING else "")
        records = counted(sum(s.count for s in pending), "record")
        print(f"  to do             {counted(len(pending), 'shard')}: {records} ({names})")
        print(f"  pace              {_pace(status)}")
    print(f"  output            {status.output}")
    return 0


def _pace(status: JobStatus) -> str:
    """The recent pace, how long ago the last part was written and the time to go at that pace."""
    last = status.last_part_at
    if last is None:
        return "no part written yet"
    ago = f"the last part written {_duration(max(0.0, time.time() - last))} ago"
    rate, eta = status.records_per_s, status.eta_s
    if rate is None or eta is None:
        return ago
    pace = f"{rate:,.1f}" if rate >= 1 else f"{rate:.2g}"
    parts = counted(status.pace_parts, "part")
    return f"{pace} records/s over the last {parts}, {ago}; ~{_duration(eta)} to go at that pace"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
