"""Team mode end to end on real servers (infra/local): what the servers hold after deploy, retrain (failed, then
retried on another worker), promote and a batch job; and that each server refuses a client without credentials."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from tests.team.conftest import MODEL_NAME, TeamRun, prefect_api

pytestmark = [pytest.mark.team, pytest.mark.integration, pytest.mark.timeout(1800)]


def _task_runs(run: TeamRun, flow_run_id: str) -> list[dict[str, Any]]:
    return prefect_api(run.stack, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})


def _artifacts(run: TeamRun, flow_run_id: str) -> list[dict[str, Any]]:
    return prefect_api(run.stack, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})


def _s3_keys(run: TeamRun, prefix: str) -> list[str]:
    pages = run.stack._s3().get_paginator("list_objects_v2").paginate(Bucket=run.stack.bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_retry_on_another_worker_reuses_the_finished_steps(team_run: TeamRun) -> None:
    stack = team_run.stack
    flow_run = prefect_api(stack, "GET", f"/flow_runs/{team_run.retrain_id}")
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    assert "gpu" in team_run.failed_attempt_log or "Failed" in team_run.failed_attempt_log
    states: dict[str, list[str]] = {}
    for task_run in _task_runs(team_run, team_run.retrain_id):
        states.setdefault(task_run["name"].rsplit("-", 1)[0], []).append(task_run["state"]["name"])
    print("task run states:", json.dumps(states, sort_keys=True))
    # The first attempt finished download and validation, then train found no GPU slot.
    assert "Failed" in states["train"] and "Completed" in states["train"], states
    # The retry, on a worker with its own PREFECT_HOME, took their results from S3.
    assert "Cached" in states["download_model"], states
    assert "Cached" in states["validate_dataset"], states
    assert team_run.retrain_id in (stack.root / "logs" / "prefect-worker-2.log").read_text()
    results = _s3_keys(team_run, "prefect-results/")
    assert results, "no Prefect results in S3"
    print(f"Prefect results in s3://{stack.bucket}/prefect-results/: {len(results)} objects")


def test_mlflow_holds_the_runs_versions_aliases_and_lineage(team_run: TeamRun, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    stack = team_run.stack
    for key, value in stack.client_env().items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert [v.version for v in versions] == ["1"], [v.version for v in versions]  # the failed attempt registered none
    version = versions[0]
    model = client.get_registered_model(MODEL_NAME)
    expected_aliases = {"challenger": "1", "champion": "1"}  # the first version is promoted: no champion before
    assert {k: v for k, v in model.aliases.items() if k in expected_aliases} == expected_aliases, model.aliases
    assert version.tags["prefect_flow_run_id"] == team_run.retrain_id
    assert version.tags["git_commit"] and version.tags["dvc.model.md5"].endswith(".dir")
    assert version.tags["prefect_deployment"] == "on-demand" and version.tags["config.hash"]
    assert version.tags["promotion.decision"] == "promoted" and version.tags["promotion.role"] == "challenger"
    parent = client.get_run(version.tags["mlflow_run_id"])  # the flow run's parent run
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect_flow_run_id"] == team_run.retrain_id
    # The failed attempt and its retry (in the same run folder, on the shared output folder) are one parent run.
    attempts = client.search_runs(
        [parent.info.experiment_id],
        f"tags.prefect_flow_run_id = '{team_run.retrain_id}' and tags.`mlflow.parentRunId` IS NULL",
    )
    assert [r.info.run_id for r in attempts] == [parent.info.run_id], [r.info.status for r in attempts]
    # Artifacts go through the server into S3; the model is the DVC pointer, its weights in the DVC remote.
    artifacts = _s3_keys(team_run, "mlflow/")
    assert any(k.endswith(f"{version.run_id}/artifacts/model/vlmops_dvc_pointer.json") for k in artifacts), artifacts
    md5 = version.tags["dvc.model.md5"]
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in _s3_keys(team_run, f"dvc/files/md5/{md5[:2]}/")
    print(f"MLflow: {MODEL_NAME} v1 aliases {dict(model.aliases)}; {len(artifacts)} artifact objects in S3")


def test_promotion_and_batch_job_on_the_servers(team_run: TeamRun) -> None:
    stack = team_run.stack
    batch = prefect_api(stack, "GET", f"/flow_runs/{team_run.batch_id}")
    assert batch["state"]["type"] == "COMPLETED" and batch["parameters"]["model"] == team_run.batch_model
    progress = [a for a in _artifacts(team_run, team_run.batch_id) if a["type"] == "progress"]
    assert progress and progress[-1]["data"] == 100.0
    promote = prefect_api(stack, "GET", f"/flow_runs/{team_run.promote_id}")
    assert promote["state"]["type"] == "COMPLETED"
    kinds = {a["type"] for a in _artifacts(team_run, team_run.promote_id)}
    assert {"markdown", "table"} <= kinds, kinds
    retrain_kinds = {a["type"] for a in _artifacts(team_run, team_run.retrain_id)}
    assert {"markdown", "table"} <= retrain_kinds, retrain_kinds
    # Every prompt answered exactly once.
    prefix = team_run.batch_output.removeprefix(f"s3://{stack.bucket}/")
    keys = _s3_keys(team_run, prefix)
    s3 = stack._s3()
    answered = [
        json.loads(line)["key"]
        for key in sorted(k for k in keys if k.rsplit("/", 1)[-1].startswith("part-"))
        for line in s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read().decode().splitlines()
    ]
    assert answered == team_run.prompt_keys
    assert f"{prefix}manifest.json" in keys
    # The alias the user named, and the one version it named when the job started (the flow pins it for its child).
    manifest = json.loads(s3.get_object(Bucket=stack.bucket, Key=f"{prefix}manifest.json")["Body"].read())
    assert manifest["model"]["uri"] == team_run.batch_model and manifest["model"]["version"] == "1", manifest["model"]
    print(f"batch job {team_run.batch_model}: {len(answered)} answers for {len(team_run.prompt_keys)} prompts")


def test_servers_refuse_clients_without_credentials(team_stack: Any) -> None:
    import psycopg2
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    stack = team_stack
    mlflow = requests.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=10
    )
    assert mlflow.status_code == 401
    prefect = requests.post(f"{stack.prefect_url}/flow_runs/filter", json={}, timeout=10)
    assert prefect.status_code == 401
    wrong = requests.post(f"{stack.prefect_url}/flow_runs/filter", json={}, auth=("admin", "wrong"), timeout=10)
    assert wrong.status_code == 401
    import boto3

    anonymous = boto3.client(
        "s3", endpoint_url=stack.s3_url, region_name="us-east-1", config=Config(signature_version=UNSIGNED)
    )
    with pytest.raises(ClientError) as refused:
        anonymous.list_objects_v2(Bucket=stack.bucket)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    for password in (None, "wrong"):
        with pytest.raises(psycopg2.OperationalError, match="password"):
            psycopg2.connect(
                host="127.0.0.1",
                port=stack.ports["postgres"],
                user=stack.settings["POSTGRES_USER"],
                dbname="mlflow",
                connect_timeout=3,
                **({"password": password} if password else {}),
            )


def test_up_again_starts_nothing(team_stack: Any) -> None:
    stack = team_stack
    pids = {p.name: p.read_text() for p in (stack.root / "pids").glob("*.pid")}
    stack.up()
    assert {p.name: p.read_text() for p in (stack.root / "pids").glob("*.pid")} == pids
    assert all(stack.status().values())


def test_no_secret_on_a_command_line(team_stack: Any) -> None:
    """Any local user can read a process's arguments (ps): the stack's servers and every process they started get
    their passwords, keys and database URIs from the environment or files, never from their arguments."""
    import psutil

    stack = team_stack
    secrets_given = [
        stack.settings[name]
        for name in (
            "POSTGRES_PASSWORD",
            "AWS_SECRET_ACCESS_KEY",
            "MLFLOW_TRACKING_PASSWORD",
            "PREFECT_API_AUTH_STRING",
        )
    ]
    servers = [psutil.Process(int(p.read_text())) for p in (stack.root / "pids").glob("*.pid")]
    processes = servers + [child for server in servers for child in server.children(recursive=True)]
    assert len(servers) >= 4
    for process in processes:
        command = " ".join(process.cmdline())
        leaked = [secret for secret in secrets_given if secret in command]
        assert not leaked, f"{process.name()} (pid {process.pid}) has a secret in its arguments: {command[:200]}"
