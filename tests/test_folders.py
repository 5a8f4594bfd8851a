"""A folder someone gave is read whole: files in a symlinked subfolder are found, hashed and uploaded, once each; a
broken link (or a named pipe) among the files a step would read, or a subfolder that cannot be listed, is refused,
named, before the step starts. A linked file is read by its own name (a hub cache's blob has none to go by)."""

from __future__ import annotations

import errno
import glob
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlmops.config import StorageConfig
from vlmops.data.formats import dataset_files
from vlmops.data.prepare import snapshot_hash
from vlmops.errors import UserInputError
from vlmops.folders import files_under, listed_matching
from vlmops.infer.inputs import find_inputs
from vlmops.infer.planning import folder_hash
from vlmops.infer.shards import read_shard, scan_input
from vlmops.models.manifest import model_files
from vlmops.storage import s3_client, upload_folder


def _tree(tmp_path: Path) -> Path:
    """in/a.jsonl, in/more -> elsewhere/batch (b.jsonl, deep/c.jsonl), in/again -> the same folder, in/up -> in."""
    batch = tmp_path / "elsewhere" / "batch"
    (batch / "deep").mkdir(parents=True)
    (batch / "b.jsonl").write_text("{}\n")
    (batch / "deep" / "c.jsonl").write_text("{}\n")
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jsonl").write_text("{}\n")
    (root / "more").symlink_to(batch)
    (root / "zz-again").symlink_to(batch)
    (root / "up").symlink_to(root)
    return root


def test_files_in_a_linked_folder_are_found_once_and_a_loop_is_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vlmops.folders"):
        found = [p.relative_to(root).as_posix() for p in files_under(root)]
    assert found == ["a.jsonl", "more/b.jsonl", "more/deep/c.jsonl"]
    warned = sorted(r.getMessage() for r in caplog.records)
    batch = (tmp_path / "elsewhere" / "batch").resolve()
    assert warned == [
        f"{root / 'up'} links to {root.resolve()}, already read as {root}: not read twice",
        f"{root / 'zz-again'} links to {batch}, already read as {root / 'more'}: not read twice",
    ]


def test_a_folder_reached_under_two_names_is_read_under_the_first_in_sorted_order(tmp_path: Path) -> None:
    """in/a/b/ and in/z -> in/a/b: the walk chose as it listed each folder, so in/z (listed with in/) took the folder
    before in/a/b (listed with in/a/) was come to, and a folder input named its files z/..., not by their own path."""
    root = tmp_path.resolve() / "in"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "x.jsonl").write_text("{}\n")
    (root / "z").symlink_to(root / "a" / "b")
    assert [f.name for f in find_inputs(str(root))] == ["a/b/x.jsonl"]
    assert [f.uri for f in find_inputs(str(root / "**" / "*.jsonl"))] == [f"{root}/a/b/x.jsonl"]


def test_a_glob_reads_a_folder_linked_twice_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`in/**/*.jsonl` over in/more and in/zz-again, both links to elsewhere/batch: glob.glob matched its files under
    both names, and the job read each record twice (results + rejects > records). Each file is read once now, under
    the first name in sorted order, as a folder input reads it; the other link is named in the log."""
    root = _tree(tmp_path.resolve())
    (root / "up").unlink()  # the loop: the next test
    with caplog.at_level(logging.WARNING, logger="vlmops.folders"):
        assert _records(str(root / "**" / "*.jsonl")) == [
            (f"{root}/a.jsonl:1", "a.jsonl:1"),
            (f"{root}/more/b.jsonl:1", "more/b.jsonl:1"),
            (f"{root}/more/deep/c.jsonl:1", "more/deep/c.jsonl:1"),
        ]
        assert [f.uri for f in find_inputs(str(root / "*" / "b.jsonl"))] == [f"{root}/more/b.jsonl"]  # no `**`: once
    assert {r.getMessage() for r in caplog.records} == {
        f"{root}/zz-again links to {tmp_path.resolve()}/elsewhere/batch, already read as {root}/more: not read twice"
    }


def test_a_link_loop_under_a_glob_is_left_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """in/up -> in under `in/**/*.jsonl`: glob.glob went round it until the system refused (40 links deep), and the
    job read in/'s files 41 times, as a.jsonl, up/a.jsonl, up/up/a.jsonl, ... Now the link is named and left."""
    root = _tree(tmp_path.resolve())
    with caplog.at_level(logging.WARNING, logger="vlmops.folders"):
        assert [f.name for f in find_inputs(str(root / "**" / "*.jsonl"))] == [
            "a.jsonl",
            "more/b.jsonl",
            "more/deep/c.jsonl",
        ]
    assert f"{root}/up links to {root}, already read as {root}: not read twice" in caplog.messages


