"""Folders that appear whole or not at all: built aside, renamed into place when complete.

A folder being built is named `.staging-...` and held by its process (`vlmops.scratch`: a lock the kernel drops when
the process ends, however it ends). A process killed outright (SIGKILL, the OOM killer, a lost pod that keeps its
volume) leaves it behind, a model download's GBs say: the next `staging_in` in that folder removes those, never a live
process's (`remove_abandoned_staging`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from vlmops.errors import RunFailed
from vlmops.scratch import (
    Removed,
    hold,
    kernel_pattern,
    new_held_folder,
    remove_abandoned,
    remove_held,
    said,
    unique_name,
)

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
"""Names of folders being built; whatever still carries it after a crash is a leftover, never a result."""
_HELD_NAME = kernel_pattern(rf"{re.escape(STAGING_PREFIX)}.*?\.").pattern
STAGING_NAMES = re.compile(rf"{_HELD_NAME}|{re.escape(STAGING_PREFIX)}.+")
"""What `remove_abandoned_staging` looks at: the names `staging_in` and `publish_folder` give (held while their process
lives), and any other `.staging-` name (an older vlmops's, `tempfile.mkdtemp`'s), judged by its age as scratch of
unknown origin is."""
BUILD_LOCK_TIMEOUT_S = 3600.0
"""How long `build_lock` waits for another process's build (a model download can take this long)."""


class LockTimeoutError(RunFailed):
    """Another process held a build lock longer than this one would wait (exit 1); the message says what it is doing
    and what to do."""


def sync_files(folder: Path) -> None:
    """Flush every file under `folder` to disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def sync_entries(folder: Path) -> None:
    """Flush `folder`'s own entries (names created, renamed or removed in it) to disk."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def publish_folder(staging: Path, final: Path) -> None:
    """Make a fully written folder visible under its final name in one rename (after flushing it to disk)."""
    sync_files(staging)
    aside = None
    if final.exists():  # written again: swap, so `final` is never partial
        aside = _moved_aside(final)
    try:
        staging.rename(final)
    except BaseException:
        if aside is not None:  # the old folder back where it was, as if never touched
            aside[0].rename(final)
            os.close(aside[1])
        raise
    sync_entries(final.parent)
    if aside is not None:
        remove_held(*aside)


def _moved_aside(final: Path) -> tuple[Path, int]:
    """Rename `final` to a held `.staging-old-` name (returned with the descriptor holding it): a kill before it is
    removed (its rmtree takes a while for a model) leaves a folder the next sweep in that folder takes."""
    held = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
    try:
        hold(held)  # locked before it carries the name a sweep looks at
        old = final.with_name(unique_name(f"{STAGING_PREFIX}old-{final.name}."))
        final.rename(old)
    except BaseException:
        os.close(held)
        raise
    return old, held


def publish_new_folder(staging: Path, final: Path) -> bool:
    """Rename a fully written folder to `final` unless a folder is there already (then `staging` is removed);
    returns whether this one was published.

    For content-addressed names, where an existing folder holds the same bytes. The rename itself is the test:
    a check first would let two processes both publish, and the second would swap the folder out from under the
    first while it reads it (or while DVC tracks it).
    """
    sync_files(staging)
    try:
        staging.rename(final)  # fails on an existing non-empty folder, atomically
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
            raise
        shutil.rmtree(staging)
        return False
    sync_entries(final.parent)
    return True


@contextmanager
def build_lock(final: Path, work: str | None = None, timeout: float = BUILD_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold a file lock beside `final` while checking for it and building it, so that of several processes
    needing the same shared folder or file (the tiny model, the demo data of one output folder, a new MLflow
    SQLite store, a model download and its manifest) one builds it and the others wait and use it, instead of each
    replacing it while the others read it.

    `work` says what the holder does, in the line logged when this process has to wait and in the error when it
    gives up (default: building `final`). `timeout`: seconds to wait for the holder.

    Raises:
        LockTimeoutError: another process held the lock for `timeout` seconds.
    """
    with held_lock(final.with_name(f".{final.name}.lock"), work or f"building {final}", timeout):
        yield


@contextmanager
def held_lock(lock_file: Path, work: str, timeout: float) -> Iterator[None]:
    """Hold the file lock `lock_file` (created with its folder), logging a line when another process holds it first.

    `work` says what a holder does, in that line and in the error when this process gives up after `timeout` s.

    Raises:
        LockTimeoutError: another process held the lock for `timeout` seconds.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file), timeout=timeout)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        # A wait can last as long as a model download: say why nothing seems to happen.
        log.info("waiting for another process to finish %s (lock %s)", work, lock.lock_file)
        try:
            lock.acquire()
        except Timeout as err:
            raise LockTimeoutError(_lock_held(lock.lock_file, work, timeout)) from err
    try:
        yield
    finally:
        lock.release()


