"""register: a new MLflow model version of the merged checkpoint, aliased `challenger`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from vlmops.tracking import RegisteredVersion, Tracker


@task(name="register", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def register(
    tracker: Tracker, run_id: str, model_dir: str, name: str, alias: str, tags: Mapping[str, object]
) -> RegisteredVersion:
    """Log the merged checkpoint as artifacts of the register run and create a model version from them."""
    return tracker.register_model(run_id, Path(model_dir), name, alias, tags=tags)