def test_a_file_an_input_holds_under_two_names_is_read_once_under_the_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`in/a.jsonl -> b.jsonl` beside it, `in/sub/c.jsonl -> ../c.jsonl` (a hub snapshot's or a DVC checkout's own
    links): a folder input and a glob read each such file under both names, and the job answered its records twice.
    Each is read once now, under its first name in sorted order (a link too), the other name logged, as a dataset
    folder reads it."""
    root = tmp_path.resolve() / "in"
    (root / "sub").mkdir(parents=True)
    (root / "b.jsonl").write_text('{"id": "b"}\n')
    (root / "a.jsonl").symlink_to("b.jsonl")
    (root / "c.jsonl").write_text('{"id": "c"}\n')
    (root / "sub" / "c.jsonl").symlink_to(root / "c.jsonl")
    twice = {
        "b": f"{root}/b.jsonl is {root}/a.jsonl by another name (both lead to {root}/b.jsonl): not read twice",
        "c": f"{root}/sub/c.jsonl is {root}/c.jsonl by another name (both lead to {root}/c.jsonl): not read twice",
    }
    once = [(f"{root}/a.jsonl:1", "a.jsonl:1"), (f"{root}/c.jsonl:1", "c.jsonl:1")]
    for spec, records, warned in (
        (root, once, ["b", "c"]),
        (root / "**" / "*.jsonl", once, ["b", "c"]),
        (root / "*.jsonl", once, ["b"]),
        (root / "sub" / "*.jsonl", [(f"{root}/sub/c.jsonl:1", "c.jsonl:1")], []),  # one name there
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vlmops"):
            assert _records(str(spec)) == records, spec
        assert caplog.messages == [twice[name] for name in warned], spec
    assert [p.relative_to(root).as_posix() for p in dataset_files([root])] == ["a.jsonl", "c.jsonl"]


def test_a_glob_matches_what_glob_glob_matches_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a tree without links, the walk matches the files glob.glob matches (hidden names, `**` at any place, a
    pattern relative to the working folder, a backslash as a character), each once: glob.glob itself gave
    `b/b/b.jsonl` twice for `**/b/**/*`. But for a file that glob.glob gives as a folder, with a `/` after it, where a
    `**` at the pattern's end took no folder (`x/c.jsonl/` for `*/c.jsonl/**`): a file holds none, and is not
    matched."""
    files = [
        *("a.jsonl", "b.json", ".h.jsonl", "x/c.jsonl", "x/.d.jsonl", "x/y/e.jsonl", ".hid/f.jsonl", "b/b/b.jsonl"),
        "w\\x.jsonl",
    ]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    patterns = [
        "*",
        "**",
        "**/*.jsonl",
        "*/*.jsonl",
        "x/**",
        "*/**",
        ".*",
        "**/.*",
        ".*/*",
        "**/b/**/*.jsonl",
        "[ab]*",
        "x/?/*",
        "w\\*",
    ]
    for pattern in [*patterns, *(f"{tmp_path}/{pattern}" for pattern in patterns)]:
        globbed = {Path(p) for p in glob.glob(pattern, recursive=True) if not p.endswith("/")}  # noqa: PTH207
        assert listed_matching(Path(pattern)) == sorted(p for p in globbed if not p.is_dir()), pattern
    assert [f.uri for f in find_inputs(str(tmp_path / "**" / "b" / "**" / "*.jsonl"))] == [f"{tmp_path}/b/b/b.jsonl"]
    assert [f.name for f in find_inputs(str(tmp_path / "w\\*"))] == ["w\\x.jsonl"]
    assert glob.glob("*/c.jsonl/**", recursive=True) == ["x/c.jsonl/"]  # noqa: PTH207
    assert listed_matching(Path("*/c.jsonl/**")) == []


def test_a_folder_a_glob_reaches_under_two_names_keeps_each_match(tmp_path: Path) -> None:
    """A folder is walked once for each place in the pattern its names reach: in/a -> X does not match
    `in/**/b/*.jsonl`, in/c/b -> X does; walked once (as in/a) it would have left X's file out."""
    root = tmp_path.resolve() / "in"
    (tmp_path / "X").mkdir()
    (tmp_path / "X" / "x.jsonl").write_text("{}\n")
    (root / "c").mkdir(parents=True)
    (root / "a").symlink_to(tmp_path / "X")
    (root / "c" / "b").symlink_to(tmp_path / "X")
    assert [f.name for f in find_inputs(str(root / "**" / "b" / "*.jsonl"))] == ["x.jsonl"]
    assert [f.uri for f in find_inputs(str(root / "**" / "b" / "*.jsonl"))] == [f"{root}/c/b/x.jsonl"]


