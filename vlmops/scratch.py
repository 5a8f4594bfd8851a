"""Scratch a process works in (a file it writes, a folder of its own under the temp dir), and the removal of what
processes killed outright (SIGKILL, the OOM killer, a lost pod) left there: never what a live process works in.

A process holds a lock (flock) on its scratch for as long as it works in it, which the kernel drops when the process
ends, however it ends: scratch whose lock can be taken is nobody's. A name carries the boot id of the kernel whose
process made it: the processes of one kernel see each other's locks (the containers of one machine too), others may
not (a folder on NFS, a machine rebooted since), so scratch named for another kernel, or for none (an older vlmops,
not Linux), is removed only once nothing in it has changed for FOREIGN_STALE_S.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from vlmops.plural import counted

log = logging.getLogger(__name__)

FOREIGN_STALE_S = 24 * 3600.0
"""Scratch another kernel's process made (or a vlmops before the locks) counts as a stopped process's once nothing in
it has changed for this long: its lock cannot be seen from here, and a file is written in seconds."""


def _this_kernel() -> str:
    """The running kernel's boot id (its first 12 hex digits), which a scratch name carries."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
    except OSError:  # not Linux: all scratch is judged by its age
        return ""


KERNEL = _this_kernel()

_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}
"""flock's errors where no lock can be taken: a file system without locks, or NFS, which emulates an exclusive flock
with a write lock and so refuses it on a folder (never open for writing). Scratch there is made without a lock, and a
sweep judges it by its age, as another kernel's."""


class Removed(NamedTuple):
    name: str
    size: int
    """Bytes its files held."""


def said(removed: list[Removed], noun: str, where: str) -> str:
    """What a sweep removed, in a log line: how many (each a `noun`), how many bytes, from `where`, the first names."""
    names = [r.name for r in removed]
    return (
        f"removed {counted(len(names), noun)} ({in_bytes(sum(r.size for r in removed))}) that runs killed while "
        f"writing left in {where}: " + ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    )


def in_bytes(size: int) -> str:
    """`size` bytes in words: "34 bytes", "3.4 kB", "1.2 GB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return counted(size, "byte")


def unique_name(stem: str, suffix: str = "") -> str:
    """A new scratch name: `stem`, this kernel's boot id, a random part, `suffix` (`remove_abandoned` reads the boot
    id)."""
    kernel = f"{KERNEL}." if KERNEL else ""
    return f"{stem}{kernel}{uuid.uuid4().hex}{suffix}"


def kernel_pattern(stem: str, suffix: str = "") -> re.Pattern[str]:
    """The names `unique_name` makes with a stem that `stem` (a regular expression) matches and `suffix`, older ones
    without a boot id included (the group `kernel`)."""
    return re.compile(rf"{stem}(?:(?P<kernel>[0-9a-f]{{12}})\.)?[0-9a-f]{{32}}{re.escape(suffix)}")


def hold(fd: int) -> None:
    """Lock the open file or folder `fd` for this process, waiting while a sweep looks at it; where no lock can be
    taken (`_NO_LOCKS`), nothing."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:
        if err.errno not in _NO_LOCKS:
            raise


def hold_new(create: Callable[[], tuple[Path, int]]) -> tuple[Path, int]:
    """Create scratch with `create` (at a new name each call; it returns the path and a descriptor open on it) and lock
    it, until the descriptor is closed. Returns the path and the descriptor.

    The lock waits while a sweep looks at it; scratch swept between its creation and the lock is made again, under
    another name."""
    while True:
        path, held = create()
        try:
            hold(held)
        except OSError:
            os.close(held)
            raise
        try:
            if os.path.samestat(os.fstat(held), path.stat()):
                return path, held
        except FileNotFoundError:
            pass
        os.close(held)


