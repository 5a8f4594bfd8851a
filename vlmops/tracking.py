"""MLflow helpers: one parent run per pipeline run, a child run per step, and model registration.

Everything goes through `MlflowClient` with explicit run ids (no fluent "active run" state), so steps
running in Prefect worker threads or subprocesses log to the right run. A subprocess (training) gets the
run through the `MLFLOW_TRACKING_URI` / `MLFLOW_RUN_ID` environment variables.

Several pipeline runs may share one store at once (two `vlmops run` on one machine share the SQLite file;
a team's runs share the server): creating the store, the experiment and the registered model, and moving an
alias, are written so that the runs neither fail nor leave the registry inconsistent (tests/test_concurrent_runs.py).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from vlmops.config import TrackingConfig
from vlmops.errors import RunFailed
from vlmops.folders import files_under
from vlmops.plural import counted
from vlmops.redact import redact_text, redact_uri
from vlmops.staging import build_lock

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
# A writer that lost the alias to a newer version sets it again; a handful of rounds covers any number of runs
# registering at once (each round, a newer registration only ever wins).
ALIAS_ROUNDS = 10
ALIAS_TAG = "registry.alias"
"""Model-version tag: the alias the registering run asked for."""
# MLflow caps a param value at 6000 characters and a batch at 100 params / 1000 metrics.
MAX_PARAM_CHARS = 6000
PARAM_BATCH = 100
METRIC_BATCH = 1000


@dataclass
class RegisteredVersion:
    name: str
    version: str
    alias: str
    source: str
    alias_version: str | None = None
    """The version `alias` names after registration: this one, unless a newer version registered at the same
    time (another run) took it."""


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative `sqlite:///path` absolute, so the store does not depend on the working directory."""
    if uri.startswith(SQLITE_PREFIX) and not uri.startswith(SQLITE_PREFIX + "/"):
        path = Path(uri[len(SQLITE_PREFIX) :]).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return SQLITE_PREFIX + str(path)
    return uri


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold a file lock beside a SQLite store (nothing for a server): for work that must not overlap between
    processes sharing the file.

    MLflow creates a new SQLite store's tables (its Alembic migrations) when the first client touches it, without
    a lock: two processes doing that at once fail (`AttributeError: dimension_attributes` in a migration, seen
    with two `vlmops run` started together). A server creates its tables once, at its own start.
    """
    if not uri.startswith(SQLITE_PREFIX):
        yield
        return
    with build_lock(Path(uri[len(SQLITE_PREFIX) :].split("?", 1)[0])):
        yield


def open_client(uri: str, registry_uri: str | None = None) -> Any:
    """An `MlflowClient` on `uri` whose tracking and registry stores exist (created under `store_lock`)."""
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=registry_uri or uri)
        # Touch both stores while the lock is held: this is what creates a new SQLite store's tables.
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    return client


class Tracker:
    """Logs a pipeline run to MLflow."""

    def __init__(self, config: TrackingConfig, artifact_root: Path | None = None):
        self.uri = resolve_tracking_uri(config.uri)
        self.client = open_client(self.uri)
        with store_lock(self.uri):
            self.experiment_id = self._experiment(config.experiment, artifact_root)

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            return str(existing.experiment_id)
        location = None
        if artifact_root is not None and self.uri.startswith("sqlite:"):
            # Keep artifacts beside the SQLite store instead of ./mlruns in whatever folder we run from.
            artifact_root.mkdir(parents=True, exist_ok=True)
            location = artifact_root.resolve().as_uri()
        try:
            return str(self.client.create_experiment(name, artifact_location=location))
        except MlflowException as err:
            # Another run on the same server created it between the lookup and here: use theirs.
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            created = self.client.get_experiment_by_name(name)
            if created is None:
                raise
            return str(created.experiment_id)

    def start_run(self, name: str, parent_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        all_tags = {key: tag_value(value) for key, value in (tags or {}).items()}
        if parent_id is not None:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return str(run.info.run_id)

    def end_run(self, run_id: str, failed: bool = False) -> None:
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def reopen_run(self, parent_id: str | None, tags: Mapping[str, str], once_per: Sequence[str]) -> str | None:
        """The newest run of this experiment under `parent_id` (top-level for None) whose tags give the keys of
        `once_per` the values `tags` gives them, set RUNNING again with `tags` (whatever state an earlier try left it
        in: FINISHED, FAILED, or RUNNING after a kill); None when there is none.

        Raises:
            ValueError: a key of `once_per` is not in `tags` with a value (one without both kinds of quote).
        """
        parent = "IS NULL" if parent_id is None else f"= '{parent_id}'"
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"{_same_tags('reopen_run', tags, once_per)} and tags.`mlflow.parentRunId` {parent}",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            return None
        run_id = str(runs[0].info.run_id)
        self.client.update_run(run_id, status="RUNNING")  # MLflow reopens a finished run by id, as start_run(run_id=)
        self.set_tags(run_id, tags)  # an earlier try's values of the other tags (its git commit) give way to this one's
        return run_id

    @contextmanager
    def run(
        self,
        name: str,
        parent_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        once_per: Sequence[str] = (),
    ) -> Iterator[str]:
        """A run that ends FINISHED, or FAILED if the block raises.

        Args:
            once_per: keys of `tags` whose values say which run this is: a run carrying those values under the same
                parent (an earlier try's, in any state) goes on (`reopen_run`) instead of a second one being made.
                The retrain flow's parent run, once per `prefect_flow_run_id` and `run_folder`: a retried flow run is
                one MLflow run, which ends FINISHED when the retry succeeds.
        """
        run_id = (self.reopen_run(parent_id, tags or {}, once_per) if once_per else None) or self.start_run(
            name, parent_id, tags
        )
        try:
            yield run_id
        except BaseException:
            self.end_run(run_id, failed=True)
            raise
        self.end_run(run_id)

    def finished_run(self, tags: Mapping[str, str]) -> str | None:
        """The newest FINISHED run of this experiment carrying every one of `tags`, if any (None also where a value
        holds both kinds of quote, which a search filter cannot hold)."""
        quoted = {key: _quoted(tag_value(value)) for key, value in tags.items()}
        if None in quoted.values():
            return None
        where = " and ".join(f"tags.`{key}` = {value}" for key, value in quoted.items())
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"{where} and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return str(runs[0].info.run_id) if runs else None

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(redact_text(str(v)) if v is not None else v)) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(run_id, params=items[i : i + PARAM_BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        """Finite values as metrics; a NaN or infinite one as a tag with a warning; a None (not measured) is skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items() if v is not None}  # None: not measured (no eval split)
        items = [Metric(k, v, now, step or 0) for k, v in values.items() if math.isfinite(v)]
        for i in range(0, len(items), METRIC_BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + METRIC_BATCH])
        at = "" if step is None else f" at step {step}"
        self._record_non_finite(run_id, {k: f"{v}{at}" for k, v in values.items() if not math.isfinite(v)})

    def log_series(self, run_id: str, series: Mapping[str, Sequence[float]]) -> None:
        """Each metric's values as its steps 0, 1, ...: MLflow's run page charts them."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step)
            for k, values in series.items()
            for step, v in enumerate(values)
            if math.isfinite(float(v))
        ]
        for i in range(0, len(items), METRIC_BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + METRIC_BATCH])
        non_finite = {}
        for key, values in series.items():
            steps: dict[str, list[int]] = {}  # "nan" / "inf" / "-inf" -> the steps that hold it
            for step, v in enumerate(values):
                if not math.isfinite(float(v)):
                    steps.setdefault(str(float(v)), []).append(step)
            if steps:
                non_finite[key] = "; ".join(f"{value} at step {_few(at)}" for value, at in steps.items())
        self._record_non_finite(run_id, non_finite)

    def _record_non_finite(self, run_id: str, found: Mapping[str, str]) -> None:
        """A NaN or infinite value (an accuracy with nothing scored, a diverged loss) as a `metric.<name>` tag and a
        warning: MLflow's metrics keep finite numbers only (a SQL store turns inf into 1.8e308), and a value left
        out silently would hide the problem it reports."""
        for key, value in found.items():
            log.warning("metric %s of MLflow run %s is %s: recorded as the tag metric.%s", key, run_id, value, key)
        if found:
            self.set_tags(run_id, {f"metric.{key}": value for key, value in found.items()})

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, tag_value(value))

    def set_version_tags(self, name: str, version: str, tags: Mapping[str, Any]) -> None:
        """Tags on a registered model version (lineage, promotion decisions), credentials masked as on runs."""
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, tag_value(value))

    def log_artifact(self, run_id: str, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Log a file, or every file of a folder under its relative path.

        Raises:
            UserInputError: a file of the folder is a broken link or no file (a named pipe), before any is logged.
        """
        target = Path(path)
        if not target.is_dir():
            self.client.log_artifact(run_id, str(target), artifact_path)
            return
        # File by file, not MLflow's log_artifacts: its os.walk does not go into a symlinked subfolder (every
        # artifact store's, MLflow 3.x), so a model folder's linked files were left out of the upload (and of
        # `check_uploaded`'s listing, which walked the same way), and a version registered without them.
        for file in files_under(target):
            parent = file.relative_to(target).parent.as_posix()
            within = "/".join(part for part in (artifact_path, parent) if part and part != ".")
            self.client.log_artifact(run_id, str(file), within or None)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_table(self, run_id: str, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """Rows (one set of columns) as an MLflow table artifact, shown as a table on the run's page."""
        columns = list(rows[0]) if rows else []
        self.client.log_table(run_id, {c: [row[c] for row in rows] for c in columns}, artifact_file)

    def register_model(
        self,
        run_id: str,
        model_dir: Path,
        name: str,
        alias: str,
        tags: Mapping[str, Any] | None = None,
        artifact_path: str = "model",
        once_per: Sequence[str] = (),
    ) -> RegisteredVersion:
        """Log a folder as artifacts of `run_id` and register it as a new version of `name` with `alias`.

        The folder is the checkpoint itself, or a DVC pointer to its pushed copy (`vlmops.versioning.
        write_pointer`), so the weights are stored once. Idempotent per run: when a version of `name` from
        `run_id` exists already (a retry after the version was created), that version gets the alias and
        no second one is made. MLflow 3's `register_model("runs:/...")` only accepts logged models; plain
        artifacts register through `create_model_version` with the artifact URI as source.

        Args:
            once_per: keys of `tags` whose values, not `run_id`, say which registration this is: a version of
                `name` carrying those values is reused whichever run made it (a version without one of the tags is
                never reused). The retrain flow's `prefect_flow_run_id`, `run_folder` and
                `prefect_merge_task_run_id`: each try of a flow run registers from a child run of its own, and a try
                that failed after creating its version (before its alias was set, or later in the flow) leaves that
                version to a retry in the same run folder that reuses its merge (a retry that merged again, or one on
                a machine without that folder, has a model of its own, which is registered anew). The tags are
                written with the version, in the call that creates it, so no version is without them.

        Raises:
            ValueError: a key of `once_per` is not in `tags` with a value (one without both kinds of quote).
        """
        from mlflow.exceptions import MlflowException

        existing = self.client.search_model_versions(_earlier_registration(name, run_id, tags or {}, once_per))
        if existing:
            version = max(existing, key=lambda v: int(v.version))
            log.info(
                "%s version %s already registered (from run %s): reusing it", name, version.version, version.run_id
            )
        else:
            self.log_artifact(run_id, model_dir, artifact_path)
            self.check_uploaded(run_id, model_dir, artifact_path)
            try:
                self.client.create_registered_model(name)
            except MlflowException as err:
                if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
                    raise
            source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
            version = self.client.create_model_version(
                name, source=source, run_id=run_id, tags={k: tag_value(v) for k, v in (tags or {}).items()}
            )
        # The version asks for its alias in a tag, so that concurrent registrations agree on which one gets it.
        self.client.set_model_version_tag(name, str(version.version), ALIAS_TAG, alias)
        alias_version = self._point_alias_at_newest(name, alias)
        if alias_version == str(version.version):
            log.info("registered %s version %s as @%s", name, version.version, alias)
        else:
            log.warning(
                "registered %s version %s; @%s names version %s, registered by another run at the same time",
                name,
                version.version,
                alias,
                alias_version,
            )
        return RegisteredVersion(name, str(version.version), alias, str(version.source), alias_version)

    def _point_alias_at_newest(self, name: str, alias: str) -> str:
        """Point `alias` at the newest version that asked for it; returns that version.

        MLflow has no compare-and-set for aliases: two runs registering at once could each create their version
        and then set the alias in either order, leaving it on the older one. So each sets it to the newest
        version asking for it, reads it back, and sets it again while a newer version appeared meanwhile. The
        last writer's read then sees every version there is (each one is created before its run sets the alias),
        so the alias ends on the newest, whatever the interleaving.
        """
        target = ""
        for _ in range(ALIAS_ROUNDS):
            asking = self.client.search_model_versions(f"name = '{name}' and tags.`{ALIAS_TAG}` = '{alias}'")
            target = str(max(int(v.version) for v in asking))
            current = self.client.get_registered_model(name).aliases.get(alias)
            if current is not None and str(current) == target:
                return target
            self.client.set_registered_model_alias(name, alias, target)
        return target

    def check_uploaded(self, run_id: str, folder: Path, artifact_path: str) -> None:
        """Raise RunFailed unless every file of `folder` is among the run's artifacts under `artifact_path`, at
        its size: a version is created only over a complete upload, so none ever points at missing weights."""
        local = {p.relative_to(folder).as_posix(): p.stat().st_size for p in files_under(folder)}
        stored: dict[str, int | None] = {}
        pending = [artifact_path]
        while pending:
            for info in self.client.list_artifacts(run_id, pending.pop()):
                if info.is_dir:
                    pending.append(info.path)
                else:
                    stored[info.path[len(artifact_path) + 1 :]] = info.file_size
        wrong = sorted(name for name, size in local.items() if stored.get(name, -1) not in (size, None))
        if wrong:
            raise RunFailed(
                f"MLflow run {run_id}: {counted(len(wrong), 'file')} of {folder} missing or truncated in its artifacts "
                f"after the upload ({', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}); the model version "
                f"was not created. Check the artifact store of {redact_uri(self.uri)} and register again"
            )


def tag_value(value: Any) -> str:
    """A tag's value as vlmops stores it, on a run or a model version, and searches for it: as text, with credentials
    masked (`redact_text`: a URL's password, a secret from the environment)."""
    return redact_text(str(value))


def _earlier_registration(name: str, run_id: str, tags: Mapping[str, Any], once_per: Sequence[str]) -> str:
    """The search filter for the versions of `name` that an earlier try of this registration made (`register_model`)."""
    if not once_per:
        return f"name = '{name}' and run_id = '{run_id}'"
    return f"name = '{name}' and {_same_tags('register_model', tags, once_per)}"


def _same_tags(caller: str, tags: Mapping[str, Any], once_per: Sequence[str]) -> str:
    """The search filter clauses (runs or model versions) for the values `tags` gives the keys of `once_per`.

    Raises:
        ValueError: a key without a value, or with one holding both kinds of quote.
    """
    clauses = []
    for key in once_per:
        value = tag_value(tags.get(key) or "")  # as it was stored
        quoted = _quoted(value)
        if not value or quoted is None:
            # An empty value would match every run or version made without one: the wrong one, reused.
            raise ValueError(
                f"{caller}(once_per={list(once_per)!r}): tags must give {key!r} a value without both kinds of "
                f"quote, got {value!r}"
            )
        clauses.append(f"tags.`{key}` = {quoted}")
    return " and ".join(clauses)


def _few(steps: list[int], shown: int = 10) -> str:
    """The first `shown` steps, and how many more."""
    more = f" and {len(steps) - shown} more" if len(steps) > shown else ""
    return ", ".join(map(str, steps[:shown])) + more


def _quoted(value: str) -> str | None:
    """`value` as a string of an MLflow search filter: in single or double quotes, as it is (the filter has no escapes);
    None for a value holding both."""
    for quote in "'\"":
        if quote not in value:
            return f"{quote}{value}{quote}"
    return None


def git_commit(folder: Path | None = None) -> str | None:
    """The commit of the code that runs (None outside a git checkout); `-dirty` if there are local changes."""
    cwd = folder or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    return f"mlflow ui --backend-store-uri {redact_uri(uri)}"


LOCAL_UI = "http://127.0.0.1:5000"
"""Where `mlflow ui` serves a local store by default: the links for a SQLite store point there."""


@dataclass(frozen=True)
class MlflowLinks:
    """Browser links to a run and a model version in the MLflow UI."""

    run: str
    model_version: str | None = None


def mlflow_links(
    uri: str, experiment_id: str, run_id: str, name: str | None = None, version: str | None = None
) -> MlflowLinks:
    """Links into the UI of the tracking server at `uri`; for a local store, into `mlflow ui` on it (started with
    `ui_command(uri)`). A login in the URI (user:password@, ?token=) stays out: the links go into artifacts others read."""
    base = LOCAL_UI
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        base = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", ""))
    model = f"{base}/#/models/{name}/versions/{version}" if name and version else None
    return MlflowLinks(f"{base}/#/experiments/{experiment_id}/runs/{run_id}", model)


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