def test_a_dotdot_after_a_wildcard_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "in" / "x").mkdir(parents=True)
    (tmp_path / "in" / "a.jsonl").write_text("{}\n")
    pattern = tmp_path / "in" / "*" / ".." / "a.jsonl"
    with pytest.raises(UserInputError) as refused:
        find_inputs(str(pattern))
    assert str(refused.value) == (
        f"{pattern}: a '..' after a wildcard is not followed (a folder's walk lists no '..'): write the folder it "
        "leads to instead"
    )


def test_batch_inputs_and_dataset_folders_read_their_linked_subfolder(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert [f.name for f in find_inputs(str(root))] == ["a.jsonl", "more/b.jsonl", "more/deep/c.jsonl"]
    assert [p.relative_to(root).as_posix() for p in dataset_files([root])] == [
        "a.jsonl",
        "more/b.jsonl",
        "more/deep/c.jsonl",
    ]


def test_a_model_folders_hash_sees_a_file_in_a_linked_subfolder(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "preprocessor_config.json").write_text('{"size": 384}')
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "processor").symlink_to(shared)
    first = folder_hash(model)
    (shared / "preprocessor_config.json").write_text('{"size": 1024}')
    assert folder_hash(model) != first


def _broken(root: Path, name: str, tmp_path: Path) -> tuple[Path, Path]:
    """`root/name` -> tmp_path/gone/name, which is not there (a mount gone, a file moved): (link, target)."""
    link, target = root / name, tmp_path / "gone" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link, target


def _refused(link: Path, target: Path) -> str:
    return f"{link} is a broken symlink to {target} (No such file or directory): restore the target or remove the link"


def test_a_broken_link_among_the_inputs_is_refused_by_name_not_left_out(tmp_path: Path) -> None:
    """A batch input folder, a glob and a dataset folder with `part3.jsonl -> /mnt/gone/part3.jsonl` in it: the job
    ran on fewer records without a word; now each names the link, where it leads and the fix."""
    root = _tree(tmp_path.resolve())  # the folder branch names files under the resolved root
    link, target = _broken(root / "more" / "deep", "part3.jsonl", tmp_path)  # behind the linked folder: named so
    for read in (
        lambda: find_inputs(str(root)),
        lambda: find_inputs(str(root / "more" / "**" / "*.jsonl")),
        lambda: dataset_files([root]),
        lambda: folder_hash(root),
    ):
        with pytest.raises(UserInputError) as refused:
            read()
        assert str(refused.value) == f"cannot read 1 file: {_refused(link, target)}"


def test_a_broken_link_named_as_the_input_says_where_it_leads(tmp_path: Path) -> None:
    link, target = _broken(tmp_path, "prompts.jsonl", tmp_path)
    for read in (lambda: find_inputs(str(link)), lambda: dataset_files([link])):
        with pytest.raises(UserInputError) as refused:
            read()
        assert str(refused.value) == f"cannot read 1 file: {_refused(link, target)}"


def test_a_broken_link_the_step_would_not_read_is_no_matter(tmp_path: Path) -> None:
    """Inputs are .jsonl/.json: a broken `notes.txt` link beside them is not read, so it stops nothing."""
    root = _tree(tmp_path)
    _broken(root, "notes.txt", tmp_path)
    _broken(root, ".cache/old.jsonl.tmp", tmp_path)
    assert [f.name for f in find_inputs(str(root))] == ["a.jsonl", "more/b.jsonl", "more/deep/c.jsonl"]
    assert [f.name for f in find_inputs(str(root / "*"))] == ["a.jsonl"]
    assert len(dataset_files([root])) == 3
    assert [p.name for p in files_under(root, reads=lambda p: p.suffix == ".jsonl")] == [
        "a.jsonl",
        "b.jsonl",
        "c.jsonl",
    ]
    with pytest.raises(
        UserInputError, match=r"cannot read 2 files: .*/\.cache/old\.jsonl\.tmp is a broken .*/notes\.txt"
    ):
        files_under(root)  # every file read: both count


