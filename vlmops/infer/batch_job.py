"""Run a batch inference job end to end: the one code path behind `vlmops batch-infer`, the `batch-inference`
flow and the retrain flow's eval predictions.

Resolve the model (and hash it), plan the job from the inputs, pick it up in the output, answer the shards
not done yet (here, or in a process per GPU), write the manifest, and optionally log it all to MLflow.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from vlmops.config import PipelineConfig
from vlmops.errors import RunFailed
from vlmops.infer.engine import make_engine
from vlmops.infer.job import ShardRunner
from vlmops.infer.job_lock import hold_job_run, refuse_if_running
from vlmops.infer.job_output import (
    finalize,
    open_job,
    pending_shards,
    read_manifest,
    saved_job,
    write_eval_predictions,
)
from vlmops.infer.job_plan import JobPlan, ModelInfo
from vlmops.infer.job_status import (
    JobResult,
    ShardStats,
    StoppedJob,
    job_status,
)
from vlmops.infer.output import JOB_FILE, JobOutput, open_output
from vlmops.infer.planning import (
    PromptCounter,
    counts_prompts,
    folder_hash,
    hash_cache_dir,
    plan_job,
    resolve_job_model,
)
from vlmops.infer.resolve import ModelSource, with_saved_settings
from vlmops.infer.shards import Shard
from vlmops.infer.summary import sample_rows
from vlmops.models.compile_cache import SharedCompileCache
from vlmops.models.loading import LoadedModel
from vlmops.plural import counted, counted_of
from vlmops.scratch import held_folder

if TYPE_CHECKING:
    from vlmops.tracking import Tracker

log = logging.getLogger(__name__)

OnShard = Callable[[ShardStats, int, int], None]
"""Called after each shard with its stats, the number of shards done and the job's shard count."""


def run_batch_job(
    model_ref: str,
    input_spec: str,
    output_uri: str,
    config: PipelineConfig,
    *,
    progress: bool = True,
    on_shard: OnShard | None = None,
    named_as: str | None = None,
) -> JobResult | StoppedJob:
    """Answer every record of `input_spec` with `model_ref` into `output_uri`, doing only what is not done.
    `named_as`: the alias a pinned `model_ref` was resolved from, as the job records its model (`prepare_job`).

    With `infer.workers` above 1 the shards go to a process per GPU; else the model loads here. With
    `infer.max_shards`, at most that many shards are answered: where shards remain, the job stops without its
    manifest (a `StoppedJob`) and the same command without the setting goes on from there.

    This process holds the job's output for the run (`vlmops.infer.job_lock`): another run of the job is refused.

    Raises:
        JobRunningError: another run of the job is going on.
        JobMismatchError: the output holds another job.
        RecordRejectedError: `infer.on_error: fail` and a record cannot be answered.
        RunFailed: a worker process failed.
    """
    started = time.perf_counter()
    with ExitStack() as run:
        source, plan, output, config = prepare_job(model_ref, input_spec, output_uri, config, named_as, run=run)
        try:
            return _run_job(source, plan, output, config, started, progress, on_shard)
        finally:
            output.close()  # its scratch folder (S3): now, not at an exit that a stopped command skips (exit_now)


def _run_job(
    source: ModelSource,
    plan: JobPlan,
    output: JobOutput,
    config: PipelineConfig,
    started: float,
    progress: bool,
    on_shard: OnShard | None,
) -> JobResult | StoppedJob:
    """`run_batch_job` once the job is open in its output."""
    from vlmops.infer.parallel import default_workers, run_on_workers

    manifest = read_manifest(plan, output)
    if manifest is not None:
        log.info("job %s in %s is finished already: nothing to do", plan.job_id, output.uri)
        return _tracked(JobResult(output.uri, manifest, finished_before=True), plan, config, again=True)
    pending = pending_shards(plan, output)
    todo = pending[: config.infer.max_shards]  # a trial run's first shards (None: all)
    workers = min(config.infer.workers or default_workers(), max(len(todo), 1))
    startup: float | None = None  # with workers, each loads its own copy: their logs say how long it took
    if workers > 1:
        with _Progress(plan, todo, progress, on_shard) as bar:
            run_on_workers(source, output.uri, config, todo, workers, bar.records, bar.shard_done)
        ran = bar.ran
    else:
        ran = []
        if todo:  # else all done but the manifest: no model needed
            runner = load_runner(source, config, plan.longest_prompt, records=sum(s.count for s in todo))
            startup = time.perf_counter() - started
            log.info(
                "job %s: started in %.1f s (model resolved, hashed and loaded; engine built)", plan.job_id, startup
            )
            ran = answer_shards(runner, plan, todo, output, progress, on_shard)
    if len(todo) < len(pending):
        log.info(
            "job %s: stopped at infer.max_shards=%d with %s to go: run the same command without it to go on",
            plan.job_id,
            config.infer.max_shards,
            counted(len(pending) - len(todo), "shard"),
        )
        return StoppedJob(job_status(output), ran, startup)
    return complete_job(plan, output, ran, config, startup)


