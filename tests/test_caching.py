"""The part of a cache key that follows a dataset's files (tasks.caching.FileContents, as validate_dataset uses it):
what changes the data validation reads changes the key, and nothing else beside it does."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import pytest
from PIL import Image
from prefect.cache_policies import CompoundCachePolicy
from prefect.context import TaskRunContext

from tasks.caching import FileContents
from tasks.validate import validate_dataset
from tests.s3_server import S3Server, watched_requests
from vlmops.config import DataConfig, StorageConfig
from vlmops.errors import UserInputError
from vlmops.fingerprints import fingerprint, folder_stat_fingerprint, image_stat_data, stat_data

RECORD = json.dumps(
    {
        "conversations": [
            {"from": "user", "value": "<img>images/shape.bmp</img>Colour?"},
            {"from": "assistant", "value": "red"},
        ]
    }
)


def ask(image: str) -> str:
    """A record in the `messages` + `images` form naming one image."""
    return json.dumps(
        {
            "messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
            "images": [image],
        }
    )


def dataset_key(train_file: Path | str, data: DataConfig, output_dir: Path | None = None) -> str | None:
    """The file part of validate_dataset's own cache policy, for a dataset file (or folder, or s3:// URI) and its
    DataConfig."""
    policy = cast(CompoundCachePolicy, validate_dataset.cache_policy)
    [files] = [p for p in policy.policies if isinstance(p, FileContents)]
    inputs: dict[str, Any] = {
        "data": data,
        "train_file": str(train_file),
        "eval_file": None,
        "model_path": None,
        "output_dir": str(output_dir) if output_dir else None,
        "storage": StorageConfig(),
        "dvc_writes": None,
    }
    return files.compute_key(cast(TaskRunContext, None), inputs, {})


def image(path: Path, colour: str) -> Path:
    """A BMP: every 32x32 image is the same number of bytes, whatever its colours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path, format="BMP")
    return path


def dataset(folder: Path) -> Path:
    image(folder / "images" / "shape.bmp", "red")
    (folder / "train.jsonl").write_text(RECORD)
    return folder / "train.jsonl"


def rewrite(path: Path, colour: str) -> None:
    """The same image file, rewritten with the same size (and a later change time)."""
    time.sleep(0.02)  # the change time ticks with the kernel's clock (up to 10 ms before Linux 6.13)
    size = path.stat().st_size
    image(path, colour)
    assert path.stat().st_size == size


def test_a_dataset_at_a_checkouts_root_follows_its_images_and_nothing_else_there(tmp_path: Path) -> None:
    """train.jsonl at the root of a checkout, beside code, a virtualenv, outputs/ and .git/: a code edit, a pip
    install, a commit and a run's outputs leave the key as it is (the whole checkout was in it: every edit validated
    the data again); an image the records name, rewritten in place with its size, changes it."""
    checkout = tmp_path / "checkout"
    train = dataset(checkout)
    (checkout / "train.py").write_text("print('train')\n")
    (checkout / "images" / "unnamed.bmp").write_bytes(b"not named by any record")
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "data"], check=True)
    before = dataset_key(train, DataConfig(), checkout / "outputs")

    (checkout / "train.py").write_text("print('train, edited')\n")
    (checkout / ".venv" / "lib" / "site-packages" / "pkg").mkdir(parents=True)
    (checkout / ".venv" / "lib" / "site-packages" / "pkg" / "__init__.py").write_text("")
    (checkout / "images" / "unnamed.bmp").write_bytes(b"changed, still named by no record")
    (checkout / "outputs" / "runs" / "1").mkdir(parents=True)
    subprocess.run([*git, "commit", "-q", "-am", "edit"], check=True)
    assert dataset_key(train, DataConfig(), checkout / "outputs") == before

    rewrite(checkout / "images" / "shape.bmp", "blue")
    assert dataset_key(train, DataConfig(), checkout / "outputs") != before