def test_a_named_pipe_or_a_link_loop_among_the_inputs_is_refused(tmp_path: Path) -> None:
    """Reading a named pipe would wait for a writer for ever; a link that leads round in a loop leads to no file."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("{}\n")
    os.mkfifo(tmp_path / "in" / "b.jsonl")
    (tmp_path / "in" / "c.json").symlink_to(tmp_path / "in" / "c.json")
    with pytest.raises(UserInputError) as refused:
        find_inputs(str(tmp_path / "in"))
    assert str(refused.value) == (
        f"cannot read 2 files: {tmp_path}/in/b.jsonl is a named pipe, not a file: put the file there or remove it; "
        f"{tmp_path}/in/c.json is a broken symlink to {tmp_path}/in/c.json (Too many levels of symbolic links): "
        "restore the target or remove the link"
    )


def test_a_model_folder_with_a_broken_link_is_neither_hashed_nor_uploaded(tmp_path: Path) -> None:
    """The batch job's model hash, the model manifest and an S3 upload refuse it before reading or sending a byte
    (the client below points at no server: nothing is asked of it)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    link, target = _broken(model, "model-00002-of-00002.safetensors", tmp_path)
    message = f"cannot read 1 file: {_refused(link, target)}"
    client = s3_client(StorageConfig(endpoint_url="http://127.0.0.1:9"))
    for read in (
        lambda: folder_hash(model),
        lambda: model_files(model),
        lambda: upload_folder(client, model, "s3://models/m1", progress=False),
    ):
        with pytest.raises(UserInputError) as refused:
            read()
        assert str(refused.value) == message


def test_a_model_folder_as_a_hub_caches_symlink_farm_is_listed_whole(tmp_path: Path) -> None:
    """A hub cache's snapshot links each file into blobs/, and a folder may link a subfolder in: the manifest lists
    every model file through the links, as the batch job's hash and the upload read them; a blob gone is refused."""
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    snapshot = tmp_path / "hub" / "snapshots" / "abc123"
    (snapshot / "vision").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vision/preprocessor_config.json"):
        blob = blobs / f"sha-{name.replace('/', '-')}"
        blob.write_text(name)
        (snapshot / name).symlink_to(blob)
    shared = tmp_path / "shared-processor"
    shared.mkdir()
    (shared / "processor_config.json").write_text("{}")
    (snapshot / "processor").symlink_to(shared)
    (snapshot / "README.md").write_text("not a model file")
    assert model_files(snapshot) == [
        "config.json",
        "model.safetensors",
        "processor/processor_config.json",
        "tokenizer.json",
        "vision/preprocessor_config.json",
    ]
    (blobs / "sha-tokenizer.json").unlink()
    with pytest.raises(UserInputError, match=f"{snapshot}/tokenizer.json is a broken symlink to {blobs}/sha-tok"):
        model_files(snapshot)


def test_a_prepared_datasets_hash_reads_a_linked_images_folder(tmp_path: Path) -> None:
    """A snapshot folder whose images/ is a link (moved to another disk) keeps the hash it was recorded with."""
    snapshot = tmp_path / "snapshot"
    (snapshot / "images").mkdir(parents=True)
    (snapshot / "train.jsonl").write_text("{}\n")
    (snapshot / "images" / "ab12.png").write_bytes(b"png")
    recorded = snapshot_hash(snapshot)
    (snapshot / "images").rename(tmp_path / "images-elsewhere")
    (snapshot / "images").symlink_to(tmp_path / "images-elsewhere")
    assert snapshot_hash(snapshot) == recorded


def _hub_links(tmp_path: Path) -> Path:
    """snapshot/a.jsonl and snapshot/b.json, each a link into blobs/ (a hub cache's layout: a blob's name is its hash,
    with no suffix); a.jsonl holds two records, b.json a list of one."""
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "3f2a9c").write_text('{"id": "a1", "query": "Hi?"}\n{"id": "a2", "query": "And?"}\n')
    (blobs / "7d41e0").write_text('[{"id": "b1", "query": "Hello?"}]')
    snapshot = tmp_path / "hub" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "a.jsonl").symlink_to("../../blobs/3f2a9c")
    (snapshot / "b.json").symlink_to(blobs / "7d41e0")
    return snapshot.resolve()


def _records(spec: str) -> list[tuple[str, str]]:
    """Each record `find_inputs(spec)` leads to: (where it is, the location its key falls back to)."""
    found = []
    for file in find_inputs(spec):
        scanned, shards = scan_input(file, 0, 10)
        found += [(raw.location, raw.key_location) for shard in shards for raw in read_shard(scanned, shard)]
    return found


