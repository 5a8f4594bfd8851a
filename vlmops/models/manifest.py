"""Manifests of model folders: every file's size and sha256, written once and checked on every later use.

A manifest lives under `<cache_dir>/manifests/` (a tiny model built under `run.output_dir`: under
`<output_dir>/models/manifests/`), never inside a hub's snapshot folder (its layout belongs to
the hub's tools) nor in a user's folder. `verify` checks sizes always, and sha256 for files under 1 MiB and
for any file whose mtime changed since the manifest was written (the policy is in `vlmops.models.download`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlmops.folders import files_under
from vlmops.hashing import SMALL_FILE_BYTES, sha256_file
from vlmops.models.catalog import ResolvedModel
from vlmops.models.download_errors import REFRESH_HINT, SnapshotCorruptedError
from vlmops.staging import write_text_atomic

log = logging.getLogger(__name__)

ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.bin",
    "*.jinja",
    "*.model",
    "tokenizer*",
    "merges.txt",
    "vocab.txt",
]
MANIFEST_FORMAT = 1


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 over (path, size, sha256) of every file: identical for identical contents."""
    lines = "".join(f"{p}\t{f['size']}\t{f['sha256']}\n" for p, f in sorted(manifest["files"].items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def build_manifest(folder: Path, files: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256, mtime_ns}} for `files`, or every model file in `folder`."""
    names = sorted(files) if files is not None else model_files(folder)
    out = {}
    for name in names:
        path = folder / name
        stat = path.stat()
        out[name] = {"size": stat.st_size, "sha256": sha256_file(path), "mtime_ns": stat.st_mtime_ns}
    return out


def model_files(folder: Path) -> list[str]:
    """Files under `folder` that a model needs (ALLOW_PATTERNS), skipping hidden files and folders. Symlinked
    subfolders are read as `vlmops.folders` reads them, so the manifest lists what a batch job hashes and an upload
    copies; a model folder can be a symlink farm (a hub cache's snapshot links each file into its blobs).

    Raises:
        UserInputError: a model file is a broken link (a snapshot whose blob is gone) or no file.
    """

    def needed(path: Path) -> bool:
        rel = path.relative_to(folder).as_posix()
        return not any(part.startswith(".") for part in rel.split("/")) and matches(rel, ALLOW_PATTERNS)

    return sorted(path.relative_to(folder).as_posix() for path in files_under(folder, reads=needed))


def write_manifest(
    folder: Path,
    manifest_path: Path,
    resolved: ResolvedModel,
    files: Iterable[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": resolved.source,
        "id": resolved.id,
        "revision": resolved.revision,
        "folder": str(folder),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
        "files": build_manifest(folder, files),
    }
    write_json_atomic(manifest_path, manifest)
    log.info("wrote manifest %s (%d files)", manifest_path, len(manifest["files"]))
    return manifest


def ensure_manifest(
    folder: Path,
    manifest_path: Path,
    resolved: ResolvedModel,
    *,
    owned: bool,
    refresh: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Verify `folder` against its manifest, or write one. `owned`: a mismatch is corruption, not a change."""
    if manifest_path.is_file() and not refresh:
        try:
            return verify(folder, manifest_path, owned=owned)
        except SnapshotCorruptedError as err:
            if owned:
                raise
            log.warning(
                "%s changed since its manifest was written (%s); re-hashing it",
                folder,
                err.args[0].split(":")[0],
            )
    return write_manifest(folder, manifest_path, resolved, extra=extra)


def verify(folder: Path, manifest_path: Path, *, owned: bool) -> dict[str, Any]:
    """Check `folder` against its manifest with no network (the policy is in the module docstring)."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files: dict[str, dict[str, Any]] = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SnapshotCorruptedError(
            f"{manifest_path}: damaged manifest. Delete it and {folder}, or {REFRESH_HINT}"
        ) from None
    fix = f"Delete {folder} or {REFRESH_HINT} to download it again." if owned else "It was re-hashed."
    touched = False
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            raise SnapshotCorruptedError(f"{path}: missing from the snapshot (listed in {manifest_path}). {fix}")
        stat = path.stat()
        if stat.st_size != record["size"]:
            raise SnapshotCorruptedError(
                f"{path}: corrupted, {stat.st_size} bytes where the manifest says {record['size']}. {fix}"
            )
        if stat.st_size < SMALL_FILE_BYTES or stat.st_mtime_ns != record.get("mtime_ns"):
            if sha256_file(path) != record["sha256"]:
                raise SnapshotCorruptedError(f"{path}: corrupted, its sha256 differs from {manifest_path}. {fix}")
            if stat.st_mtime_ns != record.get("mtime_ns"):
                record["mtime_ns"] = stat.st_mtime_ns  # same content, touched: trust the new mtime from now on
                touched = True
    if touched:
        write_json_atomic(manifest_path, manifest)
    log.info("verified %s against %s (%d files)", folder, manifest_path, len(files))
    return dict(manifest)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def patterns_for(listing: Iterable[str]) -> list[str]:
    """ALLOW_PATTERNS, less `*.bin` when the repository has safetensors weights (no second copy)."""
    names = list(listing)
    if any(n.endswith(".safetensors") for n in names):
        return [p for p in ALLOW_PATTERNS if p != "*.bin"]
    return list(ALLOW_PATTERNS)


def matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)