@pytest.mark.parametrize(
    ("named", "stored"),
    [
        (".git/annex/objects/shape.bmp", ".git/annex/objects/shape.bmp"),
        ("outputs/shape.bmp", "outputs/shape.bmp"),
        ("images/linked.bmp", ".dvc/cache/files/md5/12/3456"),  # DVC's symlink cache
    ],
)
def test_an_image_in_a_folder_a_walk_leaves_out_is_followed_when_a_record_names_it(
    named: str, stored: str, tmp_path: Path
) -> None:
    """A record that names an image under .git/ or in the output folder, or a link into .dvc/cache: validation reads
    it, so it is in the key (a folder walk left out the first two)."""
    folder = tmp_path / "data"
    obj = image(folder / stored, "red")
    if named != stored:
        (folder / named).parent.mkdir(parents=True)
        (folder / named).symlink_to(obj)
    train = folder / "train.jsonl"
    train.write_text(ask(named) + "\n")
    before = dataset_key(train, DataConfig(), folder / "outputs")

    rewrite(obj, "blue")
    assert dataset_key(train, DataConfig(), folder / "outputs") != before


def test_an_image_that_appears_changes_the_key(tmp_path: Path) -> None:
    """A record names an image that is not there yet (validation rejects it); once it is, validation's answer is
    another, and so is the key. So is its going away again."""
    folder = tmp_path / "data"
    folder.mkdir()
    train = folder / "train.jsonl"
    train.write_text(RECORD + "\n")
    missing = dataset_key(train, DataConfig())

    image(folder / "images" / "shape.bmp", "red")
    present = dataset_key(train, DataConfig())
    assert present != missing

    (folder / "images" / "shape.bmp").unlink()
    assert dataset_key(train, DataConfig()) == missing


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_malformed_records_are_passed_over_and_the_rest_still_count(suffix: str, tmp_path: Path) -> None:
    """Records validation will reject (not JSON, not an object, the wrong shape, an image path with a NUL byte or an
    unknown ~user, one outside the dataset's folder) do not stop the key: its images and those of the good record
    after them are still followed."""
    folder = tmp_path / "data"
    train = dataset(folder)
    bad = [
        '{"conversations": [',
        "[1, 2]",
        '{"conversations": "not a list"}',
        ask("a\0b.bmp"),
        ask("~no-such-user-h36/shape.bmp"),
        ask("../outside.bmp"),
        ask("images/other.bmp"),
    ]
    if suffix == ".jsonl":
        train.write_text("\n".join([*bad, RECORD]) + "\n")
    else:
        train = train.with_suffix(".json")
        train.write_text("[" + ", ".join([*bad[1:], RECORD]) + "]")  # each but the first is a JSON value
        (folder / "broken.json").write_text("[" + RECORD + ", {")
        assert dataset_key(folder / "broken.json", DataConfig())  # a .json file that does not parse
    before = dataset_key(train, DataConfig())

    rewrite(folder / "images" / "shape.bmp", "blue")
    assert dataset_key(train, DataConfig()) != before


def test_a_link_repointed_out_of_the_dataset_folder_changes_the_key(tmp_path: Path) -> None:
    """images/ leads out of the dataset's folder (validation rejects the record, naming where it led); pointed at
    another folder out of it, the record is still rejected, for another reason, and the key changes."""
    for name in ("a", "b"):
        image(tmp_path / name / "shape.bmp", "red")
    (tmp_path / "data").mkdir()
    train = tmp_path / "data" / "train.jsonl"
    train.write_text(RECORD + "\n")
    (tmp_path / "data" / "images").symlink_to(tmp_path / "a", target_is_directory=True)
    before = dataset_key(train, DataConfig())

    (tmp_path / "data" / "images").unlink()
    (tmp_path / "data" / "images").symlink_to(tmp_path / "b", target_is_directory=True)
    assert dataset_key(train, DataConfig()) != before


def test_an_image_folder_linked_from_an_allowed_root_is_followed(tmp_path: Path) -> None:
    """images/ is a symlink into a shared mount (data.allowed_roots: validation refuses a link that leads anywhere
    else). An image changed behind the link changes the key; so does pointing the link at another folder of that
    mount, whose files did not change. What else the mount holds is not looked at."""
    shared = tmp_path / "shared"
    image(shared / "v1" / "shape.bmp", "red")
    image(shared / "v2" / "shape.bmp", "blue")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(RECORD)
    (tmp_path / "data" / "images").symlink_to(shared / "v1", target_is_directory=True)
    data = DataConfig(allowed_roots=[str(shared)])
    first = dataset_key(tmp_path / "data" / "train.jsonl", data)

    image(shared / "v1" / "other.bmp", "green")
    image(shared / "v3" / "shape.bmp", "green")
    assert dataset_key(tmp_path / "data" / "train.jsonl", data) == first

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


