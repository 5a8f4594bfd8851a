"""promote's steps: find challenger and champion, fetch the evaluation set, score, record the decision."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.retry import retry_delays, transient
from vlmops.config import PipelineConfig
from vlmops.evaluate.metrics import EvalResult, evaluate_predictions
from vlmops.registry.promote import Contest, Decision, evaluation_set, find_contest, record_decision
from vlmops.tracking import Tracker


@task(
    name="find_contest",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=retry_delays(10, 10),
    retry_condition_fn=transient,
)
def find_contenders(config: PipelineConfig, challenger: str | None) -> Contest:
    """The challenger version and the current champion (if any), from the registry."""
    return find_contest(config, challenger)


@task(
    name="evaluation_set",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=retry_delays(10, 10),
    retry_condition_fn=transient,
)
def fetch_evaluation_set(config: PipelineConfig, contest: Contest, work_dir: str) -> str:
    """The file both versions answer (pulled from the DVC remote when this worker lacks it)."""
    return str(evaluation_set(config, contest, Path(work_dir)))


@task(name="score", cache_policy=NO_CACHE)
def score(predictions: str) -> EvalResult:
    """Exact-match accuracy of one version's predictions."""
    return evaluate_predictions(predictions)


@task(name="record_promotion", cache_policy=NO_CACHE)
def record_promotion(
    tracker: Tracker, decision: Decision, contest: Contest, tags: dict[str, str], samples: list[dict[str, object]]
) -> str:
    """The decision as an MLflow run and version tags; `champion` moves if it passed. Not retried: it creates
    a run, and the alias move is its last step."""
    return record_decision(tracker, decision, contest, tags=tags, samples=samples)
