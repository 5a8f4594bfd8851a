"""version: track a dataset snapshot or a model folder with DVC and push it to the remote."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.retry import SERVICE_BACKOFF, SERVICE_RETRIES, transient
from vlmops.config import PipelineConfig
from vlmops.versioning import DvcStore, DvcVersion


def dvc_store(config: PipelineConfig) -> DvcStore:
    output_dir = Path(config.run.output_dir)
    v = config.versioning
    return DvcStore(v.repo or output_dir, v.remote_name, v.remote_url or str(output_dir / "dvc-remote"))


@task(
    name="version",
    cache_policy=NO_CACHE,
    retries=SERVICE_RETRIES,
    retry_delay_seconds=SERVICE_BACKOFF,
    retry_condition_fn=transient,
)
def version_path(config: PipelineConfig, path: str) -> DvcVersion:
    """`dvc add` + `dvc push` (both idempotent: a retry re-pushes only what is missing); returns the .dvc
    file, the recorded hash and the remote."""
    return dvc_store(config).track(path)
