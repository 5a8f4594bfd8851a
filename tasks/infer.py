"""Batch inference tasks: the eval split's predictions (a job in a child process group), and one shard of a job."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.context import TaskRunContext
from prefect.states import Cancelled

from tasks.caching import within_flow_run
from tasks.gpu import gpu_slot
from tasks.retry import another_try_could_pass, retry_delays
from vlmops.config import PipelineConfig
from vlmops.infer.batch_job import JOB_DIR_SUFFIX, BatchResult, run_job_shard, strict_copy
from vlmops.infer.job_output import MANIFEST_FILE, write_eval_predictions
from vlmops.infer.job_status import ShardStats
from vlmops.infer.output import open_output
from vlmops.infer.parallel import run_job_in_child
from vlmops.tracking import Tracker


@task(
    name="batch_infer",
    cache_policy=within_flow_run(["model_path", "dataset_file"], datasets=["dataset_file"]),
    persist_result=True,
)
def batch_infer_task(model_path: str, dataset_file: str, out_file: str, config: PipelineConfig) -> BatchResult:
    """Answer every record of `dataset_file` (the job in `out_file`.job, removed when done), then write `out_file`.

    The model loads in a child process (and its per-GPU workers), so this worker frees the GPU after the step. A retry
    of the flow run (in the same run folder) takes a finished step's result, and a step it stopped goes on from the
    shards its job finished: the same job in the same folder (another model or settings would be refused there).
    """
    started = time.perf_counter()
    job_dir = f"{out_file}{JOB_DIR_SUFFIX}"
    with gpu_slot():
        run_job_in_child(model_path, dataset_file, job_dir, strict_copy(config))
    seconds = time.perf_counter() - started
    output = open_output(job_dir)
    count = write_eval_predictions(output, Path(out_file))
    tokens = int(json.loads(output.read_text(MANIFEST_FILE) or "{}")["generated_tokens"])
    # The job folder lets a crashed step resume; once its answers are in `out_file` it is only a second copy
    # (and the evaluation folder keeps the one layout `vlmops eval` writes).
    shutil.rmtree(job_dir)
    return BatchResult(Path(out_file), count, seconds, tokens, tokens / seconds if seconds else 0.0)


def log_batch(tracker: Tracker, run_id: str, label: str, result: BatchResult, cached: bool) -> None:
    tracker.log_metrics(
        run_id,
        {
            f"{label}.seconds": result.seconds,
            f"{label}.tokens_per_s": result.tokens_per_s,
            f"{label}.records": result.count,
        },
    )
    tracker.set_tags(run_id, {f"{label}.cached": cached})
    tracker.log_artifact(run_id, result.path, "predictions")


@task(
    name="answer_shard",
    retries=2,
    retry_delay_seconds=retry_delays(10, 10),
    retry_condition_fn=another_try_could_pass,
    cache_policy=NO_CACHE,
)
def answer_shard(model: str, output: str, config: PipelineConfig, shard: int) -> ShardStats | State[Any]:
    """Answer one shard of a planned job; a task worker keeps its model loaded between shards.

    Retrying is safe: a shard's part is published whole or not at all, and a done shard is not redone. A failure of
    the input's own (a reject under `on_error: fail`) is not retried: it would answer the shard up to it again.
    A shard whose flow run stopped is not answered: the run ends Cancelled (see `_stopped_by_its_flow_run`).
    """
    if why := _stopped_by_its_flow_run():
        get_run_logger().warning("shard %05d of %s not answered: %s", shard, output, why)
        return Cancelled(message=f"not answered: {why}")
    return run_job_shard(model, output, config, shard)


def _stopped_by_its_flow_run() -> str | None:
    """Why this shard's task run must not run, if it must not: the flow run that handed it out cancelled it, or that
    flow run is no longer running (nothing waits for the shard; it was SIGKILLed, say, before it could cancel it).

    Prefect's task worker does not look: it runs a background task run it was handed even when the run is Cancelled by
    then (the server queues the run when it is scheduled and never takes it back; task states are recorded from the
    worker's events, so the server's rule against running a stopped flow's tasks never sees them).
    """
    context = TaskRunContext.get()
    if context is None:  # called as a plain function (`answer_shard.fn`): no run to look up
        return None
    task_run = context.task_run
    with get_client(sync_client=True) as client:
        if cancelled := [s for s in client.read_task_run_states(task_run.id) if s.is_cancelled()]:
            return f"its task run was cancelled ({cancelled[0].message or 'no reason given'})"
        if task_run.flow_run_id is not None:
            state = client.read_flow_run(task_run.flow_run_id).state
            if state is None or not state.is_running():
                return f"its flow run is {state.name if state else 'gone'}"
    return None