def _lock_held(lock_file: str, work: str, timeout: float) -> str:
    # On Linux filelock takes an flock (fcntl.flock) on the open file: the kernel releases it when the holder's
    # process ends, however it ends, and the file stays for the next one. Only where the file system has no flock
    # (ENOSYS) does filelock fall back to a lock that is the file itself, which a crash leaves behind.
    return (
        f"{lock_file} is still locked after {timeout:g} s: another process is {work} (on this machine, or on another "
        f"one that shares the folder). Let it finish and run again; `lsof {lock_file}` lists the processes here that "
        "have the file open. Do not delete the file while that process runs (the next run would lock a new file and "
        "work beside it). The lock is an flock, which ends with its process, even a killed one: a lock file left "
        "behind locks nothing. Only on a file system without flock, where filelock falls back to the file itself, "
        "can a crashed run leave it locked: delete it then, once no such process runs."
    )


@dataclass
class Stage:
    """A folder being built in `parent`; `name()` says what it will be called once the block succeeds."""

    path: Path
    parent: Path
    final: Path | None = None
    replace: bool = True

    def name(self, name: str, replace: bool = True) -> Path:
        """Set the final name (e.g. a content hash, known only once the files are written); returns the path.

        `replace=False`: a folder already there under that name is kept and this one discarded: for
        content-addressed names, where an existing folder holds the same bytes.
        """
        self.final, self.replace = self.parent / name, replace
        return self.final


@contextmanager
def staging_in(parent: Path, prefix: str = "") -> Iterator[Stage]:
    """Yield a fresh folder in `parent`, published under the name given by `Stage.name` when the block
    succeeds, removed when it raises. A crash mid-way leaves only a `.staging-` folder, never a result; this process
    holds it while the block runs, and the next `staging_in` in `parent` removes it once the process is gone, with
    what other killed processes left there (`remove_abandoned_staging`)."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(parent)
    path, held = new_held_folder(parent, f"{STAGING_PREFIX}{prefix}.")
    stage = Stage(path, parent)
    try:
        yield stage
        if stage.final is None:
            raise RuntimeError(f"staged folder {stage.path} was never named; call Stage.name() inside the block")
        if stage.replace:
            publish_folder(stage.path, stage.final)
        else:
            publish_new_folder(stage.path, stage.final)
    except BaseException:
        remove_held(stage.path, held)
        raise
    os.close(held)  # published (renamed, or removed as a duplicate): the lock is no longer needed


def remove_abandoned_staging(parent: Path) -> list[Removed]:
    """Remove the `.staging-` folders in `parent` that processes killed outright left (a model download's, a merge's:
    GBs each), never one a live process builds, and log what went; returns it.

    Every prefix, not only the caller's: a folder like a model's registry cache holds each version's staging, and a
    killed download of one is found when another is fetched. A folder held by a live process (this machine's; another
    machine's and an unheld one once nothing in it changed for a day, `vlmops.scratch`) stays: two processes building
    in one folder at once each leave the other's. Two building the same folder wait on `build_lock` where the caller
    takes it, before either builds.
    """
    removed = remove_abandoned(parent, STAGING_NAMES)
    if removed:
        log.info("%s", said(removed, "staging folder", str(parent)))
    return removed


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield a fresh folder beside `final`; when the block succeeds it replaces `final`, when it raises it is
    removed. A crash mid-way leaves no folder under the final name that a rerun would trust."""
    with staging_in(final.parent, final.name) as stage:
        stage.name(final.name)
        yield stage.path


def publish_file(staging: Path, final: Path) -> None:
    """Make a fully written file visible under its final name in one rename (after flushing it to disk)."""
    with staging.open("rb") as f:
        os.fsync(f.fileno())
    staging.replace(final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a file beside it and one rename: whoever reads `path` (a rerun after a crash
    too) finds the old content or the new one whole, never a part."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`write_text_atomic` for bytes."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_bytes(data)
        publish_file(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