def test_an_image_is_stated_once_with_the_answers_of_is_file_and_stat(tmp_path: Path) -> None:
    """The key stats each image once: a file gives its stat data, and a folder, a link to one, nothing there or a
    path through a file give "missing", as `is_file` and then `stat` did."""
    file = image(tmp_path / "shape.bmp", "red")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder-link").symlink_to(tmp_path / "folder")
    (tmp_path / "file-link").symlink_to(file)
    for name in ("shape.bmp", "file-link", "folder", "folder-link", "absent.bmp", "shape.bmp/x.bmp"):
        path = tmp_path / name
        assert image_stat_data(str(path)) == (stat_data(path) if path.is_file() else "missing"), name
    assert image_stat_data(str(file)) != "missing"


def test_a_record_naming_a_folder_changes_the_key_when_a_file_takes_its_place(tmp_path: Path) -> None:
    """A record names images/shape.bmp while it is a folder (validation finds no image there); once the folder is
    replaced by an image, validation's answer is another, and so is the key."""
    folder = tmp_path / "data"
    (folder / "images" / "shape.bmp").mkdir(parents=True)
    train = folder / "train.jsonl"
    train.write_text(RECORD + "\n")
    before = dataset_key(train, DataConfig())

    (folder / "images" / "shape.bmp").rmdir()
    image(folder / "images" / "shape.bmp", "red")
    assert dataset_key(train, DataConfig()) != before


def test_a_model_folders_key_follows_its_files_and_links_and_nothing_else(tmp_path: Path) -> None:
    """The model folder's key: the same for an untouched folder; another for a file rewritten with its size (also
    through a link), a new file in a linked folder, a link pointed elsewhere or a new file, a link that leads to no
    file or a fifo (which the steps refuse to read); the same again for what the walk leaves out (tool metadata, a
    partial download, a written folder)."""
    model, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    weights = image(model / "weights.bmp", "red")
    shared = image(elsewhere / "v1" / "tokenizer.bmp", "red")
    image(elsewhere / "v2" / "tokenizer.bmp", "red")
    (model / "config.json").write_text("{}")
    (model / "tokenizer.bmp").symlink_to(shared)
    (model / "vision").symlink_to(elsewhere / "v1", target_is_directory=True)
    outputs = (model / "outputs").resolve()  # as FileContents passes the written folders
    before = folder_stat_fingerprint(model, [outputs])
    assert folder_stat_fingerprint(model, [outputs]) == before

    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (model / ".weights.bmp.part").write_bytes(b"half")
    (outputs / "runs").mkdir(parents=True)
    (outputs / "runs" / "result.json").write_text("{}")
    assert folder_stat_fingerprint(model, [outputs]) == before

    (model / "dangling").symlink_to(tmp_path / "nowhere")
    keys = [before, folder_stat_fingerprint(model, [outputs])]
    (model / "dangling").unlink()
    (model / "dangling").symlink_to(tmp_path / "elsewhere-gone")  # a broken link by where it leads
    keys.append(folder_stat_fingerprint(model, [outputs]))
    (model / "loop").symlink_to(model / "loop")  # no file either, and no error for the key
    keys.append(folder_stat_fingerprint(model, [outputs]))
    os.mkfifo(model / "fifo")
    keys.append(folder_stat_fingerprint(model, [outputs]))
    rewrite(weights, "blue")
    keys.append(folder_stat_fingerprint(model, [outputs]))
    rewrite(shared, "blue")  # behind the link: stat follows it
    keys.append(folder_stat_fingerprint(model, [outputs]))
    image(elsewhere / "v1" / "deep" / "patch.bmp", "red")  # a new file in the linked folder: it is walked
    keys.append(folder_stat_fingerprint(model, [outputs]))
    (elsewhere / "v1" / "deep" / "up").symlink_to(model, target_is_directory=True)  # a loop: not followed round
    assert folder_stat_fingerprint(model, [outputs]) != keys[-1]  # the link itself is in the key
    (elsewhere / "v1" / "deep" / "up").unlink()
    assert folder_stat_fingerprint(model, [outputs]) == keys[-1]
    (model / "vision").unlink()
    (model / "vision").symlink_to(elsewhere / "v2", target_is_directory=True)
    keys.append(folder_stat_fingerprint(model, [outputs]))
    (model / "extra.json").write_text("{}")
    keys.append(folder_stat_fingerprint(model, [outputs]))
    assert len(set(keys)) == len(keys), keys


