"""Two whole retrain runs at once, as two `vlmops run` processes started together on the embedded default.

They share everything a team's machine shares: `run.output_dir` (the tiny model built there, the demo data, the
DVC repository and its remote), one MLflow SQLite store and one PREFECT_HOME (its SQLite database and result
storage). Training and evaluation are cut to the minimum that still runs every step. The assertions read what
the two runs left behind: two complete registered versions, a healthy DVC repository, finished MLflow runs, and
run folders that hold only their own run's files.

Secrets never leave the process: the runs have known credentials in their environment and a password inside a
config URI, and every file they wrote (run folders, MLflow store and artifacts, DVC repository and remote, Prefect's
database and results) and everything they printed is scanned for them. Ordinary output has no third-party warnings
either (`vlmops run` is an ordinary command).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from filelock import FileLock
from mlflow.tracking import MlflowClient

from tests.test_quiet import _noise
from vlmops.hashing import sha256_file
from vlmops.staging import STAGING_PREFIX
from vlmops.versioning import POINTER_FILE, cache_object_path, checkout_pointer, read_dvc_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MODEL = "vlmops-demo"
STEPS = {"download_model", "validate_dataset", "train", "merge", "batch_infer", "evaluate", "register"}
NUM_EVAL = 4
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAVLMOPSTESTKEY01",
    "AWS_SECRET_ACCESS_KEY": "vlmops-test-s3-secret-02",
    "HF_TOKEN": "hf_vlmopsTestHubToken03",
    "MODELSCOPE_API_TOKEN": "ms-vlmops-test-token-04",
    "PGPASSWORD": "vlmops-test-db-password-05",
    "MLFLOW_TRACKING_PASSWORD": "vlmops-test-basic-auth-06",
}
URI_PASSWORD = "vlmops-test-uri-password-07"


@dataclass(frozen=True)
class Runs:
    work: Path
    """The runs' working folder: everything they wrote is under it."""
    config: Path
    outputs: Path
    tracking_uri: str
    summaries: list[dict]
    logs: list[str]
    """What each process printed (stdout and stderr)."""


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    tmp = tmp_path_factory.mktemp("concurrent")
    outputs = tmp / "outputs"
    tracking_uri = f"sqlite:///{outputs}/mlflow.db"
    config = tmp / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "pipeline.yaml"),
                "run": {"output_dir": str(outputs)},
                "model": {"cache_dir": f"{outputs}/cache"},
                # every step runs, on as little work as it takes
                "data": {"demo": {"num_train": 8, "num_eval": NUM_EVAL}},
                "train": {"max_steps": 2},
                "eval": {"evaluate_base": False},
                "infer": {"max_new_tokens": 2},
                "tracking": {"uri": tracking_uri},
                # Not contacted by this flow (no s3:// path), but logged with the config like any other key.
                "storage": {"endpoint_url": f"http://vlmops:{URI_PASSWORD}@127.0.0.1:9"},
            }
        )
    )
    # A user's shell: no Prefect or MLflow server, and not pytest's variables (MLflow checks its sessions harder
    # when PYTEST_CURRENT_TEST is set).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_", "PYTEST_"))}
    env |= {
        "PYTHONPATH": str(ROOT),
        # One Prefect home for both: its SQLite database and result storage are shared, as on a user's machine.
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
        **SECRETS,
    }
    command = [sys.executable, "-m", "vlmops.cli", "run", "--config", str(config)]
    logs = [tmp / f"run-{i}.log" for i in range(2)]
    with ExitStack() as stack:
        outs = [stack.enter_context(log.open("wb")) for log in logs]
        processes = [subprocess.Popen(command, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT) for out in outs]
        for process in processes:  # a run that hangs must not outlive the test
            stack.callback(_stop, process)
        codes = [p.wait(timeout=840) for p in processes]
    texts = [log.read_text(errors="replace") for log in logs]
    for code, text in zip(codes, texts, strict=True):
        assert code == 0, text[-6000:]
    summaries = [json.loads(Path(_summary_file(text)).read_text()) for text in texts]
    return Runs(tmp, config, outputs, tracking_uri, summaries, texts)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def _summary_file(stdout: str) -> str:
    lines = [line.split(None, 1)[1] for line in stdout.splitlines() if line.strip().startswith("summary ")]
    assert lines, stdout[-3000:]
    return lines[-1].strip()


