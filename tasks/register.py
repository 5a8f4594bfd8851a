"""register: a new MLflow model version of the merged checkpoint, aliased `challenger`.

With versioning on, the version's artifacts are a pointer to the copy DVC pushed (`models:/NAME@ALIAS`
loading pulls it from the DVC remote): the weights are stored once in the shared store, not uploaded again.

The retrain flow registers once per flow run, run folder and merged model (`once_per` its `prefect_flow_run_id`,
`run_folder` and `prefect_merge_task_run_id` tags): a retry of the flow run in the same folder (`prefect flow-run
retry`, a flow's `retries`) that reuses its merge takes the registration its earlier try finished (the task run says
`Cached`: the same version, its alias as that try and the steps after it left it), and one whose earlier try stopped
between creating the version and setting its alias finishes that version. A retry that merged again (its merged/ or
train/ deleted since) has a model the earlier version is not of: it registers that one as a new version. A retry on a
machine without the folder trains a model of its own and registers it anew.

A version registered before the merge tag existed (a flow run retried across the upgrade) has none, so no retry reuses
it: which merge it is of cannot be told, and a second version of perhaps the same model is the safe side of that
doubt, where reusing it could name weights the retry did not evaluate. (Such a retry merges again anyway: the merge
step's code, part of its cache key, changed with the tag.)
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from tasks.caching import within_flow_run
from tasks.retry import SERVICE_BACKOFF, SERVICE_RETRIES, transient
from vlmops.tracking import RegisteredVersion, Tracker
from vlmops.versioning import DvcVersion, write_pointer


@dataclass
class SameRegistration(CachePolicy):
    """What `Tracker.register_model` takes for the same registration, made once: the values of the `once_per` tags (the
    flow run, its run folder and the merge task run, whichever try), else the MLflow run: without `once_per`, another
    run's call registers anew. A retry that merged again has another merge tag, so another key: its registration
    runs, and makes the new model's version."""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        once_per = list(inputs.get("once_per") or ())
        which = [str(inputs["tags"].get(key)) for key in once_per] if once_per else [inputs["run_id"]]
        return hash_objects([once_per, which], raise_on_failure=True)


@task(
    name="register",
    # Out of the key: what differs between tries of one flow run (the MLflow run of this try's step, the parent's id
    # among the tags) and the tracker, which is the config's; `SameRegistration` puts back what identifies the call.
    cache_policy=within_flow_run([], ignore=["tracker", "run_id", "tags"]) + SameRegistration(),
    persist_result=True,
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
    once_per: Sequence[str] = (),
) -> RegisteredVersion:
    """Register the model pushed to DVC (a pointer), else the folder itself; a retry reuses the version (of `run_id`,
    or of every run whose `tags` give the keys of `once_per` this one's values: see `Tracker.register_model`)."""
    if pushed is None:
        return tracker.register_model(run_id, Path(model_dir), name, alias, tags=tags, once_per=once_per)
    with tempfile.TemporaryDirectory() as tmp:
        write_pointer(pushed, Path(tmp))
        return tracker.register_model(run_id, Path(tmp), name, alias, tags=tags, once_per=once_per)
