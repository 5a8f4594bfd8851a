"""validate_dataset: check every record, report statistics, freeze the data into a snapshot."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import task

from tasks.caching import inputs_and_files
from vlmops.config import DataConfig, StorageConfig
from vlmops.data.prepare import DATASETS_DIR, PreparedDataset, prepare_dataset
from vlmops.plots import length_histogram
from vlmops.tracking import Tracker


@task(
    name="validate_dataset",
    cache_policy=inputs_and_files(
        ["train_file", "eval_file", "model_path"],
        datasets=["train_file", "eval_file"],
        data="data",
        written=["output_dir", "dvc_writes"],
        storage="storage",
    ),
    persist_result=True,
)
def validate_dataset(
    data: DataConfig,
    train_file: str,
    eval_file: str | None,
    model_path: str,
    output_dir: str,
    system_prompt: str | None,
    storage: StorageConfig,
    seed: int,
    dvc_writes: list[str] | None = None,
) -> PreparedDataset:
    """Validate the dataset files (local, or `s3://` objects and prefixes on `storage`'s server) with the base model's
    tokenizer and write their snapshot under `output_dir`; `dvc_writes` (what DVC writes in versioning.repo:
    `DvcStore.writes`) only feeds the cache key."""
    from vlmops.models.loading import load_processor

    processor = load_processor(model_path)
    return prepare_dataset(
        data,
        train_file,
        eval_file,
        Path(output_dir) / DATASETS_DIR,
        processor.tokenizer,
        int(processor.num_image_tokens),
        system_prompt=system_prompt,
        storage=storage,
        seed=seed,
    )


def log_validation(tracker: Tracker, run_id: str, dataset: PreparedDataset, cached: bool) -> None:
    report = dataset.report
    tracker.set_tags(run_id, {"cached": cached, "dataset.path": dataset.path, "dataset.hash": dataset.content_hash})
    tracker.log_params(run_id, {f"source.{k}": v for k, v in report.sources.items()})
    metrics: dict[str, float] = {
        "read": report.read,
        "rejected": report.rejected_count,
        "dropped_too_long": len(report.dropped_too_long),
        "duplicates": report.duplicates,
    }
    for split, stats in report.splits.items():
        for key, value in vars(stats).items():
            metrics[f"{split}.{key}"] = float(value)
    tracker.log_metrics(run_id, metrics)
    tracker.log_artifact(run_id, dataset.path / "report.json", "validation")
    # The rejects file is rewritten by each validation: a cached step's copy may describe a later one.
    rejects = Path(report.rejects_file) if report.rejects_file and not cached else None
    if rejects is not None and rejects.is_file() and rejects.stat().st_size:
        tracker.log_artifact(run_id, rejects, "validation")
    tracker.log_text(run_id, report.summary() + "\n", "validation/summary.txt")
    if report.lengths:
        with tempfile.TemporaryDirectory() as tmp:
            tracker.log_artifact(
                run_id, length_histogram(report.lengths, Path(tmp) / "token_lengths.png"), "validation"
            )
    tracker.log_text(run_id, json.dumps(report.sources, indent=2), "validation/sources.json")
