"""A kill in the middle of a DVC push or an MLflow artifact upload: the rerun completes, the remote holds only
whole objects, and no registered model version ever points at incomplete artifacts (a version is created only
after its upload is checked)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vlmops.config import TrackingConfig
from vlmops.tracking import Tracker
from vlmops.versioning import DvcStore

ROOT = Path(__file__).resolve().parents[1]
FILES = 300
FILE_BYTES = 256 * 1024


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    for i in range(FILES):
        (path / f"shard-{i:04d}.safetensors").write_bytes(os.urandom(FILE_BYTES))
    return path


def _kill_when(command: str, started, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Run `command` (Python) in a child and SIGKILL it as soon as `started()` is true."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "child.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", command], stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        try:
            while not started():
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"the upload ended (exit {proc.returncode}) before the kill:\n{log.read_text()[-3000:]}"
                    )
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()


def _stored_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_a_kill_during_an_mlflow_upload_never_leaves_a_version_without_its_artifacts(tmp_path: Path) -> None:
    config = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="crash")
    artifacts = tmp_path / "mlartifacts"
    tracker = Tracker(config, artifact_root=artifacts)
    run_id = tracker.start_run("register")
    model = _folder(tmp_path / "merged")

    command = (
        "from pathlib import Path\n"
        "from vlmops.config import TrackingConfig\n"
        "from vlmops.tracking import Tracker\n"
        f"t = Tracker(TrackingConfig(uri={config.uri!r}, experiment='crash'), artifact_root=Path({str(artifacts)!r}))\n"
        f"t.register_model({run_id!r}, Path({str(model)!r}), 'crash-model', 'challenger')\n"
    )
    _kill_when(command, lambda: bool(_stored_files(artifacts)), tmp_path)
    client = MlflowClient(tracking_uri=tracker.uri, registry_uri=tracker.uri)
    assert 0 < len(_stored_files(artifacts)) < FILES, "the kill should land mid-upload"
    assert client.search_model_versions("name = 'crash-model'") == []  # nothing registered over a partial upload

    version = tracker.register_model(run_id, model, "crash-model", "challenger")  # the task's retry, or a rerun
    assert version.version == "1"
    for v in client.search_model_versions("name = 'crash-model'"):
        stored = {a.path: a.file_size for a in client.list_artifacts(v.run_id, "model")}
        assert stored == {f"model/{p.name}": p.stat().st_size for p in model.iterdir()}
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST|not found"):
        client.get_model_version("crash-model", "2")


def test_a_kill_during_a_dvc_push_then_the_rerun_completes_with_whole_objects(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    model = _folder(workspace / "merged")
    remote = tmp_path / "remote"
    command = (
        "from vlmops.versioning import DvcStore\n"
        f"DvcStore({str(workspace)!r}, 'local', {str(remote)!r}).track({str(model)!r})\n"
    )
    _kill_when(command, lambda: bool(_stored_files(remote / "files")), tmp_path)
    assert len(_stored_files(remote / "files")) < FILES + 1, "the kill should land mid-push"

    version = DvcStore(workspace, "local", str(remote)).track(model)  # checks the remote has every object
    stored = _stored_files(remote / "files")
    objects = [p for p in stored if len(p.name) == 30 and not p.name.startswith(".")]
    assert len(objects) == FILES and version.nfiles == FILES
    for obj in objects:  # a DVC object is named by its md5: none was left half-written by the kill
        assert hashlib.md5(obj.read_bytes()).hexdigest() == obj.parent.name + obj.name
    # What the kill interrupted is a hidden temporary file (DVC writes aside, then renames): never an object.
    leftovers = [p.name for p in stored if p not in objects and not p.name.endswith(".dir")]
    assert all(name.startswith(".") and name.endswith(".tmp") for name in leftovers), leftovers
