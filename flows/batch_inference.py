"""The batch-inference flow: a model over a large set of image prompts, as a resumable, exactly-once job.

The same job as `vlmops batch-infer` (vlmops.infer.batch_job), with the same parameters:

    prefect deployment run 'batch-inference/on-demand' --param model=models:/vlmops-demo@champion \
        --param input=s3://bucket/prompts/ --param output=s3://bucket/answers/2026-12-01/

Where the shards run:
- `distributed=False` (default): the whole job in a child process group on the worker that runs the flow,
  a process per GPU there (`infer.workers`). The model never loads in the flow's process.
- `distributed=True`: the flow plans the job, then hands each shard to the Prefect task workers serving
  `answer_shard` (`python -m flows.batch_inference serve` on each GPU machine, with PREFECT_API_URL set to
  the server and the output on storage every machine reaches, e.g. S3). N workers share one job; each keeps
  its model loaded between shards. Prefect retries a failed shard; a done shard is never redone. While no shard is
  taken or finished for a minute, the flow run's log says how they stand and how to start a task worker
  (`_WaitingReport`); a shard whose task run is gone (deleted by a task worker) fails the run.

One run of a job at a time: the job's child (or, distributed, the flow run itself) holds the output while the job runs,
and a flow run of a job another run holds fails at once, naming that run (`vlmops.infer.job_lock`).

A progress artifact (shards done / shards) is updated as shards finish; at the end a markdown artifact
(`batch-inference-summary`) holds the summary `vlmops batch-infer` prints, a table artifact
(`batch-inference-samples`) the first results beside their questions, and the flow returns the summary as a dict.

When S3 or MLflow stays away (after the clients' own retries and, for a shard handed to a task worker, the task's), the
run fails naming the server and its URL (`ServiceUnavailable`), in the job's child too (read off its last lines). Once
it is back, the same job goes on in the same output: a new run with the same parameters or a retry of this one keeps
every shard whose part was written and answers only the rest. When the Prefect API is the one that went away, the advice
is the new run: this one's end could not be recorded, and Prefect refuses to retry a run it shows Running.

A flow run cancelled mid-job (the UI's Cancel, `prefect flow-run cancel ID`) is sent SIGTERM by its worker: the flow
stops the job's process group (the child and its per-GPU workers, whose GPU memory is free once they are gone), logs
how many shards are done and how to finish the job, and the run ends Cancelled. With `distributed=True` (and on any
stop or failure there) it cancels the shards' task runs not started yet, which the task workers then skip, and a shard
running on a task worker finishes its part. A retry of it, or a new run with the same parameters, keeps the parts
written and answers the rest.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId
from prefect.client.schemas.objects import State, TaskRun
from prefect.client.schemas.responses import SetStateStatus
from prefect.exceptions import TerminationSignal
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from prefect.states import Cancelled

# A worker loads this file by its path (prefect.yaml's entrypoint), not as `flows.batch_inference`, and nothing else
# here imports the package: its set-up (quiet defaults, VLMOPS_VERBOSE, no usage reports) runs with this import.
from flows import SETTINGS_ERROR, refuses_bad_settings
from tasks.gpu import gpu_slot
from tasks.infer import answer_shard
from tasks.report import publish_samples, publish_summary
from tasks.retry import names_unreachable_service, retry_this_flow_run
from vlmops.config import PipelineConfig, load_config
from vlmops.infer.batch_job import complete_job, prepare_job
from vlmops.infer.job_lock import refuse_if_running
from vlmops.infer.job_output import (
    MANIFEST_FILE,
    PART_PREFIX,
    pending_shards,
    read_manifest,
)
from vlmops.infer.job_plan import JobPlan
from vlmops.infer.job_status import (
    JobResult,
    ShardStats,
    StoppedJob,
    job_status,
    where_it_stopped,
)
from vlmops.infer.output import JOB_FILE, JobOutput, open_output
from vlmops.infer.parallel import run_job_in_child
from vlmops.infer.resolve import (
    catalog_resolver,
    config_for_model,
    model_source,
    pinned_model_ref,
    with_saved_settings,
)
from vlmops.infer.shards import Shard
from vlmops.infer.summary import sample_rows, stopped_rows, summary_rows
from vlmops.plural import counted, counted_of
from vlmops.redact import redact_log_handlers

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0
POLL_S = 1.0  # how often the flow reads its shards' task runs
# While shards wait and none is taken or finished for WAITING_REPORT_S, the flow run's log says where they stand, then
# again every WAITING_REPORT_EVERY_S while nothing changes: a job no task worker serves would otherwise sit in Running,
# silent.
WAITING_REPORT_S = 60.0
WAITING_REPORT_EVERY_S = 300.0
SERVE_COMMAND = "python -m flows.batch_inference serve"
READ_BATCH = 200  # task runs per API read (the server's default page)
# A stopped flow run cancels its queued shards' task runs within this, a call at a time, each given CANCEL_CALL_S: well
# under the 30 s a Prefect worker leaves a cancelled flow run's process before its SIGKILL.
CANCEL_SHARDS_S = 15.0
CANCEL_CALL_S = 5.0
SUMMARY_KEY = "batch-inference-summary"
SAMPLES_KEY = "batch-inference-samples"


def _to_finish_the_job() -> str:
    """What to run once the server that did not answer is back, or after a cancel, and what that keeps: the same
    parameters name the same job (its model, input and settings) in the same output, where a shard whose part is there
    is done (vlmops.infer.job_output)."""
    return (
        "run the flow again with the same parameters, or retry this flow run: "
        f"{retry_this_flow_run(__file__, 'batch_inference')}; the shards already written are kept and only the rest "
        "are answered"
    )


@flow(name="batch-inference")
@refuses_bad_settings
@names_unreachable_service(
    _to_finish_the_job,
    new_run="run the flow again with the same parameters: the shards already written are kept and only the rest are "
    "answered",
)
def batch_inference(
    model: str,
    input: str,
    output: str,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    distributed: bool = False,
) -> dict[str, Any]:
    """Answer every record of `input` with `model` into `output` (part-*.jsonl, rejects.jsonl, manifest.json)."""
    redact_log_handlers()
    logger = get_run_logger()
    config = config_for_model(load_config(config_path, overrides), model, overrides or [])
    # An alias (models:/NAME@champion) is looked up once, here: the child or the task workers get the version it names
    # now, so a promotion while the job starts or runs cannot mix two versions (or one's settings and another's
    # weights) in one job. The job records the alias as the model's URI and the version beside it.
    pinned = pinned_model_ref(model, config)
    named_as = model if pinned != model else None
    if named_as:
        logger.info("model %s is %s: the job loads that version in every process", model, pinned)
    # sync_compatible: called from sync code it returns the artifact's id, not a coroutine
    artifact = cast(UUID, create_progress_artifact(0.0, description=f"batch inference {model} -> {output}"))
    if distributed:
        # This flow run coordinates the job: it holds the job's output until the job ends (the task workers hold
        # nothing), and another run of the job is refused, naming this flow run.
        with ExitStack() as run:
            _source, plan, job_output, config = prepare_job(
                pinned, input, output, config, named_as, run=run, run_by=_this_flow_run()
            )
            manifest = read_manifest(plan, job_output)
            ran: list[ShardStats] = []
            if manifest is None:
                todo = pending_shards(plan, job_output)
                done_before = len(plan.shards) - len(todo)
                todo = todo[: config.infer.max_shards]  # a trial run's first shards (None: all)
                logger.info(
                    "job %s: %s to hand to the task workers (%d done before)",
                    plan.job_id,
                    counted(len(todo), "shard"),
                    done_before,
                )
                shards = {answer_shard.delay(pinned, job_output.uri, config, s.index).task_run_id: s for s in todo}
                try:
                    for state in _final_states(shards, plan.job_id):
                        ran.append(state.result())
                        update_progress_artifact(artifact, 100.0 * (done_before + len(ran)) / len(plan.shards))
                except BaseException as stop:
                    # A cancel, Ctrl-C, a failed shard: nothing waits for the other shards now.
                    _cancel_shards(stop, shards, job_output)
                    raise
            if manifest is None and pending_shards(plan, job_output):  # infer.max_shards left shards to do
                return _stopped(StoppedJob(job_status(job_output), ran), model, output)
            result = complete_job(plan, job_output, ran, config)
    else:
        # The job's child holds the output for its run; a run of the job going on already fails this flow run now,
        # before the model is fetched, with the child's message rather than in the child's last lines.
        job_output = open_output(output, config.storage)  # the model's saved settings set no storage.*
        refuse_if_running(job_output)
        # The child reads the config written out whole, where every key is set: the settings the model brings go in
        # here (the model is fetched here, not loaded; the child finds it in the cache).
        config = with_saved_settings(config, model_source(pinned, None, catalog_resolver(config)))
        parts_before = len(job_output.names(PART_PREFIX))
        started = time.monotonic()
        with gpu_slot():
            poll = _progress_poller(output, config, artifact)
            try:
                run_job_in_child(pinned, input, output, config, poll=poll, named_as=named_as)
            except (TerminationSignal, KeyboardInterrupt) as stop:  # the job's process group is stopped by now
                _log_stopped_job(stop, job_output)
                raise
        manifest_text = job_output.read_text(MANIFEST_FILE)
        if manifest_text is None and config.infer.max_shards is not None:
            return _stopped(StoppedJob(job_status(job_output), []), model, output)
        if manifest_text is None:
            raise RuntimeError(f"the batch inference job ended without writing {output}/{MANIFEST_FILE}")
        result = JobResult(job_output.uri, json.loads(manifest_text))
    update_progress_artifact(artifact, 100.0)
    summary = {"output": result.output, "job_id": result.manifest["job_id"], **result.metrics()}
    if not distributed:  # the child printed its speed; here: what it added and how long it took
        summary["shards_run"] = len(job_output.names(PART_PREFIX)) - parts_before
        summary["seconds"] = time.monotonic() - started
    summary["workers"] = sorted({s.worker for s in result.ran if s.worker})
    publish_summary(SUMMARY_KEY, _markdown(result, summary), f"batch inference {model} -> {output}")
    if result.results:
        publish_samples(SAMPLES_KEY, sample_rows(job_output), f"batch inference {model} -> {output}")
    logger.info(
        "job %s: %s, %d answered, %d rejected -> %s",
        summary["job_id"],
        counted(result.records, "record"),
        result.results,
        result.rejects,
        result.output,
    )
    return summary


def _this_flow_run() -> str:
    """This flow run, as another run of its job refused meanwhile names it."""
    from prefect.runtime import flow_run

    return f"flow run {flow_run.name} ({flow_run.id}) of batch-inference"


def _stopped(stopped: StoppedJob, model: str, output: str) -> dict[str, Any]:
    """A job `infer.max_shards` stopped: its summary artifact (where it stands, how to go on) and its status."""
    status = stopped.status
    title = f"batch inference job {status.plan.job_id}: stopped by infer.max_shards"
    publish_summary(SUMMARY_KEY, _table(title, stopped_rows(stopped)), f"batch inference {model} -> {output}")
    get_run_logger().info(
        "job %s: stopped by infer.max_shards, %s done -> %s",
        status.plan.job_id,
        counted_of(len(status.done), len(status.plan.shards), "shard"),
        status.output,
    )
    return {**status.as_dict(), "state": "stopped", "workers": sorted({s.worker for s in stopped.ran if s.worker})}


def _log_stopped_job(stop: BaseException, job_output: JobOutput) -> None:
    """The flow run's line when it is stopped mid-job: cancelled (the UI's Cancel, `prefect flow-run cancel`: the worker
    sends SIGTERM), its worker shut down, or Ctrl-C."""
    job, done = where_it_stopped(job_output)
    get_run_logger().warning(
        "%s stopped (%s), and its processes with it: %s; to finish it, %s", job, _why(stop), done, _to_finish_the_job()
    )


def _cancel_shards(stop: BaseException, shards: dict[UUID, Shard], job_output: JobOutput) -> None:
    """Stop handing out the shards of a distributed job whose flow run stops (nothing waits for them now), and say in the
    flow run's line where the job stands. A shard already running on a task worker is left to finish: Prefect has no way
    to stop a background task run, and its part is published whole, which the rerun keeps."""
    cancelled, running, failed = _cancel_not_started(shards, _why(stop))
    job, done = where_it_stopped(job_output)
    still = (
        f"still running on task workers: {counted(len(running), 'shard')} ({', '.join(sorted(running))}), each "
        "finishing its shard and writing its part whole, which the rerun keeps (Prefect cannot stop a running "
        "task run)"
        if running
        else "none still running"
    )
    left = (
        f"; the other shards' task runs could not be cancelled ({failed}): a task worker skips them once this flow run "
        "has ended"
        if failed
        else ""
    )
    get_run_logger().warning(
        "%s stopped (%s): %s; %s cancelled before a task worker started them; %s%s; to finish it, %s",
        job,
        _why(stop),
        done,
        counted(len(cancelled), "shard"),
        still,
        left,
        _to_finish_the_job(),
    )


def _cancel_not_started(shards: dict[UUID, Shard], why: str) -> tuple[list[str], list[str], str | None]:
    """Set each of the shards' task runs that has not started to Cancelled (`why`), which a task worker that gets it
    then skips (tasks.infer.answer_shard).

    Returns:
        The names of the shards cancelled, of those running (or that started or ended as they were cancelled), and why
        the rest could not be, if they could not. The calls get no retries and a deadline: a stop never waits on an API
        that is away (a task worker still skips a shard whose flow run has ended), and never raises over the stop.
    """
    cancelled: list[str] = []
    running: list[str] = []
    try:
        # A client of its own: the flow run's may be the one the stop interrupted mid-call.
        with (
            temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}),
            get_client(httpx_settings={"timeout": CANCEL_CALL_S}, sync_client=True) as client,
        ):
            deadline = time.monotonic() + CANCEL_SHARDS_S
            for run in _task_runs(client, list(shards)):
                if run.state is None or run.state.is_final():
                    continue
                if not run.state.is_running():  # Scheduled: still queued; Pending: handed out, not started
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"not all cancelled within {CANCEL_SHARDS_S:.0f} s")
                    if client.set_task_run_state(run.id, Cancelled(message=why)).status == SetStateStatus.ACCEPT:
                        cancelled.append(shards[run.id].name)
                        continue
                running.append(shards[run.id].name)
    except Exception as err:
        return cancelled, running, f"{type(err).__name__}: {err}"
    return cancelled, running, None


def _why(stop: BaseException) -> str:
    if isinstance(stop, KeyboardInterrupt):
        return "interrupted"
    if isinstance(stop, TerminationSignal):
        return "the flow run was cancelled or terminated"
    return f"the flow run failed: {stop}"


def _markdown(result: JobResult, summary: dict[str, Any]) -> str:
    """The flow run's summary artifact: the rows `vlmops batch-infer` prints, as a table."""
    rows = summary_rows(result)
    if not result.ran:  # the job ran in a child process: what this flow run added, from the flow's own count
        at = [label for label, _ in rows].index("output")
        rows.insert(at, ("this run", f"{counted(summary['shards_run'], 'shard')} in {summary['seconds']:.1f} s"))
    return _table(f"batch inference job {result.manifest['job_id']}", rows)


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    lines = [f"# {title}", "", "| | |", "| --- | --- |"]
    lines += [f"| {label} | {text.replace('|', '&#124;')} |" for label, text in rows]
    return "\n".join(lines) + "\n"


