"""evaluate: exact-match accuracy of the fine-tuned (and base) predictions, in `vlmops eval`'s layout."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from vlmops.evaluate.run import RunEvaluation, evaluate_run
from vlmops.infer.batch_job import BatchResult
from vlmops.tracking import Tracker


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(out_dir: str, eval_file: str, model: str, tuned: BatchResult, base: BatchResult | None) -> RunEvaluation:
    """Score the predictions in `out_dir`; write metrics.json and, with a base, comparison.json and .png."""
    return evaluate_run(out_dir, eval_file, model, tuned, base)


def log_evaluation(tracker: Tracker, run_id: str, result: RunEvaluation) -> None:
    tracker.log_metrics(run_id, result.metrics())
    tracker.log_artifact(run_id, result.metrics_file, "evaluation")
    for name in ("comparison.json", "comparison.png"):
        if (result.out_dir / name).is_file():
            tracker.log_artifact(run_id, result.out_dir / name, "evaluation")
