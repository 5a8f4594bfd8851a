"""The objects the team stack's Prefect server must hold, made on a running server; every stack runs this.

    python -m infra.server_objects [--timeout 120] [--env-file .env]

- the global concurrency limit `gpu` with `GPU_SLOTS` slots (tasks/gpu.py). Without it Prefect skips the limit with
  a warning, and two flow runs on one GPU machine train or batch-infer at once (CUDA out of memory).
- the result storage block `remote-file-system/vlmops-results` at s3://VLMOPS_BUCKET/prefect-results, which the
  workers' PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK names: without it every flow run fails at its start ("Unable to find
  block document named vlmops-results"), and with it a retry reuses the steps that finished.
- the automation `crash-zombie-flow-runs`: a flow run without a heartbeat for `VLMOPS_CRASHED_AFTER_S` is marked
  Crashed, so `prefect flow-run retry` accepts it (infra/README.md, "Zombie flow runs").

Run again at will: the limit and the block are kept when they exist (the limit's slots may have been changed on
purpose: 0 drains the pool; a value other than the settings' is reported with the command that applies it), the
automation is replaced by name (a changed window takes effect). It waits up to `--timeout` seconds for the server to
answer, then exits 1 with the address it tried.

Settings: PREFECT_API_URL and PREFECT_API_AUTH_STRING (the server and its basic auth), GPU_SLOTS, VLMOPS_BUCKET,
PREFECT_FLOWS_HEARTBEAT_FREQUENCY and VLMOPS_CRASHED_AFTER_S, from the environment, else `.env` (.env.example), else
the defaults below. infra/local/stack.py calls `ServerObjects.ensure` after it starts the server; infra/compose runs
this module as the one-shot service `prefect-setup`, infra/k8s as the Job in prefect-server-objects.yaml.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from infra.env_file import read_env_file
from vlmops.plural import counted

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.schemas.automations import AutomationCore

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_LIMIT = "gpu"
RESULTS_BLOCK = "vlmops-results"
RESULTS_BLOCK_TYPE = "remote-file-system"
ZOMBIE_AUTOMATION = "crash-zombie-flow-runs"
# Prefect refuses a shorter heartbeat period (its setting's minimum).
MIN_HEARTBEAT_S = 30
# What the objects are made from, with the defaults of .env.example (PREFECT_API_URL and the auth string have none).
DEFAULTS = {
    "VLMOPS_BUCKET": "vlmops",
    "GPU_SLOTS": "1",
    # Prefect's recipe for zombie flow runs: a heartbeat every 30 s, Crashed after 90 s without one (3 missed).
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
    "VLMOPS_CRASHED_AFTER_S": "90",
}
VARIABLES = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", *DEFAULTS)
"""Every variable this module reads: what compose's `prefect-setup` and the k8s Job must give it."""


class ServerUnavailableError(RuntimeError):
    """The Prefect server did not answer in time; the message names its address."""


def settings_errors(values: Mapping[str, str]) -> list[str]:
    """What is wrong with the settings of the objects (GPU_SLOTS, VLMOPS_BUCKET, the heartbeat period and the window),
    one message per problem: the heartbeat period is whole seconds, at least Prefect's minimum, and the window without
    one is longer, or the automation would mark healthy runs Crashed between two heartbeats."""
    errors = []
    slots = values["GPU_SLOTS"]
    if not slots.isdigit():
        errors.append(f"GPU_SLOTS={slots!r}: must be a whole number of slots (0 drains the pool)")
    if not values["VLMOPS_BUCKET"]:
        errors.append("VLMOPS_BUCKET is empty: the bucket of the stack's S3 (.env.example: vlmops)")
    numbers = {}
    for key in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "VLMOPS_CRASHED_AFTER_S"):
        try:
            numbers[key] = int(values[key])
        except ValueError:
            errors.append(f"{key}={values[key]!r}: must be a whole number of seconds")
    if len(numbers) < 2:
        return errors
    heartbeat, window = numbers["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"], numbers["VLMOPS_CRASHED_AFTER_S"]
    if heartbeat < MIN_HEARTBEAT_S:
        errors.append(f"PREFECT_FLOWS_HEARTBEAT_FREQUENCY={heartbeat}: Prefect's minimum is {MIN_HEARTBEAT_S} s")
    elif window <= heartbeat:
        errors.append(
            f"VLMOPS_CRASHED_AFTER_S={window} must exceed PREFECT_FLOWS_HEARTBEAT_FREQUENCY={heartbeat}: a run is "
            f"marked Crashed after that long without a heartbeat (Prefect's recipe: 3 heartbeats, {3 * heartbeat})"
        )
    return errors