def _final_states(shards: dict[UUID, Shard], job_id: str) -> Iterator[State[ShardStats]]:
    """The final state of each shard's task run, as each one ends (read from the API, every POLL_S seconds); while
    nothing moves, the flow run's log says so now and then (`_WaitingReport`).

    Not `as_completed` + `future.result()`: that pairs the task worker's completion event with a read of the
    task run, and under load the server may not have recorded the run's state yet when the event arrives
    ("Task run ... has no state"), which failed a whole job whose shards were all fine. The API's record is
    the one truth here; a run without a state yet is simply not finished.

    Raises:
        RuntimeError: a shard's task run is gone from the API. Prefect's task worker deletes a task run whose parameters
            it cannot read (`tasks.scheduling.delete_failed_submissions`): nothing would ever answer that shard.
    """
    pending = set(shards)
    report = _WaitingReport(shards, job_id)
    with get_client(sync_client=True) as client:
        while pending:
            runs = {run.id: run for run in _task_runs(client, sorted(pending))}
            if gone := sorted(shards[i].name for i in pending - runs.keys()):
                raise RuntimeError(
                    f"the task run of shard {', '.join(gone)} is gone from the Prefect API, so no task "
                    "worker will answer it (a task worker deletes a task run whose parameters it cannot read: its log "
                    "says why, 'Failed to read parameters for task run ...')"
                )
            for run in runs.values():
                if run.state is not None and run.state.is_final():
                    pending.discard(run.id)
                    yield cast(State[ShardStats], run.state)
            if pending:
                report(client, [runs[i] for i in sorted(pending)])
                time.sleep(POLL_S)