def test_a_model_folders_key_names_a_subfolder_it_cannot_list_and_passes_over_one_it_leaves_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.walk passed over a folder it could not list: the key was that of the folder without those files, and a
    step reused a result computed without them. It is refused by name now (Prefect logs it and runs the step, which
    reads the folder and stops with the same words); a folder the walk leaves out (.git) is not listed, so no matter.
    Tests run as root, which lists any folder: `os.scandir`, what os.walk lists with, fails on the chosen ones."""
    model = tmp_path.resolve() / "model"  # as the walk names its folders
    image(model / "vision" / "weights.bmp", "red")
    (model / ".git" / "objects").mkdir(parents=True)
    locked = {str(model / "vision"), str(model / ".git")}
    scandir = os.scandir

    def listing(path: Any = ".") -> Any:
        if os.fspath(path) in locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", listing)
    with pytest.raises(UserInputError) as refused:
        folder_stat_fingerprint(model)
    assert str(refused.value) == (
        f"cannot list folder {model}/vision (Permission denied): give read permission or remove it from the input"
    )
    locked.remove(str(model / "vision"))
    folder_stat_fingerprint(model)  # .git is left out of the walk: never listed


def test_a_dataset_folders_key_follows_its_parts_and_their_images_and_nothing_else(tmp_path: Path) -> None:
    """data.train a folder of parts: the key is each part as validation lists it (a part added, changed or renamed is
    a change) and the images its records name (also outside the folder, in data.allowed_roots); a README beside the
    parts, which validation does not read, is no change."""
    shared, train = tmp_path / "shared", tmp_path / "train"
    picture = image(shared / "shape.bmp", "red")
    train.mkdir()
    (train / "part-0000.jsonl").write_text(ask(str(picture)) + "\n")
    (train / "README.md").write_text("parts of the training set\n")
    data = DataConfig(allowed_roots=[str(shared)])
    keys = [dataset_key(train, data)]

    (train / "README.md").write_text("parts of the training set, edited\n")
    assert dataset_key(train, data) == keys[-1]
    rewrite(picture, "blue")
    keys.append(dataset_key(train, data))
    (train / "part-0001.jsonl").write_text(ask(str(picture)) + "\n")
    keys.append(dataset_key(train, data))
    (train / "part-0001.jsonl").write_text(ask(str(picture)) + "\n" + ask(str(picture)) + "\n")
    keys.append(dataset_key(train, data))
    (train / "part-0001.jsonl").rename(train / "part-0002.jsonl")
    keys.append(dataset_key(train, data))
    assert len(set(keys)) == len(keys), keys


def test_a_dataset_folder_validation_refuses_has_a_key_that_says_why(tmp_path: Path) -> None:
    """No dataset files in it, or a broken link among its parts: the key is the refusal (the step then runs and stops
    with it), not a Prefect traceback, nor a key that would pass for the folder's data."""
    train = tmp_path / "train"
    train.mkdir()
    assert dataset_key(train, DataConfig()) != dataset_key(tmp_path / "other", DataConfig())
    empty = dataset_key(train, DataConfig())
    (train / "part-0000.jsonl").symlink_to(tmp_path / "gone.jsonl")
    assert dataset_key(train, DataConfig()) not in (empty, None)


