"""The files under a folder someone gave (an input folder, a model folder), symlinked subfolders included.

`Path.rglob` does not go into a symlinked subfolder (Python 3.11 and 3.12), so a batch input folder with
`batch2 -> /mnt/data/batch2` in it would lose those records without a word. `files_under` follows such links, names
each file by its path through the link (what the user sees), and goes into each real folder once: a link back up
the tree is logged and left, not followed round.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def files_under(root: Path) -> list[Path]:
    """Every file under `root` (symlinks to files and to folders followed), sorted by path."""
    found: list[Path] = []
    seen = {root.resolve()}
    for folder, dirs, files in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(dirs):
            real = (Path(folder) / name).resolve()
            if real in seen:
                log.warning("%s links to %s, already read: not read twice", Path(folder) / name, real)
                continue
            seen.add(real)
            kept.append(name)
        dirs[:] = kept
        found.extend(path for path in (Path(folder) / name for name in files) if path.is_file())
    return sorted(found)
