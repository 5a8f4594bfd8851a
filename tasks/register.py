"""register: a new MLflow model version of the merged checkpoint, aliased `challenger`.

With versioning on, the version's artifacts are a pointer to the copy DVC pushed (`models:/NAME@ALIAS`
loading pulls it from the DVC remote): the weights are stored once in the shared store, not uploaded again.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.retry import SERVICE_BACKOFF, SERVICE_RETRIES, transient
from vlmops.tracking import RegisteredVersion, Tracker
from vlmops.versioning import DvcVersion, write_pointer


@task(
    name="register",
    cache_policy=NO_CACHE,
    retries=SERVICE_RETRIES,
    retry_delay_seconds=SERVICE_BACKOFF,
    retry_condition_fn=transient,
)
def register(
    tracker: Tracker,
    run_id: str,
    model_dir: str,
    name: str,
    alias: str,
    tags: Mapping[str, object],
    pushed: DvcVersion | None = None,
) -> RegisteredVersion:
    """Register the model pushed to DVC (a pointer), else the folder itself; a retry reuses the version."""
    if pushed is None:
        return tracker.register_model(run_id, Path(model_dir), name, alias, tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        write_pointer(pushed, Path(tmp))
        return tracker.register_model(run_id, Path(tmp), name, alias, tags=tags)
