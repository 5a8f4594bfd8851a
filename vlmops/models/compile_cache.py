"""Where torch.compile keeps what it compiled (`model.compile_cache`), so that a later process skips the compiling.

torch.compile's on-disk caches (inductor's generated code and FX graphs, AOTAutograd's graphs, the Triton kernels and
their autotuning results) live under one folder, `TORCHINDUCTOR_CACHE_DIR`, by default `/tmp/torchinductor_<user>`:
gone with a fresh machine or container, so every batch job on a new GPU worker compiled the fast engine's towers and
decode step again (the 7b's first shard spent ~77 s compiling and capturing with that cache empty, ~25 s with it
filled: bench/RESULTS.md session 20). Pointed at a lasting folder (a persistent volume, as `model.cache_dir`), the
next job finds them. Entries are keyed by torch, Triton and the GPU, so one folder can serve several kinds of machine;
each is written aside and then renamed, so a crash leaves none half-written.

The variable is read each time torch looks a cache entry up; this sets it before the model is loaded, so before
anything compiles. A `TORCHINDUCTOR_CACHE_DIR` the user set wins.

GPU workers that each start on a fresh machine share one cache through `model.shared_compile_cache` (an s3:// prefix
or a folder): `SharedCompileCache` loads torch's portable artifacts from it before anything compiles and, after a
shard, writes back what this process compiled beyond them (torch.compiler.save_cache_artifacts /
load_cache_artifacts), one file per torch version and device kind.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from vlmops.config import StorageConfig
from vlmops.staging import write_bytes_atomic
from vlmops.storage import parse_s3_uri, read_object, s3_client

log = logging.getLogger(__name__)

ENV = "TORCHINDUCTOR_CACHE_DIR"


def users_compile_cache() -> Path | None:
    """The folder the user set in `TORCHINDUCTOR_CACHE_DIR`, if any. torch writes its own default into the variable
    the first time it looks (some versions on `import torch._dynamo`): that value is not the user's choice."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get(ENV)
    if not current or Path(current).resolve() == Path(default_cache_dir()).resolve():
        return None
    return Path(current)


def use_compile_cache(folder: str | os.PathLike[str] | None) -> Path | None:
    """Keep torch.compile's caches under `folder` (None or "": torch's default); the folder in use, if known."""
    users = users_compile_cache()
    if users is not None:
        if folder:
            log.debug("%s=%s is set: torch.compile's caches stay there, not in %s", ENV, users, folder)
        return users
    if not folder:
        return None
    path = Path(folder).expanduser().resolve()
    if os.environ.get(ENV) == str(path):  # set by an earlier load in this process
        return path
    os.environ[ENV] = str(path)  # torch makes the folder when it first compiles: a CPU job leaves none behind
    log.info("torch.compile's caches: %s", path)
    return path


def describe_compile_cache() -> str:
    """Where torch.compile caches now and how much it holds, for a log line: "/path (empty)", "/path (51 MB)"."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = Path(os.environ.get(ENV) or default_cache_dir())
    held = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
    return f"{folder} ({held / 1e6:.0f} MB)" if held else f"{folder} (empty)"


class SharedCompileCache:
    """torch.compile's artifacts in one file under an s3:// prefix or a folder, shared by the machines of a fleet.

    `publish=False` only fetches: the processes of one machine (`infer.workers`) compile the same kernels, so one of
    them writes the file rather than each overwriting the others' copy."""

    def __init__(
        self,
        uri: str,
        storage: StorageConfig | None = None,
        device: torch.device | None = None,
        *,
        publish: bool = True,
    ):
        self.uri = f"{uri.rstrip('/')}/{artifacts_name(device or torch.device('cpu'))}"
        self.storage = storage
        self.publish = publish
        self._compiled = compiled_graphs()

    def fetch(self) -> bool:
        """Load the shared artifacts into this process's caches; False where there are none yet."""
        try:
            blob = self._read()
        except unreachable() as err:  # a cache: the job runs without it, compiling, and says why
            log.warning("shared compile cache %s could not be read (%s): compiling without it", self.uri, err)
            return False
        if blob is None:
            log.info("shared compile cache %s: nothing yet (this job's first shard publishes it)", self.uri)
            return False
        try:
            info = torch.compiler.load_cache_artifacts(blob)
        except Exception as err:  # torch's unpickling of another version's or a damaged file: any error type
            info, reason = None, str(err)
        else:  # torch itself logs why it refused a file (a damaged one, say) and returns None
            reason = "torch refused it: see its warning above"
        if info is None:
            log.warning("shared compile cache %s could not be loaded (%s): compiling without it", self.uri, reason)
            return False
        entries = sum(len(keys) for keys in info.artifacts.values())
        log.info("shared compile cache %s: %d entries loaded (%.0f MB)", self.uri, entries, len(blob) / 1e6)
        self._compiled = compiled_graphs()
        return True

    def publish_new(self) -> bool:
        """Write this process's artifacts back if it compiled anything since the last fetch or publish (and it
        publishes)."""
        if not self.publish or compiled_graphs() == self._compiled:
            return False
        saved = torch.compiler.save_cache_artifacts()
        self._compiled = compiled_graphs()
        if saved is None:
            return False
        blob = saved[0]
        try:
            self._write(blob)
        except unreachable() as err:
            log.warning("shared compile cache %s could not be written (%s): the next job compiles again", self.uri, err)
            return False
        log.info("shared compile cache %s: published (%.0f MB)", self.uri, len(blob) / 1e6)
        return True

    def _read(self) -> bytes | None:
        if not self.uri.startswith("s3://"):
            path = Path(self.uri).expanduser()
            return path.read_bytes() if path.is_file() else None
        try:
            return read_object(self.uri, self.storage)
        except s3_client(self.storage).exceptions.NoSuchKey:  # one client per setting: the one read_object used
            return None

    def _write(self, blob: bytes) -> None:
        if not self.uri.startswith("s3://"):
            path = Path(self.uri).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, blob)
            return
        bucket, key = parse_s3_uri(self.uri)
        s3_client(self.storage).put_object(Bucket=bucket, Key=key, Body=blob)  # one PUT: whole or absent


def artifacts_name(device: torch.device) -> str:
    """The shared file's name: artifacts compiled by one torch version for one kind of device load only there."""
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", f"torch-{torch.__version__}-{kind}") + ".bin"


def compiled_graphs() -> int:
    """How many graphs inductor compiled in this process (not found in a cache)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])


def unreachable() -> tuple[type[Exception], ...]:
    """What reading or writing the shared file raises when storage is unreachable or refuses (the disk's, boto's)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (OSError, BotoCoreError, ClientError)
