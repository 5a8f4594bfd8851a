"""Folder hashes with a cache: a large file unchanged since the last job is not read again; any change is seen."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from vlmops.fingerprints import folder_stat_fingerprint
from vlmops.hashing import SMALL_FILE_BYTES, FolderHashes
from vlmops.infer.planning import folder_hash


def _model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\x01" * (SMALL_FILE_BYTES + 10))
    return weights


def _rewrite_keeping_stamp(path: Path, data: bytes) -> None:
    """Same size, same inode, same mtime, other bytes (what `cp -p` over the file or an archive unpacked over it
    leaves): only the change time moves."""
    time.sleep(0.02)  # ctime follows the kernel's coarse clock: let it tick past the last stat
    stat = path.stat()
    with path.open("r+b") as f:
        f.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_cached_hash_equals_the_uncached_one_and_skips_the_read(tmp_path: Path) -> None:
    weights = _model(tmp_path / "m")
    cache = tmp_path / "hashes"
    first = folder_hash(tmp_path / "m", cache)
    assert first == folder_hash(tmp_path / "m")  # the cache changes nothing but the time it takes
    [saved] = cache.glob("*.json")
    data = json.loads(saved.read_text())
    data["files"][weights.name]["sha256"] = "0" * 64
    saved.write_text(json.dumps(data))
    assert folder_hash(tmp_path / "m", cache) != first  # the remembered hash was used: the file was not read


def test_a_file_rewritten_with_its_old_mtime_is_hashed_again(tmp_path: Path) -> None:
    weights = _model(tmp_path / "m")
    cache = tmp_path / "hashes"
    first = folder_hash(tmp_path / "m", cache)
    _rewrite_keeping_stamp(weights, b"\x02" * 100)
    assert folder_hash(tmp_path / "m", cache) == folder_hash(tmp_path / "m") != first


def test_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    weights = _model(tmp_path / "m")
    cache = tmp_path / "hashes"
    first = folder_hash(tmp_path / "m", cache)
    weights.write_bytes(b"\x03" * (SMALL_FILE_BYTES + 10))  # same size, new mtime
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    second = folder_hash(tmp_path / "m", cache)
    assert second != first and second == folder_hash(tmp_path / "m")
    # small files are always read: an edited config is seen even with its old stamp
    _rewrite_keeping_stamp(tmp_path / "m" / "config.json", b'{"a": 2}')
    assert folder_hash(tmp_path / "m", cache) != second


def test_an_unreadable_cache_is_rebuilt(tmp_path: Path) -> None:
    _model(tmp_path / "m")
    cache = tmp_path / "hashes"
    first = folder_hash(tmp_path / "m", cache)
    for path in cache.glob("*.json"):
        path.write_text("{not json")
    assert folder_hash(tmp_path / "m", cache) == first
    assert FolderHashes(tmp_path / "m", cache).known  # written again, readable


def test_partial_downloads_are_neither_hashed_nor_fingerprinted(tmp_path: Path) -> None:
    """An S3 model copy killed mid-download leaves `.NAME.part` files (and boto3's `.NAME.part.XXXXXXXX`) until the
    next download removes them: not model files, so neither a batch job's model hash nor a cache key sees them."""
    _model(tmp_path / "m")
    hashed, fingerprint = folder_hash(tmp_path / "m"), folder_stat_fingerprint(tmp_path / "m")
    (tmp_path / "m" / ".model.safetensors.part").write_bytes(b"half")
    (tmp_path / "m" / ".config.json.part.3fA9c0dE").write_bytes(b"ha")
    assert (folder_hash(tmp_path / "m"), folder_stat_fingerprint(tmp_path / "m")) == (hashed, fingerprint)
