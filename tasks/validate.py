"""validate_dataset: check every record, report statistics, freeze the data into a snapshot."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import task

from tasks.caching import inputs_and_files
from vlmops.config import DataConfig, StorageConfig
from vlmops.data.prepare import PreparedDataset, prepare_dataset
from vlmops.models.template import token_counter
from vlmops.plots import length_histogram
from vlmops.tracking import Tracker


@task(
    name="validate_dataset",
    cache_policy=inputs_and_files(["train_file", "eval_file", "model_path"], siblings=["train_file", "eval_file"]),
    persist_result=True,
)
def validate_dataset(
    data: DataConfig,
    train_file: str,
    eval_file: str | None,
    model_path: str,
    out_root: str,
    system_prompt: str | None,
    storage: StorageConfig,
    seed: int,
) -> PreparedDataset:
    """Validate the dataset files with the base model's tokenizer and write their snapshot."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    num_image_tokens = int(processor.num_image_tokens)
    return prepare_dataset(
        data,
        train_file,
        eval_file,
        out_root,
        token_counter(processor.tokenizer, num_image_tokens, system_prompt),
        num_image_tokens,
        storage=storage,
        seed=seed,
    )


def log_validation(tracker: Tracker, run_id: str, dataset: PreparedDataset, cached: bool) -> None:
    report = dataset.report
    tracker.set_tags(run_id, {"cached": cached, "dataset.path": dataset.path, "dataset.hash": dataset.content_hash})
    tracker.log_params(run_id, {f"source.{k}": v for k, v in report.sources.items()})
    metrics: dict[str, float] = {"rejected": len(report.rejected), "dropped_too_long": len(report.dropped_too_long)}
    for split, stats in report.splits.items():
        for key, value in vars(stats).items():
            metrics[f"{split}.{key}"] = float(value)
    tracker.log_metrics(run_id, metrics)
    tracker.log_artifact(run_id, dataset.path / "report.json", "validation")
    tracker.log_text(run_id, report.summary() + "\n", "validation/summary.txt")
    if report.lengths:
        with tempfile.TemporaryDirectory() as tmp:
            tracker.log_artifact(
                run_id, length_histogram(report.lengths, Path(tmp) / "token_lengths.png"), "validation"
            )
    tracker.log_text(run_id, json.dumps(report.sources, indent=2), "validation/sources.json")
