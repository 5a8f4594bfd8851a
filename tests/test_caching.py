"""The part of a cache key that follows a dataset's files (tasks.caching.FileContents, as validate_dataset uses it):
what changes the data changes the key, and what tools write beside the data does not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import cast

import pytest
from PIL import Image
from prefect.context import TaskRunContext

from tasks.caching import FileContents
from vlmops.config import DataConfig

RECORD = json.dumps(
    {
        "conversations": [
            {"from": "user", "value": "<img>images/shape.bmp</img>Colour?"},
            {"from": "assistant", "value": "red"},
        ]
    }
)


def dataset_key(train_file: Path, data: DataConfig) -> str | None:
    """validate_dataset's file part of the key: the dataset file, the files beside it, data.allowed_roots."""
    policy = FileContents(params=["train_file"], siblings=["train_file"], roots=["data"])
    return policy.compute_key(cast(TaskRunContext, None), {"train_file": str(train_file), "data": data}, {})


def image(path: Path, colour: str) -> Path:
    """A BMP: every 32x32 image is the same number of bytes, whatever its colours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path, format="BMP")
    return path


def dataset(folder: Path) -> Path:
    image(folder / "images" / "shape.bmp", "red")
    (folder / "train.jsonl").write_text(RECORD)
    return folder / "train.jsonl"


def test_version_control_and_tool_metadata_beside_the_data_leave_the_key_as_it_is(tmp_path: Path) -> None:
    """A dataset in a git checkout: a commit (or a fetch) rewrites .git/, Python writes __pycache__/, DVC its .dvc/tmp,
    Finder .DS_Store. None of that is data, and none of it may make the next run validate again. Other dotfiles are
    data (a record may name `.hidden.png`), `.gitkeep` included, and so is what a file of the dataset links to inside
    one of those folders (DVC's symlink cache)."""
    train = dataset(tmp_path / "checkout")
    (tmp_path / "checkout" / "images" / ".gitkeep").write_text("")
    before = dataset_key(train, DataConfig())

    git = ["git", "-C", str(tmp_path / "checkout"), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "data"], check=True)
    for name in ("__pycache__/prepare.cpython-311.pyc", ".dvc/tmp/lock", ".dvc/cache/files/md5/ab/cdef", ".DS_Store"):
        (tmp_path / "checkout" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "checkout" / name).write_text("tool metadata")
    (tmp_path / "checkout" / "images" / ".shape.bmp.part").write_text("half a download")
    assert dataset_key(train, DataConfig()) == before

    (tmp_path / "checkout" / "images" / ".gitkeep").write_text("kept")
    kept = dataset_key(train, DataConfig())
    assert kept != before

    # DVC's symlink cache: the image in the dataset is a link into .dvc/cache; what it points at is the data
    obj = image(tmp_path / "checkout" / ".dvc" / "cache" / "files" / "md5" / "12" / "3456", "red")
    (tmp_path / "checkout" / "images" / "linked.bmp").symlink_to(obj)
    linked = dataset_key(train, DataConfig())
    assert linked != kept
    Image.new("RGB", (16, 16), "blue").save(obj, format="BMP")
    assert dataset_key(train, DataConfig()) != linked


def test_an_image_folder_linked_from_an_allowed_root_is_followed(tmp_path: Path) -> None:
    """images/ is a symlink into a shared mount (data.allowed_roots: validation refuses a link that leads anywhere
    else). An image changed behind the link changes the key (the mount is fingerprinted); so does pointing the link
    at another folder of that mount, whose files did not change."""
    shared = tmp_path / "shared"
    image(shared / "v1" / "shape.bmp", "red")
    image(shared / "v2" / "shape.bmp", "blue")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(RECORD)
    (tmp_path / "data" / "images").symlink_to(shared / "v1", target_is_directory=True)
    data = DataConfig(allowed_roots=[str(shared)])
    first = dataset_key(tmp_path / "data" / "train.jsonl", data)

    image(shared / "v1" / "shape.bmp", "green")
    second = dataset_key(tmp_path / "data" / "train.jsonl", data)
    assert second != first

    (tmp_path / "data" / "images").unlink()
    (tmp_path / "data" / "images").symlink_to(shared / "v2", target_is_directory=True)
    assert dataset_key(tmp_path / "data" / "train.jsonl", data) != second


@pytest.mark.parametrize("how", ["in place (cp -p)", "renamed over (rsync -t, tar)"])
def test_an_image_replaced_with_its_size_and_mtime_changes_the_key(how: str, tmp_path: Path) -> None:
    """A new release of a dataset unpacked over the old one: reproducible archives give every file one fixed mtime
    (zip's 1980-01-01, SOURCE_DATE_EPOCH), copies keep it (cp -p, rsync -t, tar), and BMPs of one size have one file
    size. Size and mtime alone cannot tell the new image from the old; its change time can (no tool sets it back)."""
    fixed = 315_532_800_000_000_000  # 1980-01-01, in ns
    train = dataset(tmp_path / "data")
    old = tmp_path / "data" / "images" / "shape.bmp"
    new = image(tmp_path / "release-2" / "shape.bmp", "blue")
    for path in (old, new):
        os.utime(path, ns=(fixed, fixed))
    assert (old.stat().st_size, old.stat().st_mtime_ns) == (new.stat().st_size, new.stat().st_mtime_ns)
    before = dataset_key(train, DataConfig())

    time.sleep(0.02)  # the change time ticks with the kernel's clock (up to 10 ms before Linux 6.13)
    if how.startswith("in place"):
        shutil.copy2(new, old)
    else:
        shutil.copy2(new, old.with_name(".shape.bmp.tmp"))
        old.with_name(".shape.bmp.tmp").replace(old)
    assert (old.stat().st_size, old.stat().st_mtime_ns) == (new.stat().st_size, new.stat().st_mtime_ns)
    assert dataset_key(train, DataConfig()) != before