def test_a_glob_or_a_file_linked_into_a_hub_caches_blobs_is_read_by_its_own_name(tmp_path: Path) -> None:
    """A glob matched the links and kept those whose target's name ended in .jsonl/.json: a blob's never does, so
    the files were left out without a word; a link given as the input was read by its target's name (the .json
    reader, on a .jsonl file). Each is read by the link's name now, and named by it in the plan and the records."""
    snapshot = _hub_links(tmp_path)
    by_glob = find_inputs(str(snapshot / "*"))
    assert [(f.uri, f.name) for f in by_glob] == [(f"{snapshot}/a.jsonl", "a.jsonl"), (f"{snapshot}/b.json", "b.json")]
    assert _records(str(snapshot / "*.json*")) == [
        (f"{snapshot}/a.jsonl:1", "a.jsonl:1"),
        (f"{snapshot}/a.jsonl:2", "a.jsonl:2"),
        (f"{snapshot}/b.json[0]", "b.json[0]"),
    ]
    assert _records(str(snapshot / "a.jsonl")) == [
        (f"{snapshot}/a.jsonl:1", "a.jsonl:1"),
        (f"{snapshot}/a.jsonl:2", "a.jsonl:2"),
    ]
    assert dataset_files([snapshot / "a.jsonl"]) == [snapshot / "a.jsonl"]


def test_a_glob_through_a_linked_folder_names_files_as_the_folder_input_does(tmp_path: Path) -> None:
    """`in/*/*.jsonl` over in/x/ and in/more -> elsewhere/batch: the files were named by where the link led
    (elsewhere/batch/b.jsonl, in/x/a.jsonl, from their common folder), not as the user sees them."""
    tmp_path = tmp_path.resolve()
    (tmp_path / "elsewhere" / "batch").mkdir(parents=True)
    (tmp_path / "elsewhere" / "batch" / "b.jsonl").write_text("{}\n")
    (tmp_path / "in" / "x").mkdir(parents=True)
    (tmp_path / "in" / "x" / "a.jsonl").write_text("{}\n")
    (tmp_path / "in" / "more").symlink_to(tmp_path / "elsewhere" / "batch")
    assert [(f.uri, f.name) for f in find_inputs(str(tmp_path / "in" / "*" / "*.jsonl"))] == [
        (f"{tmp_path}/in/more/b.jsonl", "more/b.jsonl"),
        (f"{tmp_path}/in/x/a.jsonl", "x/a.jsonl"),
    ]


@pytest.fixture
def unlistable(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Folders `os.scandir` (what os.walk lists a folder with) fails on, by path, with the errno given: tests run as
    root, which reads a folder without read permission."""
    failing: dict[str, int] = {}
    scandir = os.scandir

    def listing(path: str | os.PathLike[str] = ".") -> Iterator[os.DirEntry[str]]:
        if (code := failing.get(os.fspath(path))) is not None:
            raise OSError(code, os.strerror(code), os.fspath(path))
        return scandir(path)  # type: ignore[return-value]

    monkeypatch.setattr(os, "scandir", listing)
    yield failing


def test_a_subfolder_that_cannot_be_listed_is_refused_by_name_not_left_out(
    tmp_path: Path, unlistable: dict[str, int]
) -> None:
    """os.walk passes over a folder it cannot list unless told otherwise: an input folder's `more/deep/` without read
    permission lost its records, a model folder's subfolder its files from the hash, without a word."""
    root = _tree(tmp_path.resolve())
    deep = root / "more" / "deep"  # behind the linked folder: named so
    unlistable[str(deep)] = errno.EACCES
    message = f"cannot list folder {deep} (Permission denied): give read permission or remove it from the input"
    for read in (
        lambda: find_inputs(str(root)),
        lambda: find_inputs(str(root / "**" / "*.jsonl")),  # glob.glob passed over it without a word
        lambda: dataset_files([root]),
        lambda: folder_hash(root),
        lambda: files_under(root),
    ):
        with pytest.raises(UserInputError) as refused:
            read()
        assert str(refused.value) == message
    assert [f.name for f in find_inputs(str(root / "*.jsonl"))] == ["a.jsonl"]  # a glob that does not go there
    unlistable[str(deep)] = errno.ENOENT  # gone between the listing of more/ and its own
    with pytest.raises(
        UserInputError, match=f"cannot list folder {deep} \\(No such file or directory\\): it went away"
    ):
        files_under(root)
