"""Cache keys that change when the files a step reads change, not only when its arguments do.

Prefect's INPUTS + TASK_SOURCE policy hashes the arguments; a path argument alone would reuse a stale
result after the file behind it changed. `FileContents` adds the files behind chosen arguments: a file's
sha256, and for a folder (or the folder beside a dataset file, where its images live) each file's relative
path and stat data, and where each symlink leads: no file is read, which keeps the key cheap for multi-GB
checkpoints and image folders. The stat data is what git's index compares: size, mtime, and the change time and
inode, which no tool sets back. Size and mtime alone miss a file replaced by one of the same size and mtime (a
release of a dataset unpacked over the last from archives that give every file one date, copied with cp -p or
rsync -t); the change time moves with every write, copy and utime. Still missed: a same-size rewrite within the
clock tick (milliseconds) of the stat an earlier key took (git's "racy" case, which git settles by reading such
files again). A copy on another disk is another inode: its first run there is not reused from elsewhere.

What the flow writes (its output folder, a rejects file, DVC's repository files) is left out of those folders: a
dataset in the checkout beside outputs/ (or holding versioning.repo) would otherwise get a new key from every run's
own writes, and never be reused. So is what version control and other tools write there (`NOT_DATA`): a commit or a
fetch in the checkout is no reason to validate the data again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from vlmops.hashing import sha256_file
from vlmops.storage import is_partial

# Folders and files that version control, DVC, Python, notebooks, linters and file browsers write beside the data, at
# any depth. Exact names only: every other dotfile (`.gitkeep`, `.gitignore`, an image named `.cat.png`) is data,
# since a record may name it. Content a record reaches through a link into one of them (DVC's symlink cache under
# .dvc/cache, git-annex's under .git/annex) is still followed: the link is a file of the dataset, stat'ed at its target.
NOT_DATA = frozenset(
    {
        *(".git", ".hg", ".svn", ".dvc"),  # version control; DVC's cache, tmp and config
        *("__pycache__", ".ipynb_checkpoints", ".pytest_cache", ".mypy_cache", ".ruff_cache"),  # caches, autosaves
        *(".DS_Store", "Thumbs.db"),  # file browsers' folder views
    }
)


def folder_stat_fingerprint(folder: Path, skip: Collection[Path] = ()) -> str:
    """Relative path and stat data (size, mtime, ctime, inode) of every file below `folder` and where each symlink
    leads, but those in or at a path of `skip` (absolute), tool metadata (`NOT_DATA`) and partial S3 downloads (a
    killed run's, removed by the next download)."""
    folder = folder.resolve()
    inside = {path for path in skip if folder in path.parents}  # a folder inside a written one is read whole
    files, links = [], []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in NOT_DATA and Path(root, d) not in inside]
        # A symlinked folder is not walked: an image a record reads through it lies in a folder that is (validation
        # resolves links and refuses any outside the dataset's folder and data.allowed_roots, both fingerprinted
        # whole), and following links could lead far beyond the data or round in circles. Where it leads is part
        # of the key: pointing `images/` at another version of the images changes no file that is walked.
        links += [path for d in dirs if (path := Path(root, d)).is_symlink()]
        files += [
            path
            for name in names
            if name not in NOT_DATA
            and (path := Path(root, name)) not in inside
            and path.is_file()
            and not is_partial(path)
        ]
    h = hashlib.sha256()
    for path in sorted(files + links):
        line = path.relative_to(folder).as_posix()
        if path.is_symlink():
            line += f"\0-> {path.resolve()}"
        if path.is_file():  # a file, or the file a link leads to (stat follows links)
            stat = path.stat()
            line += f"\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}"
        h.update(f"{line}\n".encode())
    return h.hexdigest()


def fingerprint(value: Any, with_siblings: bool, skip: Collection[Path] = ()) -> str | None:
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if path.is_dir():
        return folder_stat_fingerprint(path, skip)
    if path.is_file():
        key = sha256_file(path)
        return key + folder_stat_fingerprint(path.parent, skip) if with_siblings else key
    return f"missing:{path}"


@dataclass
class FileContents(CachePolicy):
    """Adds the contents of the paths passed in `params` to the cache key.

    `siblings`: for these params, also fingerprint the files beside the named file (a dataset's images).
    `roots`: params holding a `DataConfig`, whose `allowed_roots` folders are fingerprinted too (a dataset's images
    may live there, outside its own folder); its `rejects_file`, which the validation writes, is left out of them.
    `written`: params naming a folder or file the flow writes (`run.output_dir`), or a list of them (what DVC writes
    in its repository), left out of every folder above that holds it.
    """

    params: list[str] = field(default_factory=list)
    siblings: list[str] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        written: list[Any] = []
        for name in self.written:
            value = inputs.get(name)
            written += value if isinstance(value, list) else [value]
        written += [inputs[name].rejects_file for name in self.roots]
        skip = {Path(str(path)).expanduser().resolve() for path in written if path is not None}
        parts = [fingerprint(inputs.get(name), name in self.siblings, skip) for name in self.params]
        parts += [fingerprint(root, False, skip) for name in self.roots for root in inputs[name].allowed_roots]
        return hash_objects(parts, raise_on_failure=True)


def inputs_and_files(
    params: list[str],
    siblings: list[str] | None = None,
    roots: list[str] | None = None,
    written: list[str] | None = None,
) -> CachePolicy:
    """INPUTS + TASK_SOURCE + the files behind `params` (and `siblings`, `roots`, `written`: see `FileContents`)."""
    policy = FileContents(params=params, siblings=siblings or [], roots=roots or [], written=written or [])
    return INPUTS + TASK_SOURCE + policy