class _WaitingReport:
    """The flow run's line while a distributed job does not move: after WAITING_REPORT_S with no shard taken or finished,
    then every WAITING_REPORT_EVERY_S, how many shards wait, which run and for how long, and how many task workers the
    API sees. A warning, with the command that starts a task worker, while shards wait and none runs.

    Prefect has no heartbeat for a background task run: one whose task worker died (SIGKILL, a lost machine) stays
    Running in the API for good, so the line names each running shard and for how long, for a person to judge."""

    def __init__(self, shards: dict[UUID, Shard], job_id: str) -> None:
        self.shards = shards
        self.job_id = job_id
        self.last_move = time.monotonic()
        self.next_line = self.last_move + WAITING_REPORT_S
        self.left: tuple[int, int] = (len(shards), len(shards))  # (not finished, not taken)

    def __call__(self, client: SyncPrefectClient, runs: list[TaskRun]) -> None:
        """`runs`: the shards' task runs not finished yet."""
        waiting = [run for run in runs if run.state is None or run.state.is_scheduled()]
        now = time.monotonic()
        if (len(runs), len(waiting)) != self.left:  # a shard was taken or finished
            self.left = (len(runs), len(waiting))
            self.last_move, self.next_line = now, now + WAITING_REPORT_S
            return
        if now < self.next_line:
            return
        self.next_line = now + WAITING_REPORT_EVERY_S
        taken = [run for run in runs if run.id not in {w.id for w in waiting}]
        quiet = f"no shard taken or finished for {_for_how_long(now - self.last_move)}"
        workers = _task_workers_seen(client)
        if waiting and not taken:
            get_run_logger().warning(
                "job %s: %s waiting, %s; %s. Start a task worker on each GPU machine, with PREFECT_API_URL set to this "
                "flow run's API (%s) and the same checkout as this flow (Prefect hands a task run only to a worker with the same answer_shard "
                "source): %s",
                self.job_id,
                counted(len(waiting), "shard"),
                quiet,
                workers,
                PREFECT_API_URL.value(),
                SERVE_COMMAND,
            )
            return
        get_run_logger().info(
            "job %s: %s waiting, %s on task workers (%s); %s; %s. A shard whose task worker died stays Running (Prefect "
            "has no heartbeat for task runs): if that is so, cancel this flow run and run it again (the parts written "
            "are kept)",
            self.job_id,
            counted(len(waiting), "shard"),
            counted(len(taken), "shard"),
            ", ".join(self._taken_for(run) for run in taken),
            quiet,
            workers,
        )

    def _taken_for(self, run: TaskRun) -> str:
        """The shard, what it does and since when: "00003 running for 2 h 5 min", or "00004 pending, not started, for
        40 s" (handed to a task worker that has not started it)."""
        name = self.shards[run.id].name
        state = run.state
        if state is None:
            return name
        since = run.start_time if state.is_running() and run.start_time else state.timestamp
        how = "running" if state.is_running() else f"{state.type.value.lower()}, not started,"
        return f"{name} {how} for {_for_how_long((datetime.now(UTC) - since).total_seconds())}"


