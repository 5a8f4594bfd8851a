"""evaluate: exact-match accuracy of the base and the fine-tuned model on the eval split."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from vlmops.evaluate.metrics import EvalResult, compare, evaluate_predictions

from vlmops.plots import accuracy_chart
from vlmops.tracking import Tracker


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(base_predictions: str | None, tuned_predictions: str, out_file: str) -> dict[str, float]:
    """Score both prediction files and write the comparison as JSON."""
    tuned = evaluate_predictions(Path(tuned_predictions))
    base: EvalResult | None = evaluate_predictions(Path(base_predictions)) if base_predictions else None
    metrics = compare(base, tuned) if base is not None else {"finetuned_accuracy": tuned.accuracy}
    Path(out_file).write_text(json.dumps({"metrics": metrics, "finetuned": asdict(tuned)}, indent=2) + "\n")
    return metrics


def log_evaluation(tracker: Tracker, run_id: str, metrics: dict[str, float], out_file: str) -> None:
    tracker.log_metrics(run_id, metrics)
    tracker.log_artifact(run_id, out_file, "evaluation")
    with tempfile.TemporaryDirectory() as tmp:
        chart = accuracy_chart(metrics, Path(tmp) / "accuracy.png")
        tracker.log_artifact(run_id, chart, "evaluation")
