"""Content hashes of files (streamed by hashlib, so multi-GB weights do not load into memory).

`FolderHashes` remembers each large file's sha256 against its size, mtime, change time (ctime) and inode, so a
batch job over a 15 GB checkpoint does not read every byte again to name its job (DVC's state database and git's
index do the same). A file written since gets a new ctime, whatever its mtime says (`cp -p`, `rsync -t` and `tar`
set mtimes back; nothing sets ctime back), and is hashed again; small files always are (cheap, and configs are what
people edit), as the model manifests do (vlmops.models.manifest).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SMALL_FILE_BYTES = 1024 * 1024  # always re-hashed: cheap, and configs are what people edit
CACHE_FORMAT = 1


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class FolderHashes:
    """sha256 of the files of one folder, remembered in `cache_dir/<hash of the folder's path>.json`."""

    def __init__(self, folder: Path, cache_dir: Path | None):
        self.folder = folder.resolve()
        key = hashlib.sha256(str(self.folder).encode()).hexdigest()[:32]
        self.path = cache_dir / f"{key}.json" if cache_dir is not None else None
        self.known = self._read()
        self.changed = False

    def _read(self) -> dict[str, dict[str, int | str]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return dict(data["files"]) if data.get("format") == CACHE_FORMAT else {}
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring the unreadable hash cache %s (it is rebuilt)", self.path)
            return {}

    def sha256(self, path: Path) -> str:
        rel = path.relative_to(self.folder).as_posix()
        stat = path.stat()
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}
        record = self.known.get(rel)
        if (
            stat.st_size >= SMALL_FILE_BYTES
            and record is not None
            and all(record.get(k) == v for k, v in stamp.items())
        ):
            return str(record["sha256"])
        digest = sha256_file(path)
        if stat.st_size >= SMALL_FILE_BYTES:
            self.known[rel] = {**stamp, "sha256": digest}
            self.changed = True
        return digest

    def save(self) -> None:
        """Write the cache (atomically: a reader sees the old file or the new one); a failure only warns."""
        if self.path is None or not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "folder": str(self.folder), "files": self.known}))
            tmp.replace(self.path)
        except OSError as err:
            log.warning("could not save the hash cache %s (%s); the next job hashes the files again", self.path, err)
