"""batch_infer: answer every prompt of the eval split with one model, into a predictions jsonl."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from vlmops.config import PipelineConfig
from vlmops.infer.batch import BatchResult, batch_infer
from vlmops.infer.parallel import default_workers, parallel_batch_infer
from vlmops.models.loading import load_model
from vlmops.tracking import Tracker


@task(name="batch_infer", cache_policy=NO_CACHE)
def batch_infer_task(model_path: str, dataset_file: str, out_file: str, config: PipelineConfig) -> BatchResult:
    """Write the model's predictions for every record: in this process, or one worker per GPU."""
    if (config.infer.workers or default_workers()) > 1:
        return parallel_batch_infer(model_path, dataset_file, out_file, config, config.infer.workers)
    loaded = load_model(model_path, dtype=config.model.dtype, attn=config.model.attn)
    return batch_infer(
        loaded, Path(dataset_file), Path(out_file), config.infer, config.model.system_prompt, config.storage
    )


def log_batch(tracker: Tracker, run_id: str, label: str, result: BatchResult) -> None:
    tracker.log_metrics(
        run_id,
        {
            f"{label}.seconds": result.seconds,
            f"{label}.tokens_per_s": result.tokens_per_s,
            f"{label}.records": result.count,
        },
    )
    tracker.log_artifact(run_id, result.path, "predictions")