def test_a_part_added_to_the_dataset_folder_is_validated_again(
    tmp_path: Path, prefect_harness: None, tiny_model: Path
) -> None:
    """The validate step on data.train and data.eval folders: cached while the parts stay as they are, run again (its
    snapshot holding the new records) once a part is added."""
    from prefect import flow
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    train, evals = tmp_path / "data" / "train", tmp_path / "data" / "eval"
    image(train / "images" / "shape.bmp", "red")
    (train / "part-0000.jsonl").write_text(RECORD + "\n")
    image(evals / "images" / "shape.bmp", "red")
    (evals / "part-0000.jsonl").write_text(RECORD + "\n")
    args = (DataConfig(), str(train), str(evals), str(tiny_model), str(tmp_path / "outputs"), None, StorageConfig(), 0)

    @flow
    def validate_thrice() -> list[tuple[str | None, int]]:
        states = []
        for run in range(3):
            if run == 2:
                (train / "part-0001.jsonl").write_text(RECORD + "\n" + RECORD + "\n")
            state = validate_dataset(*args, return_state=True)
            states.append((state.name, state.result().report.splits["train"].records))
        return states

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        assert validate_thrice() == [("Completed", 1), ("Cached", 1), ("Completed", 3)]


def test_a_file_a_dataset_folder_holds_under_two_names_is_named_once_a_step_run(
    tmp_path: Path, prefect_harness: None, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """data.train a folder with `latest.jsonl -> part-0000.jsonl` and two links to one folder of parts: the validate
    step's key lists the folder as validation does, and said so too, so the flow's log named each twice. The key
    lists it without a word; validation names each once."""
    from prefect import flow
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    train, evals, parts = tmp_path / "data" / "train", tmp_path / "data" / "eval", tmp_path / "elsewhere" / "parts"
    for folder in (train, evals, parts):
        image(folder / "images" / "shape.bmp", "red")
        (folder / "part-0000.jsonl").write_text(RECORD + "\n")
    (train / "latest.jsonl").symlink_to("part-0000.jsonl")
    (train / "more").symlink_to(parts)
    (train / "zz-again").symlink_to(parts)
    args = (DataConfig(), str(train), str(evals), str(tiny_model), str(tmp_path / "outputs"), None, StorageConfig(), 0)

    @flow
    def validate_once() -> str:
        return validate_dataset(*args, return_state=True).name

    with (
        temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}),
        caplog.at_level(logging.WARNING, logger="vlmops"),
    ):
        assert validate_once() == "Completed"
    real = train.resolve()
    assert sorted(r.getMessage() for r in caplog.records if r.name.startswith("vlmops")) == [
        f"{train}/part-0000.jsonl is {train}/latest.jsonl by another name (both lead to {real}/part-0000.jsonl): "
        "not read twice",
        f"{train}/zz-again links to {parts.resolve()}, already read as {train}/more: not read twice",
    ]


