"""DVC: a real repository in a temporary folder, objects pushed to a local remote."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from vlmops.versioning import DvcStore, cache_object_path, read_dvc_file


def test_track_folder_pushes_objects(tmp_path: Path) -> None:
    data = tmp_path / "ws" / "datasets" / "abc"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"a": 1}\n')
    (data / "img.png").write_bytes(b"\x89PNG fake but bytes are bytes")
    store = DvcStore(tmp_path / "ws", "local", str(tmp_path / "remote"))
    version = store.track(data)
    assert version.md5.endswith(".dir")
    assert version.nfiles == 2
    assert Path(version.dvc_file) == tmp_path / "ws" / "datasets" / "abc.dvc"
    assert read_dvc_file(Path(version.dvc_file)).md5 == version.md5
    remote = tmp_path / "remote"
    assert cache_object_path(remote, version.md5.removesuffix(".dir") + ".dir").is_file()
    # every file's object is in the remote too
    pushed = [p for p in (remote / "files" / "md5").rglob("*") if p.is_file()]
    assert len(pushed) == 3


def test_same_content_same_hash_changed_content_new_hash(tmp_path: Path) -> None:
    store = DvcStore(tmp_path / "ws", "local", str(tmp_path / "remote"))
    f = tmp_path / "ws" / "model"
    f.mkdir(parents=True)
    (f / "w.bin").write_bytes(b"1234")
    first = store.track(f)
    assert store.track(f).md5 == first.md5
    (f / "w.bin").write_bytes(b"12345")
    assert store.track(f).md5 != first.md5


def test_outside_repo_is_refused(tmp_path: Path) -> None:
    store = DvcStore(tmp_path / "ws", "local", str(tmp_path / "remote"))
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(ValueError, match="versioning.repo"):
        store.track(other)


def test_concurrent_tracks_are_serialised(tmp_path: Path) -> None:
    store = DvcStore(tmp_path / "ws", "local", str(tmp_path / "remote"))
    folders = []
    for name in ("a", "b", "c"):
        folder = tmp_path / "ws" / name
        folder.mkdir(parents=True)
        (folder / "x.txt").write_text(name)
        folders.append(folder)
    errors: list[BaseException] = []

    def work(folder: Path) -> None:
        try:
            DvcStore(tmp_path / "ws", "local", str(tmp_path / "remote")).track(folder)
        except BaseException as err:  # the point of the test is that nothing raises
            errors.append(err)

    threads = [threading.Thread(target=work, args=(f,)) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all((f.parent / f"{f.name}.dvc").is_file() for f in folders)
    del store


def test_the_cache_links_the_tracked_files_instead_of_copying_them(tmp_path: Path) -> None:
    """`dvc add` of a model leaves one copy on disk beside the remote's, not a second one in the cache."""
    import hashlib

    weights = tmp_path / "ws" / "merged" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights " * 1000)
    DvcStore(tmp_path / "ws", "local", str(tmp_path / "remote")).track(weights.parent)
    md5 = hashlib.md5(weights.read_bytes(), usedforsecurity=False).hexdigest()
    assert weights.samefile(cache_object_path(tmp_path / "ws" / ".dvc" / "cache", md5))
    assert not weights.samefile(cache_object_path(tmp_path / "remote", md5))  # the shared store's own copy
