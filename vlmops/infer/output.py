"""Where a batch inference job writes: a local folder or an `s3://` prefix, with files that appear whole.

A file is written to a local temporary file first and then published in one step: a rename in the same
folder (local), or one PUT (S3 makes an object visible only once its upload completes). A reader, or a
rerun deciding what is done, never sees half a file.

A run killed while it writes a file leaves the temporary file. A local output's are in `_job/tmp/`, where several runs
of one job may write at once (two commands by mistake, a distributed job's task workers on a shared folder), so a run
removes only those no live process writes (`LocalOutput.sweep`): each writer holds a lock on its file (flock) while it
writes it, which the kernel drops when the process ends, however it ends. On S3 the files are written in a scratch
folder of the process's own, removed with it (`close`); a part of more than 8 MiB is PUT in parts (boto3's multipart
upload), and one killed outright leaves the parts sent so far on the server, out of sight of every listing, until they
are aborted (a bucket lifecycle rule `AbortIncompleteMultipartUpload`); one stopped in order (Ctrl-C, SIGTERM) is
aborted by boto3 as it stops.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from vlmops.config import StorageConfig
from vlmops.errors import UserInputError
from vlmops.staging import publish_file

TMP_DIR = "_job/tmp"
JOB_FILE = "_job/job.json"
"""A batch job's identity file, under its output: a folder that holds one is a job's output, not input."""

FOREIGN_TMP_STALE_S = 24 * 3600.0
"""A temporary file another machine wrote (or a vlmops before the locks) counts as a stopped run's once it has not
changed for this long: its writer's lock cannot be seen from here, and a file is written in seconds, then renamed."""


def _this_kernel() -> str:
    """The running kernel's boot id (its first 12 hex digits), which a temporary file's name carries: the processes of
    one kernel see each other's file locks (the containers of one machine too), others may not (a folder on NFS)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
    except OSError:  # not Linux: every file is judged by its age
        return ""


KERNEL = _this_kernel()
_TMP_NAME = re.compile(r"\.(?P<name>.+?)\.(?:(?P<kernel>[0-9a-f]{12})\.)?[0-9a-f]{32}\.tmp")


class JobOutput(Protocol):
    uri: str

    def read_text(self, name: str) -> str | None:
        """The file's text, or None when it does not exist."""
        ...

    def names(self, prefix: str) -> list[str]:
        """Names (relative to the output root) of the files whose name starts with `prefix`."""
        ...

    def modified(self, prefix: str) -> dict[str, float]:
        """When each file whose name starts with `prefix` was written (seconds since the epoch), by name."""
        ...

    def publish(self, local: Path, name: str) -> None:
        """Make the finished local file `local` appear as `name` at once (it is consumed)."""
        ...

    def local_path(self, name: str) -> Path | None:
        """The file on this machine, for outputs that live here; None on S3."""
        ...

    def scratch(self) -> Path:
        """A local folder for files being written (same file system as the output when local)."""
        ...

    def sweep(self) -> list[str]:
        """Remove the temporary files that runs stopped while writing left in the scratch folder, none that a live
        process writes; return their names."""
        ...

    def close(self) -> None:
        """Remove this output's scratch folder where it is its own (S3), with what a stopped write left in it."""
        ...


