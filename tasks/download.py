"""download_model: fetch the base model (converting the original release layout once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from tasks.caching import inputs_and_files
from tasks.retry import retry_delays, transient
from vlmops.config import ModelConfig, StorageConfig
from vlmops.models.download import ModelSnapshot, s3_source_etags
from vlmops.models.download import download_model as fetch_model
from vlmops.tracking import Tracker


@dataclass
class S3SourceListing(CachePolicy):
    """Adds an S3 model's listing (keys and ETags) to the key; nothing for other sources."""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        etags = s3_source_etags(inputs["model"], inputs["storage"], inputs["output_dir"])
        return None if etags is None else hash_objects(etags, raise_on_failure=True)


@task(
    name="download_model",
    cache_policy=inputs_and_files(["local_source"]) + S3SourceListing(),
    persist_result=True,
    retries=2,
    retry_delay_seconds=retry_delays(30, 30),
    retry_condition_fn=transient,
)
def download_model(
    model: ModelConfig, storage: StorageConfig, output_dir: str, local_source: str | None = None
) -> ModelSnapshot:
    """Download (or copy) and verify the base model; `local_source` only feeds the cache key."""
    return fetch_model(model, storage, Path(output_dir))


def fetch_base_model(
    model: ModelConfig, storage: StorageConfig, output_dir: str, local_source: str | None
) -> tuple[ModelSnapshot, bool]:
    """The download step's snapshot and whether it was Cached. A cached snapshot the model cache no longer holds (its
    folder gone, or fetched again since by `vlmops download --refresh`) is not used: the step runs again."""
    state = download_model(model, storage, output_dir, local_source, return_state=True)
    snapshot = state.result()
    if state.name != "Cached" or snapshot.is_current():
        return snapshot, state.name == "Cached"
    get_run_logger().warning(
        "cached model %s is gone or was fetched again since (vlmops download --refresh); checking it again",
        snapshot.path,
    )
    return download_model.with_options(refresh_cache=True)(model, storage, output_dir, local_source), False


def log_download(tracker: Tracker, run_id: str, snapshot: ModelSnapshot, cached: bool) -> None:
    tracker.log_params(run_id, {"source": snapshot.source, "id": snapshot.id, "revision": snapshot.revision})
    tracker.set_tags(run_id, {"cached": cached, "converted": snapshot.converted, "model.path": snapshot.path})
    if snapshot.manifest_path and Path(snapshot.manifest_path).is_file():
        tracker.log_artifact(run_id, snapshot.manifest_path, "manifest")
