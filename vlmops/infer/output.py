"""Where a batch inference job writes: a local folder or an `s3://` prefix, with files that appear whole.

A file is written to a local temporary file first and then published in one step: a rename in the same
folder (local), or one PUT (S3 makes an object visible only once its upload completes). A reader, or a
rerun deciding what is done, never sees half a file.

A run killed while it writes a file leaves the temporary file. A local output's are in `_job/tmp/`, where several
processes of one job may write at once (a distributed job's task workers on a shared folder; a second run of the job is
refused, `vlmops.infer.job_lock`), so a run removes only those no live process writes (`LocalOutput.sweep`): each writer
holds a lock on its file (flock) while it writes it, which the kernel drops when the process ends, however it ends
(`vlmops.scratch`). On S3 the files are written in a scratch folder of the process's own under the temp dir, removed
with it (`close`), held by a lock the same way: a job's start removes those of processes killed outright on this machine
(`S3Output.sweep`). A part of more than 8 MiB is PUT in parts (boto3's multipart upload), and one killed outright leaves
the parts sent so far on the server, out of sight of every listing, until they are aborted (a bucket lifecycle rule
`AbortIncompleteMultipartUpload`); one stopped in order (Ctrl-C, SIGTERM) is aborted by boto3 as it stops.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vlmops.config import StorageConfig
from vlmops.errors import UserInputError
from vlmops.scratch import (
    Removed,
    hold_new,
    kernel_pattern,
    new_held_folder,
    remove_abandoned,
    remove_abandoned_folders,
    remove_held,
    temp_dir,
    unique_name,
)
from vlmops.staging import publish_file

TMP_DIR = "_job/tmp"
JOB_FILE = "_job/job.json"
"""A batch job's identity file, under its output: a folder that holds one is a job's output, not input."""

SCRATCH_STEM = "vlmops-job-"
"""How the scratch folder of a process writing to an S3 output is named, under the temp dir (`unique_name`)."""
_TMP_NAME = kernel_pattern(r"\..+?\.", ".tmp")


@dataclass(frozen=True)
class Swept:
    """What a sweep removed from `where`: each a `noun` ("temporary file")."""

    noun: str
    where: str
    removed: list[Removed]


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

    def sweep(self) -> Swept:
        """Remove the temporary files that runs stopped while writing left in the scratch folder (S3: the scratch
        folders they left on this machine), none that a live process writes; say what went."""
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

    def sweep(self) -> Swept:
        folder = self.root / TMP_DIR
        return Swept("temporary file", str(folder), remove_abandoned(folder, _TMP_NAME))

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
            # Held (locked) while this process lives: a sweep by another job on this machine leaves it.
            self._scratch, held = new_held_folder(temp_dir(), SCRATCH_STEM)
            # Removed with this output, at exit, or by `close`: a worker that runs job after job kept a folder for each.
            self._removal = weakref.finalize(self, remove_held, self._scratch, held)
        return self._scratch

    def sweep(self) -> Swept:
        """The scratch folders of processes killed outright on this machine (SIGKILL, the OOM killer): each held up to
        a part waiting for its PUT, and a worker killed now and then filled its disk. Not those of live processes,
        another job's or a task worker's."""
        folder = temp_dir()
        return Swept("scratch folder", str(folder), remove_abandoned_folders(folder, SCRATCH_STEM))

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

    def create() -> tuple[Path, int]:
        path = output.scratch() / unique_name(f".{Path(name).name}.", ".tmp")
        # Created with the umask's mode, as every other file vlmops writes: mkstemp's 0600 left a job's results
        # unreadable to the rest of a team on a shared disk. O_EXCL: never another writer's file.
        return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)

    path, held = hold_new(create)
    try:
        yield path
        output.publish(path, name)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(held)
