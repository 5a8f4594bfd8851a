"""batch_infer: answer every prompt of the eval split with one model, into a predictions jsonl."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from vlmops.infer.batch import BatchResult, batch_infer
from vlmops.models.loading import load_model
from vlmops.tracking import Tracker


@task(name="batch_infer", cache_policy=NO_CACHE)
def batch_infer_task(
    model_path: str, dataset_file: str, out_file: str, infer: InferConfig, model: ModelConfig, storage: StorageConfig
) -> BatchResult:
    """Load the model once and write its predictions for every record."""
    loaded = load_model(model_path, dtype=model.dtype, attn=model.attn)
    return batch_infer(
        loaded, Path(dataset_file), Path(out_file), infer, system_prompt=model.system_prompt, storage=storage
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
