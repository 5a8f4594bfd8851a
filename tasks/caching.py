"""Prefect cache policies whose keys change when the files a step reads change, not only when its arguments do.

Prefect's INPUTS + TASK_SOURCE policy hashes the arguments; a path argument alone would reuse a stale result after
the file behind it changed. `FileContents` adds the files behind chosen arguments, by their fingerprints
(`vlmops.fingerprints`, which says what each dataset file and folder, S3 object, image and model folder is known by,
and what a folder walk leaves out). `within_flow_run` keeps a step that writes into a flow run's own folder to that
run and its retries; `run_or_reuse` runs again a step whose cached result names files gone since.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from prefect import Task, get_run_logger
from prefect.cache_policies import INPUTS, RUN_ID, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from vlmops.fingerprints import fingerprint


@dataclass
class FileContents(CachePolicy):
    """Adds the contents of the paths passed in `params` to the cache key.

    `datasets`: params naming a dataset file, whose records' images are in the key too (`dataset_fingerprint`), a
    folder of them (`dataset_folder_fingerprint`), or an `s3://` object or prefix of them (`s3_dataset_fingerprint`).
    `data`: the param holding the `DataConfig`: its `allowed_roots` are where those images may lie, and its
    `rejects_file`, which the validation writes, is left out of folder walks.
    `storage`: the param holding the `StorageConfig`, the S3 server an `s3://` param or image is looked up on.
    `written`: params naming a folder or file the flow writes (`run.output_dir`), or a list of them (what DVC writes
    in its repository), left out of every folder walked above that holds it.
    """

    params: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    data: str | None = None
    storage: str | None = None
    written: list[str] = field(default_factory=list)

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        written: list[Any] = []
        for name in self.written:
            value = inputs.get(name)
            written += value if isinstance(value, list) else [value]
        data = inputs[self.data] if self.data else None
        if data is not None:
            written.append(data.rejects_file)
        skip = {Path(str(path)).expanduser().resolve() for path in written if path is not None}
        roots = data.allowed_roots if data is not None else []
        storage = inputs[self.storage] if self.storage else None
        parts = [fingerprint(inputs.get(name), name in self.datasets, roots, skip, storage) for name in self.params]
        return hash_objects(parts, raise_on_failure=True)


def inputs_and_files(
    params: list[str],
    datasets: list[str] | None = None,
    data: str | None = None,
    written: list[str] | None = None,
    storage: str | None = None,
) -> CachePolicy:
    """INPUTS + TASK_SOURCE + the files behind `params` (and `datasets`, `data`, `written`, `storage`: see
    `FileContents`)."""
    policy = FileContents(params=params, datasets=datasets or [], data=data, storage=storage, written=written or [])
    return INPUTS + TASK_SOURCE + policy


def within_flow_run(params: list[str], datasets: list[str] | None = None, ignore: Sequence[str] = ()) -> CachePolicy:
    """`inputs_and_files(params, datasets)` (but the inputs in `ignore`) + the flow run's id: reused by a retry of the
    same flow run only.

    For the steps that write into the flow run's own folder (retrain's train, merge and eval predictions, promote's
    eval predictions) and the one that registers its model: another flow run is another run and does them again, while
    a retry of this one (`prefect flow-run retry`, a flow's `retries`) goes on in the same folder (flows/run_folder.py)
    and takes the results of the steps that finished: a model is not trained twice, nor an eval record answered twice,
    nor a version registered twice. The flow takes the results of the steps that write into the folder through
    `run_or_reuse`, which runs a step again whose output was deleted since. `ignore`: inputs that differ between tries
    of one step (the MLflow run of this try's step)."""
    inputs: CachePolicy = INPUTS
    for name in ignore:
        inputs = inputs - name
    return inputs + TASK_SOURCE + FileContents(params=params, datasets=datasets or []) + RUN_ID


class WritesOutputs(Protocol):
    """A step's result that names what the step wrote (`PreparedDataset`, `TrainResult`, `MergeResult`,
    `BatchResult`)."""

    def outputs(self) -> list[Path]: ...


Args = ParamSpec("Args")
Written = TypeVar("Written", bound=WritesOutputs)


def run_or_reuse(task: Task[Args, Written], *args: Args.args, **kwargs: Args.kwargs) -> tuple[Written, bool]:
    """Run `task`: its result, and whether that was reused from the cache (the task run says `Cached`).

    A cached result is reused only while every path it names (`outputs()`) is there: a run folder's training or merged
    model deleted since, a dataset snapshot cleaned away, and the step runs again, its new result written over the
    cached one (`refresh_cache`: the same key). The key cannot see this itself: it is computed before the step runs,
    when the first try, which has written nothing yet, finds the same nothing there as a retry whose output is gone.
    """
    state = task(*args, return_state=True, **kwargs)
    result = state.result()
    if state.name != "Cached":
        return result, False
    gone = [str(path) for path in result.outputs() if not path.exists()]
    if not gone:
        return result, True
    get_run_logger().warning("%s: its cached result names %s, gone since; running it again", task.name, ", ".join(gone))
    return task.with_options(refresh_cache=True)(*args, **kwargs), False
