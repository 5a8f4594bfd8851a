"""The files under a folder someone gave (an input folder, a model folder), symlinked subfolders included.

`Path.rglob` does not go into a symlinked subfolder (Python 3.11 and 3.12), so a batch input folder with
`batch2 -> /mnt/data/batch2` in it would lose those records without a word. `walk` follows such links, names each file
by its path through the link (what the user sees), and goes into each real folder once: a link back up the tree is
logged and left, not followed round. `files_under` lists the files; a step's cache key (tasks.caching) walks the same
way, so what a step reads and what its key sees are the same files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def _every(path: Path) -> bool:
    return True


def walk(root: Path, keep: Callable[[Path], bool] = _every) -> Iterator[tuple[list[Path], list[Path]]]:
    """For `root` and each folder below it: the symlinks to folders in it, and the names `os.walk` lists as its
    files (a broken link among them). Folder links are followed, each real folder once; `keep(path)` False leaves a
    subfolder (and its link) out."""
    seen = {root.resolve()}
    for folder, dirs, names in os.walk(root, followlinks=True):
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


def files_under(root: Path) -> list[Path]:
    """Every file under `root` (symlinks to files and to folders followed), sorted by path."""
    return sorted(path for _, files in walk(root) for path in files if path.is_file())