@pytest.mark.integration
def test_an_s3_datasets_key_follows_its_parts_and_the_images_they_name(
    tmp_path: Path, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.train an s3:// prefix: the key is each part's key, size and ETag as one listing gives them, and those of
    each image its records name: a part replaced by one of the same size, a named image beside the parts replaced, a
    part added change it; the same objects listed again, or again as they were, do not. A prefix validation refuses is its reason; with S3 out of reach the key
    is one no run has had, so nothing is reused (and no traceback comes from computing it)."""
    client = s3_env.client()
    client.create_bucket(Bucket="key-listing")
    uri = "s3://key-listing/train"

    def put(name: str, body: bytes) -> None:
        client.put_object(Bucket="key-listing", Key=f"train/{name}", Body=body)

    def bmp(colour: str) -> bytes:
        return image(tmp_path / f"{colour}.bmp", colour).read_bytes()

    put("part-0000.jsonl", f"{RECORD}\n".encode())
    put("images/shape.bmp", bmp("red"))
    keys = [dataset_key(uri, DataConfig())]
    assert dataset_key(f"{uri}/", DataConfig()) == keys[0]
    put("part-0000.jsonl", f"{RECORD.replace('red', 'tan')}\n".encode())  # the same size
    keys.append(dataset_key(uri, DataConfig()))
    put("images/shape.bmp", bmp("blue"))  # the same size
    keys.append(dataset_key(uri, DataConfig()))
    put("part-0001.jsonl", f"{RECORD}\n".encode())
    keys.append(dataset_key(uri, DataConfig()))
    keys.append(dataset_key(f"{uri}/part-0001.jsonl", DataConfig()))  # one object, by itself
    assert len(set(keys)) == len(keys), keys
    client.delete_object(Bucket="key-listing", Key="train/part-0001.jsonl")
    assert dataset_key(uri, DataConfig()) == keys[2]
    assert dataset_key("s3://key-listing/nothing", DataConfig()) not in (None, *keys)
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{sock.getsockname()[1]}")
    unreachable = {dataset_key(uri, DataConfig()) for _ in range(2)}
    assert len(unreachable) == 2 and not unreachable & set(keys)


@pytest.mark.integration
def test_the_validate_step_on_an_s3_prefix_makes_the_local_copys_snapshot_and_runs_again_once_an_object_changes(
    tmp_path: Path, prefect_harness: None, tiny_model: Path, s3_env: S3Server
) -> None:
    """data.train and data.eval as s3:// prefixes of parts with relative images (was "data.train: s3:/... does not
    exist"): the snapshot is the one the same files make read locally (its name is its content's hash); cached while
    the objects stay as they are, run again once one is replaced."""
    from prefect import flow
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from vlmops.storage import upload_folder

    local = tmp_path / "local"
    for split in ("train", "eval"):
        image(local / split / "images" / "shape.bmp", "red")
        (local / split / "part-0000.jsonl").write_text(f"{RECORD}\n{ask('images/shape.bmp')}\n")
        (local / split / "part-0001.json").write_text(json.dumps([json.loads(RECORD)]))
    client = s3_env.client()
    client.create_bucket(Bucket="validate-step")
    upload_folder(client, local, "s3://validate-step/data", progress=False)
    common = (str(tiny_model), str(tmp_path / "outputs"), None, StorageConfig(), 0)
    on_s3 = (DataConfig(), "s3://validate-step/data/train", "s3://validate-step/data/eval", *common)
    on_disk = (DataConfig(), str(local / "train"), str(local / "eval"), *common)

    @flow
    def validate_runs() -> list[tuple[str | None, str, int]]:
        runs = []
        for run in range(4):
            if run == 3:  # the training images, replaced by another of the same size
                blue = image(tmp_path / "blue.bmp", "blue")
                client.upload_file(str(blue), "validate-step", "data/train/images/shape.bmp")
            state = validate_dataset(*(on_disk if run == 0 else on_s3), return_state=True)
            prepared = state.result()
            runs.append((state.name, prepared.content_hash, prepared.report.splits["train"].records))
        return runs

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        (local_run, first, again, changed) = validate_runs()
    assert local_run[0] == first[0] == "Completed" and local_run[1] == first[1]
    assert again == ("Cached", first[1], 3)
    assert changed[0] == "Completed" and changed[1] != first[1] and changed[2] == 3


def validate_runs(
    tmp_path: Path, tiny_model: Path, train: str, evals: str, changes: list[Any]
) -> list[tuple[str, str]]:
    """The validate step run once, then once after each of `changes` (a callable, or None for no change) in one flow:
    each run's state name and snapshot hash."""
    from prefect import flow
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    args = (DataConfig(), train, evals, str(tiny_model), str(tmp_path / "outputs"), None, StorageConfig(), 0)

    @flow
    def runs() -> list[tuple[str, str]]:
        found = []
        for change in [None, *changes]:
            if change is not None:
                change()
            state = validate_dataset(*args, return_state=True)
            found.append((str(state.name), state.result().content_hash))
        return found

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        return runs()


@pytest.mark.integration
def test_the_validate_step_on_one_s3_object_runs_again_once_an_image_beside_it_is_replaced(
    tmp_path: Path, prefect_harness: None, tiny_model: Path, s3_env: S3Server
) -> None:
    """data.train and data.eval single objects whose records name images/shape.bmp beside them: cached while it stays,
    run again once it is replaced by another of the same size (was Cached: the key was the dataset object's ETag alone,
    and the model trained on the old image)."""
    client = s3_env.client()
    client.create_bucket(Bucket="one-object")
    for split in ("train", "eval"):
        client.put_object(Bucket="one-object", Key=f"data/{split}.jsonl", Body=f"{RECORD}\n".encode())
    client.upload_file(str(image(tmp_path / "red.bmp", "red")), "one-object", "data/images/shape.bmp")

    def replace_image() -> None:
        client.upload_file(str(image(tmp_path / "blue.bmp", "blue")), "one-object", "data/images/shape.bmp")

    first, again, replaced = validate_runs(
        tmp_path,
        tiny_model,
        "s3://one-object/data/train.jsonl",
        "s3://one-object/data/eval.jsonl",
        [None, replace_image],
    )
    assert first[0] == "Completed" and again == ("Cached", first[1])
    assert replaced[0] == "Completed" and replaced[1] != first[1]


@pytest.mark.integration
def test_the_validate_step_on_an_s3_prefix_follows_the_images_its_records_name_and_nothing_else_there(
    tmp_path: Path, prefect_harness: None, tiny_model: Path, s3_env: S3Server
) -> None:
    """data.train a prefix whose records name an image beside the parts and one in another bucket: a README added
    under the prefix leaves the step cached (was Completed: every object under the prefix was in the key); the image
    in the other bucket replaced by another of the same size runs it again (was Cached: it was not in the key)."""
    client = s3_env.client()
    for bucket in ("named-data", "named-images"):
        client.create_bucket(Bucket=bucket)
    parts = f"{RECORD}\n{ask('s3://named-images/shape.bmp')}\n"
    client.put_object(Bucket="named-data", Key="train/part-0000.jsonl", Body=parts.encode())
    client.put_object(Bucket="named-data", Key="eval/part-0000.jsonl", Body=f"{RECORD}\n".encode())
    red = image(tmp_path / "red.bmp", "red")
    for bucket, key in (("named-data", "train/images/shape.bmp"), ("named-data", "eval/images/shape.bmp")):
        client.upload_file(str(red), bucket, key)
    client.upload_file(str(red), "named-images", "shape.bmp")

    def add_readme() -> None:
        client.put_object(Bucket="named-data", Key="train/README.md", Body=b"# The training parts\n")

    def replace_other_buckets_image() -> None:
        client.upload_file(str(image(tmp_path / "blue.bmp", "blue")), "named-images", "shape.bmp")

    first, readme, replaced = validate_runs(
        tmp_path, tiny_model, "s3://named-data/train", "s3://named-data/eval", [add_readme, replace_other_buckets_image]
    )
    assert first[0] == "Completed" and readme == ("Cached", first[1])
    assert replaced[0] == "Completed" and replaced[1] != first[1]


@pytest.mark.integration
def test_an_s3_image_a_local_dataset_names_is_in_its_key_by_its_etag(
    tmp_path: Path, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local dataset file naming s3://bucket/shape.bmp: the image is in the key by its size and ETag (one HEAD, not
    downloaded): not there, there, replaced by another of the same size are three keys; the same object asked again is
    the same key. With S3 out of reach the key is one no run has had."""
    client = s3_env.client()
    client.create_bucket(Bucket="local-names")
    train = tmp_path / "train.jsonl"
    train.write_text(ask("s3://local-names/shape.bmp") + "\n")
    keys = [dataset_key(train, DataConfig())]
    client.upload_file(str(image(tmp_path / "red.bmp", "red")), "local-names", "shape.bmp")
    keys.append(dataset_key(train, DataConfig()))
    assert dataset_key(train, DataConfig()) == keys[-1]
    client.upload_file(str(image(tmp_path / "blue.bmp", "blue")), "local-names", "shape.bmp")
    keys.append(dataset_key(train, DataConfig()))
    assert len(set(keys)) == len(keys), keys
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{sock.getsockname()[1]}")
    unreachable = {dataset_key(train, DataConfig()) for _ in range(2)}
    assert len(unreachable) == 2 and not unreachable & set(keys)


def beside_one_object(client: Any, bucket: str) -> str:
    """s3://BUCKET/data/train.jsonl, whose records name 24 images beside it (three twice, one not there), one outside
    its prefix (a refusal), one in another bucket and a broken line among them: each named image one HEAD."""
    for name in (bucket, f"{bucket}-other"):
        client.create_bucket(Bucket=name)
    for i in range(23):
        client.put_object(Bucket=bucket, Key=f"data/images/{i:02d}.bmp", Body=f"image {i}".encode() * (i + 1))
    client.put_object(Bucket=f"{bucket}-other", Key="shape.bmp", Body=b"another bucket's image")
    lines = [ask(f"images/{i:02d}.bmp") for i in range(12)]
    lines += ["{oops", ask("../secret.bmp"), ask("images/missing.bmp"), ask(f"s3://{bucket}-other/shape.bmp")]
    lines += [ask(f"images/{i:02d}.bmp") for i in (3, 12, 5, 13)]
    lines += [ask(f"images/{i:02d}.bmp") for i in range(14, 23)] + [ask("images/07.bmp")]
    client.put_object(Bucket=bucket, Key="data/train.jsonl", Body="\n".join(lines).encode() + b"\n")
    return f"s3://{bucket}/data/train.jsonl"


@pytest.mark.integration
def test_the_images_beside_one_s3_object_are_looked_up_at_once_for_the_same_key(s3_env: S3Server) -> None:
    """One s3:// object whose records name images beside it: each image one HEAD (no listing answers for them), at most
    HEAD_THREADS of them in flight at once (were one at a time: a thousand images were a thousand round trips in a
    row), and the key byte for byte the one the sequential code computed (pinned: the words in record order, whatever
    order the answers come in)."""
    uri = beside_one_object(s3_env.client(), "heads-at-once")
    with watched_requests(delay_s=0.05) as requests:
        key = fingerprint(uri, dataset=True)
    assert key == "545eeb730bc11446574e15ab41a01d5f2f2cc62f0348f0e7de6134adbc856faf"  # the sequential code's
    named = {*(f"data/images/{i:02d}.bmp" for i in range(23)), "data/images/missing.bmp", "shape.bmp"}
    assert sorted(requests.of("HeadObject")) == sorted(named)
    assert requests.most_at_once > 1
    from vlmops.fingerprints import HEAD_THREADS  # (here: the sequential code, which pins the key, has none)

    assert requests.most_at_once <= HEAD_THREADS


@pytest.mark.integration
def test_each_s3_dataset_object_is_read_once_for_the_key(s3_env: S3Server) -> None:
    """The key of a prefix of .json parts (one that does not parse) and a .jsonl part: one GET each (the .json one was read twice: once to find
    whether the whole list parses, once for its records), the key as before (pinned: the sequential code's)."""
    client = s3_env.client()
    client.create_bucket(Bucket="read-once")
    records = [json.loads(RECORD), json.loads(ask("images/shape.bmp")), "not a record"]
    client.put_object(Bucket="read-once", Key="data/train.json", Body=json.dumps(records, indent=1).encode())
    client.put_object(Bucket="read-once", Key="data/more.jsonl", Body=f"{RECORD}\n".encode())
    client.put_object(Bucket="read-once", Key="data/broken.json", Body=f"[{RECORD},\n{{oops".encode())
    client.put_object(Bucket="read-once", Key="data/images/shape.bmp", Body=b"an image")
    with watched_requests() as requests:
        key = fingerprint("s3://read-once/data", dataset=True)
    assert key == "6afcfbbeeb89c4ad6f0c066403d3abaf9e5d954043998cd658341b2a67e39dca"  # the sequential code's
    assert requests.of("GetObject") == ["data/broken.json", "data/more.jsonl", "data/train.json"]


@pytest.mark.integration
def test_a_head_that_fails_in_the_keys_threads_names_its_image_and_the_record(s3_env: S3Server) -> None:
    """An error a HEAD meets is raised as it was (an outage, by its type, still gives a key no run has had), with the
    image and the file:line of the record that names it first: the key's own thread did not send that request."""
    uri = beside_one_object(s3_env.client(), "head-fails")
    with (
        watched_requests(fail={"data/images/13.bmp": RuntimeError("the server fell over")}),
        pytest.raises(RuntimeError, match="the server fell over") as raised,
    ):
        fingerprint(uri, dataset=True)
    assert raised.value.__notes__ == [
        "while looking up image s3://head-fails/data/images/13.bmp (named at s3://head-fails/data/train.jsonl:20) for a "
        "cache key"
    ]


def test_an_s3_param_that_is_not_a_dataset_is_refused_with_the_fix() -> None:
    """No step passes one (its model, config and run folder are local by then), so the key of its listing alone
    (`s3_fingerprint`) is gone: a step that came to pass one is told how to key it."""
    with pytest.raises(ValueError, match="s3://models/m: the cache key follows an s3:// param only as a dataset; list"):
        fingerprint("s3://models/m", dataset=False)