class LocalOutput:
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.uri = str(self.root)

    def read_text(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def names(self, prefix: str) -> list[str]:
        return sorted(name for name, _ in self._files(prefix))

    def modified(self, prefix: str) -> dict[str, float]:
        found = {}
        for name, path in self._files(prefix):
            try:
                found[name] = path.stat().st_mtime
            except FileNotFoundError:  # removed since it was listed
                continue
        return found

    def _files(self, prefix: str) -> Iterator[tuple[str, Path]]:
        folder, _, start = prefix.rpartition("/")
        base = self.root / folder
        if not base.is_dir():
            return
        for path in base.iterdir():
            if path.is_file() and path.name.startswith(start):
                yield (f"{folder}/{path.name}" if folder else path.name), path

    def publish(self, local: Path, name: str) -> None:
        final = self.root / name
        final.parent.mkdir(parents=True, exist_ok=True)
        publish_file(local, final)

    def local_path(self, name: str) -> Path | None:
        return self.root / name

    def scratch(self) -> Path:
        folder = self.root / TMP_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def sweep(self) -> list[str]:
        folder = self.root / TMP_DIR
        if not folder.is_dir():
            return []
        return [path.name for path in sorted(folder.iterdir()) if _removed_if_abandoned(path)]

    def close(self) -> None:
        """Nothing: the scratch folder, `_job/tmp`, is the output's, shared by its writers."""


class S3Output:
    def __init__(self, uri: str, storage: StorageConfig | None):
        from vlmops.storage import parse_s3_uri, s3_client

        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = s3_client(storage)
        self._scratch: Path | None = None  # made when a file is first written: a reader leaves no empty folder
        self._removal: weakref.finalize[..., S3Output] | None = None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read_text(self, name: str) -> str | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
        except self.client.exceptions.NoSuchKey:
            return None
        return bytes(body.read()).decode("utf-8")

    def names(self, prefix: str) -> list[str]:
        return sorted(self.modified(prefix))

    def modified(self, prefix: str) -> dict[str, float]:
        from vlmops.storage import list_objects

        root = f"{self.prefix}/" if self.prefix else ""
        found = {o.key[len(root) :]: o.modified for o in list_objects(self.client, self.bucket, self.prefix)}
        return {name: when for name, when in found.items() if name.startswith(prefix)}

    def publish(self, local: Path, name: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(name))
        local.unlink()

    def local_path(self, name: str) -> Path | None:
        return None

    def scratch(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="vlmops-job-"))
            # Removed with this output, at exit, or by `close`: a worker that runs job after job kept a folder for each.
            self._removal = weakref.finalize(self, shutil.rmtree, self._scratch, ignore_errors=True)
        return self._scratch

    def sweep(self) -> list[str]:
        """Nothing: the scratch folder is this process's own and new."""
        return []

    def close(self) -> None:
        if self._removal is not None:
            self._removal()  # a finalizer runs once: not again with this output or at exit
            self._scratch = self._removal = None  # a file written after this makes another


def open_output(uri: str, storage: StorageConfig | None = None) -> JobOutput:
    """The output at `uri`: an `s3://` prefix or a local folder (made when the first file is written there: reading
    where nothing is, `vlmops batch-status TYPO` say, leaves nothing behind).

    Raises:
        UserInputError: `uri` names a file.
    """
    if uri.startswith("s3://"):
        return S3Output(uri, storage)
    root = Path(uri).expanduser()
    if root.exists() and not root.is_dir():
        raise UserInputError(f"output {uri} is a file; pass a folder (or an s3:// prefix) for the job to fill")
    return LocalOutput(root)


@contextmanager
def written_file(output: JobOutput, name: str) -> Iterator[Path]:
    """A scratch file to write; published as `name` when the block succeeds, removed when it raises. This process
    holds a lock on it meanwhile (`LocalOutput.sweep` leaves it)."""
    while True:
        kernel = f"{KERNEL}." if KERNEL else ""
        path = output.scratch() / f".{Path(name).name}.{kernel}{uuid.uuid4().hex}.tmp"
        # Created with the umask's mode, as every other file vlmops writes: mkstemp's 0600 left a job's results
        # unreadable to the rest of a team on a shared disk. O_EXCL: never another writer's file.
        held = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            fcntl.flock(held, fcntl.LOCK_EX)  # waits while a sweep looks at it
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                os.close(held)
                raise
        if os.fstat(held).st_nlink:
            break
        os.close(held)  # swept between its creation and the lock: under another name
    try:
        yield path
        output.publish(path, name)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(held)


_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
"""flock's errors on a file system without locks: files are written there without one, and never swept."""


def _removed_if_abandoned(path: Path) -> bool:
    """Remove the temporary file `path` if no live process writes it: its lock is free (a file of this kernel's
    writers), or it has not changed for FOREIGN_TMP_STALE_S (another machine's, or an older vlmops's). The lock is
    held while the file is removed: a writer that created it a moment ago finds it gone once it gets the lock, and
    writes another (`written_file`)."""
    match = _TMP_NAME.fullmatch(path.name)
    if match is None:
        return False  # not a file `written_file` makes
    if not KERNEL or match["kernel"] != KERNEL:
        try:
            stale = time.time() - path.stat().st_mtime > FOREIGN_TMP_STALE_S
        except FileNotFoundError:
            return False
        if stale:
            path.unlink(missing_ok=True)
        return stale
    try:
        held = os.open(path, os.O_RDONLY)
    except OSError:  # published or removed since it was listed, or not ours to read
        return False
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its writer lives (or no locks here: nothing tells)
        os.close(held)
        return False
    try:
        if os.path.samestat(os.fstat(held), path.stat()):
            path.unlink()
            return True
    except FileNotFoundError:
        pass
    finally:
        os.close(held)
    return False