def new_held_folder(parent: Path, stem: str) -> tuple[Path, int]:
    """A new folder in `parent` named `unique_name(stem)`, locked (`hold_new`); remove it with `remove_held`."""

    def create() -> tuple[Path, int]:
        path = parent / unique_name(stem)
        path.mkdir(mode=0o700)  # the process's own, as tempfile.mkdtemp makes it
        return path, os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    return hold_new(create)


def remove_held(path: Path, held: int) -> None:
    """Remove the folder `path` this process holds (`new_held_folder`) with what is in it, then its lock."""
    shutil.rmtree(path, ignore_errors=True)
    os.close(held)


def temp_dir() -> Path:
    """The system temp dir ($TMPDIR), where a process keeps scratch folders of its own."""
    return Path(tempfile.gettempdir())


@contextmanager
def held_folder(stem: str, parent: Path | None = None) -> Iterator[Path]:
    """A folder of this process's own in `parent` (the temp dir when None) named `unique_name(stem)`, held while the
    block runs and removed after it: `tempfile.TemporaryDirectory`, but what a process killed outright (SIGKILL, the
    OOM killer) left is removed by the next one made there with that stem, never a live process's; logged."""
    parent = temp_dir() if parent is None else parent
    removed = remove_abandoned_folders(parent, stem)
    if removed:
        log.info("%s", said(removed, "scratch folder", str(parent)))
    path, held = new_held_folder(parent, stem)
    try:
        yield path
    finally:
        remove_held(path, held)


def remove_abandoned_folders(parent: Path, stem: str) -> list[Removed]:
    """Remove the folders `new_held_folder(parent, stem)` made that no live process holds (`remove_abandoned`);
    return what went. `stem` as written, not a pattern."""
    return remove_abandoned(parent, kernel_pattern(re.escape(stem)))


def remove_abandoned(folder: Path, names: re.Pattern[str]) -> list[Removed]:
    """Remove the scratch (files or folders) in `folder` whose name `names` matches and that no live process holds;
    return what went, by name."""
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = names.fullmatch(path.name)
        if match is None:
            continue
        size = _removed_if_abandoned(path, match["kernel"])
        if size is not None:
            removed.append(Removed(path.name, size))
    return removed


def _removed_if_abandoned(path: Path, kernel: str | None) -> int | None:
    """Remove `path` if no live process holds it, and return the bytes it held; None where it stays. The lock is held
    while it is removed: a process that created it a moment ago finds it gone once it gets the lock (`hold_new`)."""
    if not KERNEL or kernel != KERNEL:
        return _removed_if_stale(path)
    try:
        held = os.open(path, os.O_RDONLY)
    except OSError:  # published or removed since it was listed, or not ours to read
        return None
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(held)
        # Held: its process lives. No locks here: nothing tells but its age.
        return _removed_if_stale(path) if err.errno in _NO_LOCKS else None
    try:
        if os.path.samestat(os.fstat(held), path.stat()):
            size = _size(path)
            return size if _remove(path) else None
    except FileNotFoundError:
        pass
    finally:
        os.close(held)
    return None


def _removed_if_stale(path: Path) -> int | None:
    """Remove `path` once nothing in it has changed for FOREIGN_STALE_S; the bytes it held, or None where it stays."""
    try:
        if time.time() - _newest_change(path) <= FOREIGN_STALE_S:
            return None
        size = _size(path)
    except FileNotFoundError:
        return None
    return size if _remove(path) else None


def _walk(path: Path) -> list[os.stat_result]:
    """The stat of `path` and, for a folder, of everything under it."""
    found = [path.lstat()]
    if stat.S_ISDIR(found[0].st_mode):
        for top, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    found.append((Path(top) / name).lstat())
                except FileNotFoundError:
                    continue
    return found


def _newest_change(path: Path) -> float:
    return max(s.st_mtime for s in _walk(path))


def _size(path: Path) -> int:
    return sum(s.st_size for s in _walk(path) if stat.S_ISREG(s.st_mode))


def _remove(path: Path) -> bool:
    """Whether `path` went (a folder of another user's stays)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return not path.exists()