@dataclass(frozen=True)
class ServerObjects:
    """The limit, block and automation one Prefect server should hold, and where that server is."""

    api_url: str
    auth_string: str | None
    gpu_slots: int
    bucket: str
    crashed_after_s: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServerObjects:
        """From the variables of `VARIABLES` in `env` (the defaults for those not set).

        Raises:
            ValueError: every setting that is missing or wrong, at once, each by its variable.
        """
        values = {**DEFAULTS, **{k: v for k, v in env.items() if k in VARIABLES}}
        errors = settings_errors(values)
        api_url = values.get("PREFECT_API_URL", "").rstrip("/")
        if not api_url:
            errors.append("PREFECT_API_URL is not set: the Prefect server's API, e.g. http://127.0.0.1:4200/api")
        auth_string = values.get("PREFECT_API_AUTH_STRING") or None
        if auth_string is not None and ":" not in auth_string:
            errors.append("PREFECT_API_AUTH_STRING must be USER:PASSWORD (basic auth of the Prefect server)")
        if errors:
            raise ValueError("; ".join(errors))
        return cls(
            api_url=api_url,
            auth_string=auth_string,
            gpu_slots=int(values["GPU_SLOTS"]),
            bucket=values["VLMOPS_BUCKET"],
            crashed_after_s=int(values["VLMOPS_CRASHED_AFTER_S"]),
        )

    @property
    def results_path(self) -> str:
        return f"s3://{self.bucket}/prefect-results"

    def wait(self, timeout: float) -> None:
        """Return once the server answers an authenticated request; poll every second for up to `timeout` seconds.

        Raises:
            ServerUnavailableError: no answer in time (the message has the last error).
            ValueError: the server refuses PREFECT_API_AUTH_STRING (waiting would not change that).
        """
        headers = {}
        if self.auth_string is not None:
            headers["Authorization"] = f"Basic {base64.b64encode(self.auth_string.encode()).decode()}"
        url = f"{self.api_url}/admin/version"
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = requests.get(url, headers=headers, timeout=max(1.0, min(10.0, deadline - time.monotonic())))
            except requests.RequestException as err:
                last = str(err)
            else:
                if response.status_code == 200:
                    return
                if response.status_code == 401:
                    raise ValueError(
                        f"the Prefect server at {self.api_url} refuses PREFECT_API_AUTH_STRING (401 Unauthorized): "
                        "set it to the server's PREFECT_SERVER_API_AUTH_STRING (USER:PASSWORD)"
                    )
                last = f"{response.status_code} {response.reason} from {url}"
            if time.monotonic() >= deadline:
                raise ServerUnavailableError(
                    f"the Prefect server at {self.api_url} did not answer in {timeout:g} s (last: {last}): start it, "
                    "or point PREFECT_API_URL at it, then run `python -m infra.server_objects` again"
                )
            time.sleep(1.0)

    def ensure(self) -> list[str]:
        """Make what is missing, replace the automation; one line per object says what was done."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        updates: dict[Any, Any] = {PREFECT_API_URL: self.api_url}
        if self.auth_string is not None:
            updates[PREFECT_API_AUTH_STRING] = self.auth_string
        with temporary_settings(updates), get_client(sync_client=True) as client:
            return [
                self._ensure_gpu_limit(client),
                self._ensure_results_block(client),
                save_automation(client, zombie_automation(self.crashed_after_s)),
            ]

    def _ensure_gpu_limit(self, client: SyncPrefectClient) -> str:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.exceptions import ObjectNotFound

        try:
            found = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=self.gpu_slots))
            return f"concurrency limit {GPU_LIMIT}: created, {counted(self.gpu_slots, 'slot')}"
        kept = f"concurrency limit {GPU_LIMIT}: kept, {counted(found.limit, 'slot')}"
        if found.limit == self.gpu_slots:
            return kept
        return (
            f"{kept}, not GPU_SLOTS={self.gpu_slots} (0 drains the pool: keep it, or apply GPU_SLOTS with "
            f"`prefect gcl update {GPU_LIMIT} --limit {self.gpu_slots}`)"
        )

    def _ensure_results_block(self, client: SyncPrefectClient) -> str:
        from prefect.exceptions import ObjectNotFound
        from prefect.filesystems import RemoteFileSystem

        name = f"{RESULTS_BLOCK_TYPE}/{RESULTS_BLOCK}"
        try:
            found = client.read_block_document_by_name(RESULTS_BLOCK, RESULTS_BLOCK_TYPE)
        except ObjectNotFound:
            # No credentials in the block: every worker reads its own AWS_* environment (s3fs, like boto3).
            RemoteFileSystem(basepath=self.results_path).save(RESULTS_BLOCK)
            return f"result storage block {name}: created, {self.results_path}"
        basepath = found.data.get("basepath")
        if basepath == self.results_path:
            return f"result storage block {name}: kept, {basepath}"
        return (
            f"result storage block {name}: kept, {basepath}, not {self.results_path} of VLMOPS_BUCKET (to move the "
            f"results, `prefect block delete {name}` and run this again)"
        )


def zombie_automation(crashed_after_s: int) -> AutomationCore:
    """Prefect's automation for zombie flow runs (its guide "Detect zombie flows"): after each heartbeat of a flow run,
    expect another, or the run's end, within `crashed_after_s`; when neither comes, mark the run Crashed."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    ended = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="A Running flow run whose heartbeats stopped (its process or machine died, or it lost the API) is "
        "marked Crashed, so that `prefect flow-run retry` accepts it (infra/server_objects.py).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *ended},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crashed_after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {crashed_after_s} s: its process died or lost the API "
                f"(automation {ZOMBIE_AUTOMATION})",
            )
        ],
    )


def save_automation(client: SyncPrefectClient, automation: AutomationCore) -> str:
    """Create the automation, or replace the one of the same name (so a changed window takes effect)."""
    found = client.read_automations_by_name(automation.name)
    if found:
        client.update_automation(found[0].id, automation)
        return f"automation {automation.name}: replaced"
    client.create_automation(automation)
    return f"automation {automation.name}: created"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.server_objects", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the server to answer (default 120)"
    )
    parser.add_argument(
        "--env-file", type=Path, default=None, help="default: .env in the repository, if any; the environment wins"
    )
    args = parser.parse_args(argv)
    try:
        if args.env_file is not None and not args.env_file.is_file():
            raise ValueError(f"--env-file {args.env_file}: no such file")
        values = {**read_env_file(args.env_file or REPO_ROOT / ".env"), **os.environ}
        objects = ServerObjects.from_env(values)
        objects.wait(args.timeout)
        done = objects.ensure()
    except (ValueError, ServerUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for line in done:
        print(line)
    print(f"the Prefect server at {objects.api_url} holds the team stack's objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
