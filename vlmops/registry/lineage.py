"""What a registered model version was made from, and restoring exactly that data and model on another machine.

Every version the retrain flow registers carries these tags (`version_tags`):

    git_commit                 the code that ran (`-dirty` with local changes)
    prefect_flow_run_id        the flow run that trained it; prefect_deployment: its deployment ("none" outside one)
    run_folder                 the run folder (under run.output_dir/runs) that holds its training and merged model
    prefect_merge_task_run_id  the merge task run that made it: a retry of the flow run that merges again registers anew
    base_model.id, .revision, .source, .manifest_hash   the base checkpoint (manifest: every file's sha256)
    config.hash                sha256 of the resolved pipeline config (the run's config.yaml)
    dataset.path, dataset.hash the validated dataset snapshot and its content hash
    dvc.dataset.md5, dvc.model.md5, dvc.remote          the snapshot and the merged model in the DVC remote (its URL's
                                                        password masked: a pull takes it from versioning.remote_url)
    mlflow_run_id              the retrain flow's MLflow parent run

`pull_version` restores the dataset snapshot and the merged model of a version from the DVC remote by those
hashes, checked by DVC as they download, into a folder that needs nothing but the config (tracking URI and,
optionally, the remote).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmops.config import PipelineConfig, dump_config
from vlmops.errors import UserInputError
from vlmops.filenames import safe_name
from vlmops.infer.resolve import registered_version
from vlmops.redact import redact_uri
from vlmops.tracking import resolve_tracking_uri
from vlmops.versioning import DvcVersion, pull_tracked

log = logging.getLogger(__name__)

NO_DEPLOYMENT = "none"
LINEAGE_FILE = "lineage.json"
DATASET_DIR = "dataset"
MODEL_DIR = "model"


def config_hash(config: PipelineConfig) -> str:
    """sha256 of the resolved config, as the run's config.yaml holds it."""
    return hashlib.sha256(dump_config(config).encode()).hexdigest()


def version_tags(
    *,
    config: PipelineConfig,
    run: dict[str, str],
    base_model: dict[str, str | None],
    dataset_path: str,
    dataset_hash: str,
    data_version: DvcVersion | None,
    model_version: DvcVersion | None,
) -> dict[str, str]:
    """The lineage tags of a model version (see the module docstring).

    Args:
        run: the run's own tags (git_commit, prefect_flow_run_id, prefect_deployment, run_folder,
            prefect_merge_task_run_id, mlflow_run_id).
        base_model: id, revision, source and manifest_hash of the base checkpoint.
    """
    tags = {
        **run,
        **{f"base_model.{k}": v or "none" for k, v in base_model.items()},
        "config.hash": config_hash(config),
        "dataset.path": dataset_path,
        "dataset.hash": dataset_hash,
    }
    if data_version is not None:
        tags["dvc.dataset.md5"] = data_version.md5
    if model_version is not None:
        tags["dvc.model.md5"] = model_version.md5
        tags["dvc.remote"] = model_version.remote_url
    return tags


@dataclass
class PulledVersion:
    """A registered version restored from the DVC remote: where its dataset and model now are."""

    name: str
    version: str
    folder: Path
    dataset: Path
    model: Path
    dataset_md5: str
    model_md5: str
    remote: str


def dvc_remote_for(tags: dict[str, str], config: PipelineConfig) -> str:
    """The remote to pull from: the config's `versioning.remote_url` when set, else the one the version recorded (with
    any password masked: `versioning.remote_url` gives it).

    Raises:
        UserInputError: neither says where.
    """
    remote = config.versioning.remote_url or tags.get("dvc.remote")
    if not remote:
        raise UserInputError(
            "the model version does not record its DVC remote (tag dvc.remote) and versioning.remote_url is not "
            "set: set versioning.remote_url to the team's DVC remote (e.g. s3://bucket/dvc)"
        )
    return remote


