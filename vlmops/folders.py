"""The files under a folder someone gave (an input folder, a model folder), symlinked subfolders included.

`Path.rglob` does not go into a symlinked subfolder (Python 3.11 and 3.12), so a batch input folder with
`batch2 -> /mnt/data/batch2` in it would lose those records without a word. `walk` follows such links, names each file
by its path through the link (what the user sees), and goes into each real folder once: a link back up the tree is
logged and left, not followed round. A folder it cannot list (no read permission, gone mid-walk) is refused by name:
`os.walk` passes over it without a word unless told otherwise, and its files would be left out. `files_under` lists
the files; a step's cache key (tasks.caching) walks the same way, so what a step reads and what its key sees are the
same files.

A name the walk lists that is no file (a broken link such as `part3.jsonl -> /mnt/gone/part3.jsonl`, a named pipe)
is refused when the caller would read it (`files_under`'s `reads`, `refuse_unreadable`): skipped, it would make a job
answer fewer records, or a model's hash and upload miss a file, with no word said.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from vlmops.errors import UserInputError
from vlmops.plural import counted

log = logging.getLogger(__name__)

NAMED = 5
"""How many of the entries refused `refuse_unreadable` names in its message."""


def _every(path: Path) -> bool:
    return True


def walk(root: Path, keep: Callable[[Path], bool] = _every) -> Iterator[tuple[list[Path], list[Path]]]:
    """For `root` and each folder below it: the symlinks to folders in it, and the names `os.walk` lists as its
    files (a broken link among them). Folder links are followed, each real folder once; `keep(path)` False leaves a
    subfolder (and its link) out.

    Raises:
        UserInputError: `root` or a folder below it that the walk goes into cannot be listed, named with the error.
    """
    seen = {root.resolve()}
    for folder, dirs, names in os.walk(root, onerror=_refuse_unlisted, followlinks=True):
        here = Path(folder)
        kept, links = [], []
        for name in sorted(dirs):
            path = here / name
            if not keep(path):
                continue
            real = path.resolve()
            if path.is_symlink():
                links.append(path)
            if real in seen:
                log.warning("%s links to %s, already read: not read twice", path, real)
                continue
            seen.add(real)
            kept.append(name)
        dirs[:] = kept
        yield links, [here / name for name in names]


def _refuse_unlisted(err: OSError) -> None:
    """os.walk's `onerror`: a folder it could not list would lose its files without a word."""
    if isinstance(err, FileNotFoundError):
        fix = "it went away while it was read: put it back (or leave it out of the input) and run again"
    else:
        fix = "give read permission or remove it from the input"
    raise UserInputError(f"cannot list folder {err.filename} ({err.strerror or err}): {fix}") from err


def listed_under(root: Path) -> list[Path]:
    """Every name a walk of `root` lists as a file, sorted by path: the files (symlinks to files and to folders
    followed), and any broken link or named pipe among them."""
    return sorted(path for _, names in walk(root) for path in names)


def files_under(root: Path, reads: Callable[[Path], bool] = _every) -> list[Path]:
    """The files under `root` (symlinks to files and to folders followed) whose path `reads` selects, sorted by path.

    Raises:
        UserInputError: a path `reads` selects is no file to read (a broken link, a named pipe): named, with the fix.
    """
    chosen = [path for path in listed_under(root) if reads(path)]
    refuse_unreadable(chosen)
    return chosen


def refuse_unreadable(paths: Iterable[Path]) -> None:
    """Refuse to go on when one of `paths`, which a step is about to read, is no file: a broken link (named with where
    it leads) or a named pipe, socket or device. Folders are for the caller to leave out.

    Raises:
        UserInputError: naming each such path (the first few) and what to do.
    """
    found = [problem for path in paths if (problem := _not_a_file(path)) is not None]
    if not found:
        return
    more = f"; and {len(found) - NAMED} more" if len(found) > NAMED else ""
    raise UserInputError(f"cannot read {counted(len(found), 'file')}: {'; '.join(found[:NAMED])}{more}")


def _not_a_file(path: Path) -> str | None:
    """What is wrong with reading `path` and the fix, or None for a regular file (or a folder)."""
    try:
        found = path.stat()
    except OSError as err:
        if not path.is_symlink():
            raise
        return (
            f"{path} is a broken symlink to {path.readlink()} ({err.strerror or err}): restore the target or "
            "remove the link"
        )
    if stat.S_ISREG(found.st_mode) or stat.S_ISDIR(found.st_mode):
        return None
    kind = (
        "a named pipe" if stat.S_ISFIFO(found.st_mode) else "a socket" if stat.S_ISSOCK(found.st_mode) else "a device"
    )
    where = f"{path} links to {path.readlink()}, {kind}" if path.is_symlink() else f"{path} is {kind}"
    return f"{where}, not a file: put the file there or remove it"