def prepare_job(
    model_ref: str,
    input_spec: str,
    output_uri: str,
    config: PipelineConfig,
    named_as: str | None = None,
    *,
    run: ExitStack | None = None,
    run_by: str | None = None,
) -> tuple[ModelSource, JobPlan, JobOutput, PipelineConfig]:
    """Resolve and hash the model, plan the job from the inputs, and start it in the output (or pick it up); return
    them with the job's config: `config` with the generation settings the model brings where it sets none
    (`with_saved_settings`), which the shards must be answered with.

    The model is resolved once, here (a registry alias to the version it names now: the plan records both, and
    `plan.model.pinned` loads that version again), downloaded if it has to be, never loaded (its processor is, to
    count the prompts' tokens: the fast engine's slots are sized with them, and a set `infer.max_context` that holds
    none of them is refused here, before the weights load). `named_as`: the alias a caller resolved `model_ref` from
    (`pinned_model_ref`), recorded as the job's model URI.

    `run`: the run this is for, which holds the job's output from just before the job is opened in it until `run`
    exits (`hold_job_run`; `run_by` names the run to another run refused meanwhile, default this process's command
    line). A run of the job going on already is refused first, before anything slow. Without `run` nothing is held.

    Raises:
        JobRunningError: with `run`, another run of the job is going on.
        UserInputError: `infer.max_context` holds none of the job's prompts beside `infer.max_new_tokens`.
        JobMismatchError: the output holds another job.
    """
    output = open_output(output_uri, config.storage)  # the model's saved settings set no storage.*
    try:
        if run is not None:
            refuse_if_running(output)
        source, info = resolve_job_model(model_ref, config, named_as)
        config = with_saved_settings(config, source)
        measure = None
        if counts_prompts(config):
            from vlmops.models.loading import load_processor

            processor = load_processor(source.checkpoint)
            measure = PromptCounter(processor.tokenizer, int(processor.num_image_tokens), config)
        planned = plan_job(info, input_spec, config, output.uri, measure)
        if run is not None:
            # Held before the job's files are written (the first run to hold it opens the job), after the checks that
            # refuse another job: a run refused leaves the output as it was, its run lock too.
            saved_job(planned, output)
            run.enter_context(hold_job_run(output, run_by))
        plan = open_job(planned, output)
    except BaseException:
        output.close()
        raise
    if measure is not None:
        infer = config.infer
        if infer.max_context is None:
            advice = plan.slot_advice(infer.max_new_tokens)
        else:
            advice = plan.context_advice(infer.max_context, infer.max_new_tokens)
        if advice:
            log.warning("%s", advice)
    return source, plan, output, config


def complete_job(
    plan: JobPlan, output: JobOutput, ran: list[ShardStats], config: PipelineConfig, startup_s: float | None = None
) -> JobResult:
    """Check and gather every shard, write the manifest, and log the job to MLflow with `infer.track`."""
    return _tracked(JobResult(output.uri, finalize(plan, output), ran, startup_s=startup_s), plan, config)


def answer_shards(
    runner: ShardRunner,
    plan: JobPlan,
    todo: list[Shard],
    output: JobOutput,
    progress: bool = True,
    on_shard: OnShard | None = None,
) -> list[ShardStats]:
    """Answer `todo` in this process, as one stream through the engine (each shard published when it completes)."""
    with _Progress(plan, todo, progress, on_shard) as bar:
        for stats in runner.run_many(plan, todo, output, bar.records):
            bar.shard_done(stats)
    return bar.ran


class _Progress:
    """A records bar (records/s, ETA) over the shards to do, and the per-shard callback."""

    def __init__(self, plan: JobPlan, todo: list[Shard], enabled: bool, on_shard: OnShard | None):
        self.done_before = len(plan.shards) - len(todo)
        self.total_shards = len(plan.shards)
        self.on_shard = on_shard
        self.ran: list[ShardStats] = []
        if self.done_before:
            log.info(
                "job %s: %s done before, %d to go",
                plan.job_id,
                counted_of(self.done_before, len(plan.shards), "shard"),
                len(todo),
            )
        total = sum(s.count for s in todo)
        self.bar = tqdm(total=total, desc=f"job {plan.job_id}", unit="rec", disable=not enabled, dynamic_ncols=True)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def records(self, count: int) -> None:
        self.bar.update(count)

    def shard_done(self, stats: ShardStats) -> None:
        self.ran.append(stats)
        if self.on_shard:
            self.on_shard(stats, self.done_before + len(self.ran), self.total_shards)


