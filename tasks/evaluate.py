"""evaluate: exact-match accuracy of the base and the fine-tuned model on the eval split."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from vlmops.evaluate.metrics import evaluate_predictions
from vlmops.evaluate.report import write_comparison
from vlmops.tracking import Tracker


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(base_predictions: str | None, tuned_predictions: str, out_dir: str) -> dict[str, float]:
    """Score the prediction files; with a base file, write comparison.json and comparison.png."""
    tuned = evaluate_predictions(Path(tuned_predictions))
    if base_predictions is None:
        metrics = {"finetuned_accuracy": tuned.accuracy}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "comparison.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics
    numbers, _chart = write_comparison(evaluate_predictions(Path(base_predictions)), tuned, out_dir)
    return dict(json.loads(numbers.read_text()))


def log_evaluation(tracker: Tracker, run_id: str, metrics: dict[str, float], out_dir: str) -> None:
    tracker.log_metrics(run_id, metrics)
    tracker.log_artifact(run_id, out_dir, "evaluation")