def pull_version(uri: str, config: PipelineConfig, out_dir: str | os.PathLike[str] | None = None) -> PulledVersion:
    """Restore the dataset snapshot and merged model of `models:/NAME@ALIAS` (or `/VERSION`) from DVC.

    They go to `OUT/NAME-vVERSION/dataset` and `.../model` (OUT: `<run.output_dir>/pulled`), with a `.dvc`
    file each and `lineage.json` (every tag of the version). DVC hashes each file as it downloads it.

    Raises:
        ValueError: an unknown model, version or alias.
        UserInputError: the version was registered without DVC versioning; the target folder is not empty, or is
            a file.
        DvcPullError: the remote's copy is missing or damaged.
        RemoteLoginRefused: the DVC remote refused the login (a wrong password in versioning.remote_url).
        RemoteAccessRefused: the DVC remote answered 403: the login lacks access, or the copy is missing.
    """
    found = registered_version(uri, resolve_tracking_uri(config.tracking.uri))
    version = str(found.version.version)
    tags = dict(found.version.tags)
    missing = [key for key in ("dvc.dataset.md5", "dvc.model.md5") if not tags.get(key)]
    if missing:
        raise UserInputError(
            f"{uri} (version {version}) has no {' or '.join(missing)} tag: it was registered without DVC "
            "versioning (versioning.enabled: false), so there is no pushed copy to pull"
        )
    remote = dvc_remote_for(tags, config)
    root = Path(out_dir) if out_dir is not None else Path(config.run.output_dir) / "pulled"
    folder = (root / f"{safe_name(found.name)}-v{version}").resolve()
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{folder} is a file: remove it or pull into another folder (--out)")
    if folder.exists() and any(folder.iterdir()):
        raise UserInputError(f"{folder} is not empty: remove it or pull into another folder (--out)")
    log.info("pulling %s (version %s) from %s into %s", uri, version, redact_uri(remote), folder)
    dataset = pull_tracked(tags["dvc.dataset.md5"], DATASET_DIR, remote, folder)
    model = pull_tracked(tags["dvc.model.md5"], MODEL_DIR, remote, folder)
    # Masked: a version registered before vlmops masked it holds the remote's password in its tag dvc.remote.
    record: dict[str, Any] = {
        "uri": uri,
        "name": found.name,
        "version": version,
        "tags": {key: redact_uri(value) for key, value in tags.items()},
    }
    (folder / LINEAGE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return PulledVersion(
        found.name, version, folder, dataset, model, tags["dvc.dataset.md5"], tags["dvc.model.md5"], remote
    )


def dataset_snapshot(tags: dict[str, str], config: PipelineConfig, work_dir: Path) -> Path:
    """The dataset snapshot a version was trained on: the recorded folder when this machine has it (and its
    content hash still matches), else restored from the DVC remote into `work_dir/dataset`.

    Raises:
        UserInputError: neither the folder nor a DVC copy is recorded.
        DvcPullError: the remote's copy is missing or damaged.
        RemoteLoginRefused: the DVC remote refused the login (a wrong password in versioning.remote_url).
        RemoteAccessRefused: the DVC remote answered 403: the login lacks access, or the copy is missing.
    """
    from vlmops.data.prepare import snapshot_hash

    local = Path(tags.get("dataset.path", ""))
    if tags.get("dataset.path") and local.is_dir() and snapshot_hash(local) == tags.get("dataset.hash"):
        return local
    md5 = tags.get("dvc.dataset.md5")
    if not md5:
        raise UserInputError(
            f"the dataset snapshot {local} is not on this machine and the version records no DVC copy "
            "(dvc.dataset.md5): set registry.promotion.eval_file to the evaluation set"
        )
    target = work_dir / DATASET_DIR
    if target.is_dir():  # pulled before into this work folder
        return target
    return pull_tracked(md5, DATASET_DIR, dvc_remote_for(tags, config), work_dir)