def _task_workers_seen(client: SyncPrefectClient) -> str:
    """How many task workers serving `answer_shard` (this source of it) the API sees connected, in words. Only a view:
    an API that cannot say is said so, never a reason to stop waiting."""
    try:
        response = client.request(
            "POST",
            "/task_workers/filter",
            json={"task_worker_filter": {"task_keys": [answer_shard.task_key]}},
        )
        response.raise_for_status()
    except Exception as err:
        return f"the task workers connected could not be read ({type(err).__name__}: {err})"
    seen = len(response.json())
    return f"the Prefect API sees {counted(seen, 'task worker')} serving answer_shard"


def _for_how_long(seconds: float) -> str:
    """ "45 s", "12 min", "2 h 5 min"."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _task_runs(client: SyncPrefectClient, task_run_ids: list[UUID]) -> Iterator[TaskRun]:
    """The task runs of `task_run_ids`, read a page at a time."""
    for start in range(0, len(task_run_ids), READ_BATCH):
        yield from client.read_task_runs(
            task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=task_run_ids[start : start + READ_BATCH])),
            limit=READ_BATCH,
        )


def _progress_poller(output: str, config: PipelineConfig, artifact: UUID) -> Callable[[], None]:
    """A `poll` for the child job: every few seconds, parts published / shards -> the progress artifact."""
    job_output = None
    total = 0
    last = 0.0

    def poll() -> None:
        nonlocal last
        if time.monotonic() - last < PROGRESS_EVERY_S:
            return
        last = time.monotonic()
        # A view of the job, never a reason to stop it: a poll that raises stops the job's process group (and the
        # prompts in its engine's slots). An output that stays unreachable fails the job itself, the Prefect API the
        # flow's next call.
        try:
            update()
        except Exception as err:
            log.warning("batch inference: progress not updated (the job goes on): %s", err)

    def update() -> None:
        nonlocal job_output, total
        job_output = job_output or open_output(output, config.storage)
        if not total:
            saved = job_output.read_text(JOB_FILE)
            total = len(JobPlan.from_json(saved).shards) if saved else 0
        if total:
            done = len(job_output.names(PART_PREFIX))
            update_progress_artifact(artifact, 100.0 * done / total)

    return poll


def serve_shards() -> None:
    """A task worker for distributed jobs: answers `answer_shard` runs, one at a time (one model, one GPU)."""
    from prefect.task_worker import serve

    if SETTINGS_ERROR is not None:  # before any task run is taken: the flow runs would fail the same way
        sys.exit(f"error: {SETTINGS_ERROR}")
    # A deployment's flow run loads this file by its path, as the module `batch_inference` (prefect.yaml's entrypoint),
    # and each shard's task run carries that run's context, its flow pickled by reference to that module. Unless the
    # module can be imported here too, the worker cannot read a shard's parameters and deletes its task run ("No module
    # named 'batch_inference'"), and the flow run waits for it forever. Last on the path: it shadows nothing.
    sys.path.append(str(Path(__file__).resolve().parent))
    serve(answer_shard, limit=1)


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve_shards()
    else:
        sys.exit("usage: python -m flows.batch_inference serve   (a task worker for distributed batch inference)")