@dataclass
class BatchResult:
    """A predictions file for the evaluate step (index, source, reference, prediction), and how fast it came."""

    path: Path
    count: int
    seconds: float
    generated_tokens: int
    tokens_per_s: float

    def outputs(self) -> list[Path]:
        """The predictions file."""
        return [self.path]


def predict_eval_file(loaded: LoadedModel, eval_file: Path, out_file: Path, config: PipelineConfig) -> BatchResult:
    """A job over one eval split with a model loaded already (`vlmops eval`), then the file evaluate reads.

    The job runs in a scratch folder beside `out_file` (`scratch.held_folder`), removed afterwards: the caller may
    switch an adapter on or off between calls, which the job's model hash (of the checkpoint folder) does not see, so
    there is nothing safe to resume. Every record must be answerable (`infer.on_error: fail`): a score over fewer
    records would be another score.
    """
    config = strict_copy(config)
    info = ModelInfo(str(loaded.path), None, f"sha256:{folder_hash(loaded.path, hash_cache_dir(config))}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # Held while the job runs: the next one beside `out_file` removes what a job killed outright (SIGKILL, the OOM
    # killer) left there, the eval split's answers, never a live job's.
    with held_folder(f".{out_file.name}.", out_file.parent) as tmp:
        output = open_output(str(tmp))
        measure = PromptCounter(loaded.tokenizer, loaded.num_image_tokens, config) if counts_prompts(config) else None
        plan = open_job(plan_job(info, str(eval_file), config, measure=measure), output)
        runner = ShardRunner(loaded, make_engine(loaded, config.infer, plan.longest_prompt, plan.records), config)
        ran = answer_shards(runner, plan, plan.shards, output)
        manifest = finalize(plan, output)
        count = write_eval_predictions(output, out_file)
    seconds = sum(s.seconds for s in ran)
    tokens = int(manifest["generated_tokens"])
    return BatchResult(out_file, count, seconds, tokens, tokens / seconds if seconds else 0.0)


JOB_DIR_SUFFIX = ".job"


def strict_copy(config: PipelineConfig) -> PipelineConfig:
    """`config` with `infer.on_error: fail`, no `infer.max_shards` and no `infer.retry_rejects` (evaluation scores
    every record or none)."""
    strict = {"on_error": "fail", "max_shards": None, "retry_rejects": None}
    return config.model_copy(update={"infer": config.infer.model_copy(update=strict)})


def load_runner(
    source: ModelSource,
    config: PipelineConfig,
    longest_prompt: int | None = None,
    worker: str = "",
    publish_compiles: bool = True,
    records: int | None = None,
) -> ShardRunner:
    """Load the model once and wrap it with the engine `infer.engine` picks for `records` to answer (`make_engine`),
    its slots sized to the job's longest prompt (`JobPlan.longest_prompt`, `slot_context`); `publish_compiles=False`
    loads `model.shared_compile_cache` but leaves writing it to another worker of this machine."""
    from vlmops.models.loading import load_model

    started = time.perf_counter()
    loaded = load_model(
        source.checkpoint,
        dtype=config.model.dtype,
        attn=config.model.attn,
        adapter=source.adapter,
        allow_pickle=config.model.allow_pickle,
        compile_cache=config.model.compile_cache,
    )
    loaded_at = time.perf_counter()
    share = None
    if config.model.shared_compile_cache:
        share = SharedCompileCache(
            config.model.shared_compile_cache, config.storage, loaded.device, publish=publish_compiles
        )
        share.fetch()  # before anything compiles: the engine's first shard
    engine = make_engine(loaded, config.infer, longest_prompt, records)
    log.info(
        "%s: model loaded in %.1f s, %s built in %.1f s",
        source.checkpoint.name,
        loaded_at - started,
        type(engine).__name__,
        time.perf_counter() - loaded_at,
    )
    return ShardRunner(loaded, engine, config, worker, share)


_WORKER_RUNNER: dict[tuple[str, str, int | None, int], tuple[ShardRunner, str]] = {}
_WORKER_LOCK = threading.Lock()


def _worker_runner(
    model_ref: str, config_json: str, longest_prompt: int | None, records: int
) -> tuple[ShardRunner, str]:
    """A task worker's runner for this job's model and settings, and the model's content hash: kept between shards;
    the last job's runner (its model and its engine's cache, most of the GPU) is released before another is loaded,
    because the two would not fit side by side (the engine sizes its cache to what the card has free). `records`: the
    job's, which picks the engine (`make_engine`): a worker does not know its share in advance."""
    key = (model_ref, config_json, longest_prompt, records)
    with _WORKER_LOCK:
        if key not in _WORKER_RUNNER:
            _WORKER_RUNNER.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            config = PipelineConfig.model_validate_json(config_json)
            source, info = resolve_job_model(model_ref, config)
            runner = load_runner(
                source, config, longest_prompt, f"{os.uname().nodename}:{os.getpid()}", records=records
            )
            _WORKER_RUNNER[key] = (runner, info.content_hash)
        return _WORKER_RUNNER[key]


def run_job_shard(model_ref: str, output_uri: str, config: PipelineConfig, shard_index: int) -> ShardStats:
    """Answer one shard of the job planned in `output_uri`, in a long-lived worker that keeps its model loaded
    (the last model asked for stays loaded, so a worker serving one job loads it once).

    Raises:
        RunFailed: this worker's copy of the model is not the job's model (another content hash).
    """
    output = open_output(output_uri, config.storage)
    saved = output.read_text(JOB_FILE)
    if saved is None:
        raise RunFailed(f"{output_uri} has no {JOB_FILE}: plan the job (run_batch_job / the flow) first")
    plan = JobPlan.from_json(saved)
    # The job's model as it named it (a registry alias) is the version the job resolved it to when it was planned,
    # never the one the alias names now: a promotion while the job runs must not put another model on this worker.
    ref = plan.model.pinned if model_ref == plan.model.uri else model_ref
    runner, content_hash = _worker_runner(ref, config.model_dump_json(), plan.longest_prompt, plan.records)
    if content_hash != plan.model.content_hash:
        raise RunFailed(
            f"{ref} resolves to {content_hash} on this worker but job {plan.job_id} runs {plan.model.content_hash} "
            f"({plan.model.pinned}): every worker must load the same model (a registered version, or the same folder "
            "on every machine)"
        )
    shard = plan.shards[shard_index]
    if shard not in pending_shards(plan, output):  # a retried task after its shard was published
        log.info("shard %s of job %s is done already", shard.name, plan.job_id)
        return ShardStats(shard.index, 0, 0, 0, 0, 0.0, runner.worker)
    return runner.run(plan, shard, output)


def _tracked(result: JobResult, plan: JobPlan, config: PipelineConfig, again: bool = False) -> JobResult:
    """With `infer.track`, an MLflow run for the job: model version tags, settings, metrics, manifest. `again`: the
    job was finished before this command; the run logged then stands (a new one only where there is none)."""
    if not config.infer.track:
        return result
    import json

    from vlmops.tracking import Tracker

    tracker = Tracker(config.tracking)
    tags = {
        "job_id": plan.job_id,
        "model.uri": plan.model.uri,
        "model.version": plan.model.version or "",
        "model.content_hash": plan.model.content_hash,
        "output": result.output,
    }
    if again and (logged := tracker.finished_run({"job_id": plan.job_id, "output": result.output})):
        log.info("job %s: its MLflow run %s was logged when it finished", plan.job_id, logged)
        result.mlflow_run_id = logged
        return result
    with tracker.run(f"batch-infer-{plan.job_id}", tags=tags) as run_id:
        tracker.log_params(run_id, {"input": plan.input, **plan.settings})
        tracker.log_metrics(run_id, result.metrics())
        tracker.log_text(run_id, json.dumps(result.manifest, indent=2), "manifest.json")
        if result.results:  # the first answers beside their questions (and references), as a table
            tracker.log_table(run_id, sample_rows(open_output(result.output, config.storage)), "samples.json")
        if result.ran:  # the shards this run answered, as MLflow charts and a PNG
            _log_shard_speed(tracker, run_id, result)
    result.mlflow_run_id = run_id
    return result


def _log_shard_speed(tracker: Tracker, run_id: str, result: JobResult) -> None:
    """Per shard, in the order they finished (steps 0, 1, ...): records/s (answered or rejected), images/s,
    generated tokens/s, seconds and rejects; and `throughput.png`, records/s per shard against the records done."""
    from vlmops.plots import shard_throughput

    ran = result.ran

    def rate(count: int, seconds: float) -> float:
        return count / seconds if seconds > 0 else 0.0

    tracker.log_series(
        run_id,
        {
            "shard_records_per_s": [rate(s.results + s.rejects, s.seconds) for s in ran],
            "shard_images_per_s": [rate(s.images, s.seconds) for s in ran],
            "shard_tokens_per_s": [rate(s.generated_tokens, s.seconds) for s in ran],
            "shard_seconds": [s.seconds for s in ran],
            "shard_rejects": [s.rejects for s in ran],
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        shards = [(s.worker, s.results + s.rejects, s.seconds) for s in ran]
        job_rate = rate(sum(records for _, records, _ in shards), result.seconds)
        plot = shard_throughput(shards, job_rate, Path(tmp) / "throughput.png")
        tracker.log_artifact(run_id, plot)
