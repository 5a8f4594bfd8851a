"""Disk-space checks for downloads and conversions: refuse early when the size is known, explain ENOSPC."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from vlmops.errors import RunFailed

# Room kept free beyond what a write needs: filesystems slow down and other writers need a margin.
HEADROOM = 1.05
MIN_FREE_BYTES = 100 * 1024 * 1024


class DiskFullError(RunFailed, OSError):
    """Not enough disk space (an OSError with errno ENOSPC); the message says where, how much, and what to do."""

    def __init__(self, message: str):
        OSError.__init__(self, errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Raise DiskFullError unless the disk that holds (or will hold) `folder` has room for `needed` bytes."""
    if needed <= 0:
        return
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * HEADROOM + MIN_FREE_BYTES:
        raise DiskFullError(
            f"not enough disk space for {what}: it needs {gb(needed)}, {probe} has {gb(free)} free. "
            "Free space or set model.cache_dir to a disk with room."
        )


def raise_if_disk_full(err: BaseException, folder: Path, what: str) -> None:
    """Re-raise `err` as a DiskFullError naming `folder` when ENOSPC is anywhere in its chain."""
    if isinstance(err, DiskFullError):
        raise err
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            raise DiskFullError(
                f"disk full while {what} into {folder}: free space or set model.cache_dir to a disk with room"
            ) from err
        seen = seen.__cause__ or seen.__context__
