"""Folders that appear whole or not at all: built aside, renamed into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_PREFIX = ".staging-"
"""Names of folders being built; whatever still carries it after a crash is a leftover, never a result."""


def publish_folder(staging: Path, final: Path) -> None:
    """Make a fully written folder visible under its final name in one rename (after flushing it to disk)."""
    for path in staging.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    old = None
    if final.exists():  # written again: swap, so `final` is never partial
        old = final.with_name(f"{STAGING_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    staging.rename(final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield a fresh folder beside `final`; when the block succeeds it replaces `final`, when it raises it is
    removed. A crash mid-way leaves no folder under the final name that a rerun would trust."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{final.name}.", dir=final.parent))
    try:
        yield staging
        publish_folder(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