def _client(runs: Runs) -> MlflowClient:
    return MlflowClient(tracking_uri=runs.tracking_uri, registry_uri=runs.tracking_uri)


def _steps(client: MlflowClient, parent_id: str) -> dict[str, object]:
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.info.run_name: r for r in children}


def test_two_versions_each_complete_with_distinct_runs(two_runs: Runs, tmp_path: Path) -> None:
    client = _client(two_runs)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert sorted(s["model_version"] for s in two_runs.summaries) == ["1", "2"]
    assert len({v.run_id for v in versions}) == 2
    for summary in two_runs.summaries:
        version = client.get_model_version(MODEL, summary["model_version"])
        register_step = _steps(client, summary["mlflow_run_id"])["register"]
        assert version.run_id == register_step.info.run_id  # type: ignore[attr-defined]
        assert version.tags["mlflow_run_id"] == summary["mlflow_run_id"]
        assert version.tags["dvc.model.md5"] == summary["model_dvc_md5"]
        # The version's artifact is a DVC pointer; it restores exactly the run's merged model.
        assert [a.path for a in client.list_artifacts(version.run_id, "model")] == [f"model/{POINTER_FILE}"]
        pointer = Path(client.download_artifacts(version.run_id, f"model/{POINTER_FILE}", str(tmp_path / "ptr")))
        restored = checkout_pointer(pointer, tmp_path / f"v{version.version}")
        merged = Path(summary["run_dir"]) / "merged"
        files = sorted(p.relative_to(merged).as_posix() for p in merged.rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(restored).as_posix() for p in restored.rglob("*") if p.is_file())
        assert all(sha256_file(merged / f) == sha256_file(restored / f) for f in files)


def test_the_challenger_alias_names_the_newest_version(two_runs: Runs) -> None:
    client = _client(two_runs)
    aliases = client.get_registered_model(MODEL).aliases
    # auto_promote is off: no champion; the newest version is the challenger, whichever run set the alias last.
    assert aliases == {"challenger": 2}
    by_version = {s["model_version"]: s for s in two_runs.summaries}
    assert by_version["2"]["model_alias"] == by_version["1"]["model_alias"] == "challenger"
    assert by_version["2"]["alias_version"] == "2"
    # The older run says where the alias went if the newer one took it before it finished.
    assert by_version["1"]["alias_version"] in ("1", "2")


def test_mlflow_runs_finished_with_their_metrics(two_runs: Runs) -> None:
    client = _client(two_runs)
    parents = [s["mlflow_run_id"] for s in two_runs.summaries]
    assert len(set(parents)) == 2
    for summary in two_runs.summaries:
        parent = client.get_run(summary["mlflow_run_id"])
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["finetuned_accuracy"] == summary["finetuned_accuracy"]
        steps = _steps(client, parent.info.run_id)
        assert set(steps) == STEPS
        assert all(r.info.status == "FINISHED" for r in steps.values())  # type: ignore[attr-defined]
        assert len(client.get_metric_history(steps["train"].info.run_id, "loss")) == 2  # type: ignore[attr-defined]
    experiments = client.search_experiments()
    assert [e.name for e in experiments if e.name != "Default"] == ["vlmops-demo"]


def test_dvc_repository_is_healthy(two_runs: Runs) -> None:
    from dvc.repo import Repo

    outputs = two_runs.outputs
    remote = outputs / "dvc-remote"
    dvc_files = sorted(outputs.rglob("*.dvc"))
    dataset_files = [f for f in dvc_files if f.parent.name == "datasets"]
    model_files = [f for f in dvc_files if f.name == "merged.dvc"]
    assert len(dataset_files) == 1  # the same snapshot for both
    assert len(model_files) == 2
    assert {read_dvc_file(f).md5 for f in model_files} == {s["model_dvc_md5"] for s in two_runs.summaries}
    repo = Repo(str(outputs))
    try:
        assert repo.status() == {}
        assert repo.status(cloud=True) == {}
    finally:
        repo.close()
    # every object of every tracked folder is in the cache and the remote
    for dvc_file in dataset_files + model_files:
        md5 = read_dvc_file(dvc_file).md5
        listing = json.loads(cache_object_path(outputs / ".dvc" / "cache", md5).read_text())
        for md5_of in [md5, *(entry["md5"] for entry in listing)]:
            assert cache_object_path(outputs / ".dvc" / "cache", md5_of).is_file(), (dvc_file, md5_of)
            assert cache_object_path(remote, md5_of).is_file(), (dvc_file, md5_of)
    # nothing half-written
    assert [p for p in outputs.rglob("*") if p.name.startswith(STAGING_PREFIX) or p.name.endswith(".tmp")] == []
    # nothing still locked: DVC's repository lock, its read/write lock table, and the file locks beside the
    # repository, the MLflow store and the shared folders (lock files stay on disk; none may be held)
    locks = [*outputs.rglob("*lock"), *outputs.parent.glob(".*.lock")]
    assert outputs / ".dvc" / "tmp" / "lock" in locks
    assert outputs.parent / f".{outputs.name}.dvc.lock" in locks
    for lock in locks:
        if lock.name == "rwlock":
            assert not any(json.loads(lock.read_text() or "{}").values()), lock.read_text()
        else:
            with FileLock(str(lock), timeout=0):
                pass


def test_each_run_folder_holds_only_its_own_run(two_runs: Runs) -> None:
    run_dirs = [Path(s["run_dir"]) for s in two_runs.summaries]
    assert len(set(run_dirs)) == 2
    assert sorted(p.name for p in (two_runs.outputs / "runs").iterdir()) == sorted(d.name for d in run_dirs)
    client = _client(two_runs)
    for summary, run_dir in zip(two_runs.summaries, run_dirs, strict=True):
        assert sorted(p.name for p in run_dir.iterdir()) == [
            "config.yaml",
            "eval",
            "merged",
            "merged.dvc",
            "merged.log",
            "prefect_flow_run_id",
            "summary.json",
            "train",
        ]
        assert json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"] == summary["mlflow_run_id"]
        assert read_dvc_file(run_dir / "merged.dvc").md5 == summary["model_dvc_md5"]
        predictions = (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == NUM_EVAL
        # the parent run's name carries the run folder's id
        assert client.get_run(summary["mlflow_run_id"]).info.run_name == f"demo-{run_dir.name}"


def test_the_runs_write_no_secret_anywhere(two_runs: Runs) -> None:
    for text in two_runs.logs:
        assert "vlmops retrain: done" in text
        assert not _noise(text), "\n".join(_noise(text))
    secrets = [*SECRETS.values(), URI_PASSWORD]
    found = [f"output: {s}" for s in secrets for text in two_runs.logs if s in text]
    scanned = 0
    for path in two_runs.work.rglob("*"):
        if not path.is_file() or path == two_runs.config:  # the user's own config holds the URI password, as given
            continue
        data = path.read_bytes()
        scanned += 1
        found += [f"{path.relative_to(two_runs.work)}: {s}" for s in secrets if s.encode() in data]
    assert scanned > 50 and (two_runs.work / "prefect-home" / "prefect.db").is_file()
    assert not found, "\n".join(found)
    for summary in two_runs.summaries:
        saved = yaml.safe_load((Path(summary["run_dir"]) / "config.yaml").read_text())
        assert saved["storage"]["endpoint_url"] == "http://vlmops:***@127.0.0.1:9"
