"""`vlmops validate PATH ...` through the real command: files and folders, with or without a config."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.image_server import png_bytes
from tests.s3_server import S3Server, watched_requests
from vlmops.cli.main import main


def record(question: str, image: str | None = None) -> str:
    value = f"<img>{image}</img>{question}" if image else question
    turns = [{"from": "user", "value": value}, {"from": "assistant", "value": "An answer."}]
    return json.dumps({"conversations": turns}) + "\n"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder (no pipeline.yaml: the built-in defaults and the tiny model)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


CACHE = ["--set", "model.cache_dir=cache"]


def test_one_record_file_is_validated_as_a_whole(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("one.jsonl").write_text(record("Hello?"))
    assert main(["validate", "one.jsonl", *CACHE]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert "read 1 record" in lines
    [stats] = [line for line in lines if line.startswith("all: ")]
    assert stats.startswith("all: 1 record (0 multi-turn, 0 multi-image, 1 text-only), 1 turn, 0 images")
    assert "tokens min/p50/p95/max" in stats
    assert "all: 1 record" not in err  # the report once, on stdout
    assert f"rejects:  {Path('outputs/datasets/rejects.jsonl')} (0 records)" in out
    assert Path("outputs/datasets/rejects.jsonl").read_text() == ""


def test_files_and_folders_together(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = Path("parts")
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(png_bytes())
    (folder / "a.jsonl").write_text(record("What?", "images/a.png") + record("Two?", "images/a.png"))
    (folder / "b.json").write_text(json.dumps([json.loads(record("Three?"))]))
    (folder / "notes.txt").write_text("not a dataset")
    Path("c.jsonl").write_text(record("Four?"))
    assert main(["validate", "parts", "c.jsonl", *CACHE]) == 0
    out = capsys.readouterr().out
    assert "read 4 records" in out
    assert "all: 4 records (0 multi-turn, 0 multi-image, 2 text-only), 4 turns, 2 images" in out
    # image tokens count in the lengths: 16 per image on the tiny model
    assert "(incl. 16 per image)" in out


def test_skip_writes_the_rejects_file_and_exits_0(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("d.jsonl").write_text(record("Good?") + "{oops\n" + record("Missing?", "nope.png") + record("Also good?"))
    args = ["validate", "d.jsonl", *CACHE, "--set", "data.invalid_records=skip", "--set", "data.rejects_file=bad.jsonl"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "read 4 records" in out and "all: 2 records" in out
    assert "rejected: 2 records; bad.jsonl says why" in out
    rows = [json.loads(line) for line in Path("bad.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"], r["field"]) for r in rows] == [
        ("d.jsonl", 2, "(line)"),
        ("d.jsonl", 3, "conversations[0].value"),
    ]
    assert rows[0]["record"] == "{oops" and "nope.png: file not found" in rows[1]["reason"]


def test_without_paths_the_configured_dataset_is_snapshotted_and_reported_once(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("train.jsonl").write_text("".join(record(f"Question {i}?") for i in range(10)))
    assert main(["validate", *CACHE, "--set", "data.train=train.jsonl", "--set", "data.eval_ratio=0.2"]) == 0
    out, err = capsys.readouterr()
    assert (out + err).count("train: 8 records") == 1
    assert (out + err).count("eval: 2 records") == 1
    assert "snapshot: " in out


def test_a_split_that_would_leave_train_empty_names_eval_ratio(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("train.jsonl").write_text(record("Only one?"))
    assert main(["validate", *CACHE, "--set", "data.train=train.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "error: 1 valid record, and holding out data.eval_ratio 0.1 for eval leaves none to train on" in err
    assert "Traceback" not in err


def test_a_path_that_does_not_exist(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "nope.jsonl", *CACHE]) == 2
    assert "error: nope.jsonl does not exist: pass .json/.jsonl dataset files or folders of them" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("paths", [["one.jsonl"], []], ids=["files", "configured-dataset"])
def test_everything_goes_to_run_output_dir_and_nothing_to_the_home_cache(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], paths: list[str]
) -> None:
    """The tiny model's manifest went to ~/.cache/vlmops/models/manifests/ (model.cache_dir's default) while the model
    itself was built under run.output_dir: a file left in the home cache per output folder."""
    home = workdir / "home"
    monkeypatch.setenv("HOME", str(home))
    Path("one.jsonl").write_text("".join(record(f"Question {i}?") for i in range(10)))
    out_dir = workdir / "out"
    settings = ["--set", f"run.output_dir={out_dir}", "--set", "data.train=one.jsonl", "--set", "data.eval_ratio=0.2"]
    assert main(["validate", *paths, *settings]) == 0
    assert not (home / ".cache").exists()
    [manifest] = (out_dir / "models" / "manifests").rglob("*.json")
    assert json.loads(manifest.read_text())["folder"] == str(out_dir / "models" / "tiny-deepseek-vl")
    out = capsys.readouterr().out
    expected = "rejects:  " if paths else "snapshot: "
    assert f"{expected}{out_dir / 'datasets'}" in out


def _parts() -> None:
    """parts/a.jsonl (2 records), parts/b.json (1), c.jsonl (1), linked -> parts, alias.jsonl -> c.jsonl."""
    Path("parts").mkdir()
    Path("parts/a.jsonl").write_text(record("One?") + record("Two?"))
    Path("parts/b.json").write_text(json.dumps([json.loads(record("Three?"))]))
    Path("c.jsonl").write_text(record("Four?"))
    Path("linked").symlink_to("parts")
    Path("alias.jsonl").symlink_to("c.jsonl")


@pytest.mark.parametrize(
    ("paths", "refusal"),
    [
        (
            ["parts", "parts"],
            "dataset paths 1 (parts) and 2 (parts) both name 2 files, whose records would be read twice: "
            "parts/a.jsonl, parts/b.json; drop one of them",
        ),
        (
            ["parts", "c.jsonl", "parts/a.jsonl"],
            "dataset paths 1 (parts) and 3 (parts/a.jsonl) both name 1 file, whose records would be read twice: "
            "parts/a.jsonl; drop path 3 (path 1 names each of its files)",
        ),
        (
            ["c.jsonl", "linked", "parts"],
            "dataset paths 2 (linked) and 3 (parts) both name 2 files, whose records would be read twice: "
            "linked/a.jsonl (as parts/a.jsonl), linked/b.json (as parts/b.json); drop one of them",
        ),
        (
            ["alias.jsonl", "./c.jsonl"],
            "dataset paths 1 (alias.jsonl) and 2 (./c.jsonl) both name 1 file, whose records would be read twice: "
            "alias.jsonl (as c.jsonl); drop one of them",
        ),
        (
            ["linked/b.json", "parts"],
            "dataset paths 1 (linked/b.json) and 2 (parts) both name 1 file, whose records would be read twice: "
            "linked/b.json (as parts/b.json); drop path 1 (path 2 names each of its files)",
        ),
    ],
    ids=["a-folder-twice", "a-file-in-a-folder-given", "a-folder-and-a-link-to-it", "a-file-by-two-names", "by-link"],
)
def test_two_paths_that_name_one_file_are_refused_by_position(
    workdir: Path, capsys: pytest.CaptureFixture[str], paths: list[str], refusal: str
) -> None:
    """Each shared file's records were read twice: training saw them twice and the report counted them twice."""
    _parts()
    assert main(["validate", *paths, *CACHE]) == 2
    out, err = capsys.readouterr()
    assert f"error: {refusal}\n" in err
    assert "read " not in out and "Traceback" not in err


def test_folders_that_share_a_linked_subfolder_are_refused_pair_by_pair(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Neither holds the other: dropping one would lose its own files, so the fix says what else will do."""
    _parts()
    for name in ("x", "y"):
        Path(name).mkdir()
        Path(name, f"{name}.jsonl").write_text(record(f"{name}?"))
        Path(name, "shared").symlink_to(Path("parts").resolve())
    assert main(["validate", "x", "y", "parts", *CACHE]) == 2
    err = capsys.readouterr().err
    assert (
        "error: dataset paths 1 (x) and 2 (y) both name 2 files, whose records would be read twice: x/shared/a.jsonl "
        "(as y/shared/a.jsonl), x/shared/b.json (as y/shared/b.json); drop one of them, or take the shared files out "
        "of one\n"
        "dataset paths 1 (x) and 3 (parts) both name 2 files, whose records would be read twice: x/shared/a.jsonl (as "
        "parts/a.jsonl), x/shared/b.json (as parts/b.json); drop path 3 (path 1 names each of its files)\n"
        "dataset paths 2 (y) and 3 (parts) both name 2 files, whose records would be read twice: y/shared/a.jsonl (as "
        "parts/a.jsonl), y/shared/b.json (as parts/b.json); drop path 3 (path 2 names each of its files)\n"
    ) in err


def test_a_file_one_folder_holds_under_two_names_is_read_once_and_the_other_name_logged(
    workdir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """parts/latest.jsonl -> a.jsonl beside it: a folder's own links (a hub snapshot's, a DVC checkout's) may not be
    the user's to change, so the file is read once, under its first name in sorted order, as a folder reached twice
    through links is."""
    _parts()
    Path("parts/latest.jsonl").symlink_to("a.jsonl")
    with caplog.at_level(logging.WARNING, logger="vlmops.data.formats"):
        assert main(["validate", "parts", *CACHE]) == 0
    out = capsys.readouterr().out
    assert "read 3 records" in out and "all: 3 records" in out
    real = Path("parts/a.jsonl").resolve()
    assert caplog.messages == [
        f"parts/latest.jsonl is parts/a.jsonl by another name (both lead to {real}): not read twice"
    ]


@pytest.mark.parametrize("eval_name", ["train.jsonl", "held-out.jsonl"], ids=["same-name", "a-link"])
def test_an_eval_file_that_is_the_training_file_is_refused(
    workdir: Path, capsys: pytest.CaptureFixture[str], eval_name: str
) -> None:
    """The records were trained on and then scored as held out: an eval that measured nothing unseen."""
    Path("train.jsonl").write_text("".join(record(f"Question {i}?") for i in range(10)))
    if eval_name != "train.jsonl":
        Path(eval_name).symlink_to("train.jsonl")
    assert main(["validate", *CACHE, "--set", "data.train=train.jsonl", "--set", f"data.eval={eval_name}"]) == 2
    named = "both train.jsonl" if eval_name == "train.jsonl" else f"train.jsonl and {eval_name}, the same file"
    assert (
        f"error: data.train and data.eval are {named}: its records would be trained on and then evaluated as held "
        "out; give data.eval a file of its own, or set it to null to hold out data.eval_ratio of data.train\n"
    ) in capsys.readouterr().err


def test_without_paths_configured_folders_are_read_part_by_part(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """data.train and data.eval as folders of parts (`data.train: data/train` was "dataset file data/train does not
    exist"): every part's records in the snapshot, in sorted order, a reject named by its part and line."""
    splits: dict[str, dict[str, list[str | None]]] = {
        "train": {"part-0001.jsonl": ["C?", None, "D?"], "part-0000.jsonl": ["A?", "B?"]},  # None: a broken line
        "eval": {"part-0000.jsonl": ["E?"], "part-0001.jsonl": ["F?"]},
    }
    for split, parts in splits.items():
        Path("data", split).mkdir(parents=True)
        for name, asked in parts.items():
            Path("data", split, name).write_text("".join(record(q) if q else "{oops\n" for q in asked))
    settings = ["--set", "data.train=data/train", "--set", "data.eval=data/eval", "--set", "data.invalid_records=skip"]
    assert main(["validate", *CACHE, *settings]) == 0
    out = capsys.readouterr().out
    assert "read 7 records" in out and "train: 4 records" in out and "eval: 2 records" in out
    snapshot = Path(out.split("snapshot: ")[1].splitlines()[0])
    questions = {
        split: [
            json.loads(line)["conversations"][0]["value"]
            for line in (snapshot / f"{split}.jsonl").read_text().splitlines()
        ]
        for split in ("train", "eval")
    }
    assert questions == {"train": ["A?", "B?", "C?", "D?"], "eval": ["E?", "F?"]}
    [reject] = [json.loads(line) for line in Path("outputs/datasets/rejects.jsonl").read_text().splitlines()]
    assert (reject["file"], reject["line"], reject["record"]) == ("data/train/part-0001.jsonl", 2, "{oops")


def test_a_dataset_folder_that_holds_the_output_folder_is_refused(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """data.train: . beside outputs/: the next run would read the last run's snapshot (a train.jsonl) as more data."""
    Path("train.jsonl").write_text("".join(record(f"Question {i}?") for i in range(10)))
    assert main(["validate", *CACHE, "--set", "data.train=."]) == 2
    assert (
        "error: data.train (.) is a folder that holds run.output_dir (outputs): what the runs write there would be "
        "read back as dataset files by the next run; set run.output_dir outside it, or data.train to a folder that "
        "holds only the dataset\n"
    ) in capsys.readouterr().err


def test_an_eval_folder_sharing_a_part_with_train_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("train").mkdir()
    Path("train/a.jsonl").write_text(record("A?"))
    Path("eval").mkdir()
    Path("eval/b.jsonl").write_text(record("B?"))
    Path("eval/a.jsonl").symlink_to(Path("train/a.jsonl").resolve())
    assert main(["validate", *CACHE, "--set", "data.train=train", "--set", "data.eval=eval"]) == 2
    assert (
        "error: data.train (train) and data.eval (eval) both name 1 file, whose records would be trained on and then "
        "evaluated as held out: eval/a.jsonl (as train/a.jsonl); move them out of data.eval's folder (eval)\n"
    ) in capsys.readouterr().err


@pytest.fixture
def s3_parts(s3_env: S3Server) -> str:
    """s3://validate-parts/data/parts: a.jsonl (a record with a relative image, a broken line, one with an image outside
    the prefix), b.json (a record with a relative image), their images, and notes.txt; the AWS_* environment points at
    the server. A bucket of the session's server, filled once."""
    client = s3_env.client()
    bucket = "validate-parts"
    if any(found["Name"] == bucket for found in client.list_buckets().get("Buckets", [])):
        return f"s3://{bucket}/data/parts"
    client.create_bucket(Bucket=bucket)
    a = record("Red?", "images/red.png") + "{oops\n" + record("Escape?", "../secret.png")
    objects = {
        "parts/a.jsonl": a.encode(),
        "parts/b.json": json.dumps([json.loads(record("Blue?", "images/blue.png"))]).encode(),
        "parts/images/red.png": png_bytes(),
        "parts/images/blue.png": png_bytes(),
        "parts/notes.txt": b"not a dataset",
        "secret.png": png_bytes(),
    }
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=f"data/{key}", Body=body)
    return f"s3://{bucket}/data/parts"


@pytest.mark.integration
def test_an_s3_prefix_of_parts_is_read_as_a_folder_is(
    workdir: Path, s3_parts: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vlmops validate s3://bucket/prefix` (was "s3:/bucket/prefix does not exist"): its .json/.jsonl objects in key
    order, read as they stream in; a relative image is the object under the part's prefix; a reject is named by its
    object's URI and line. Each object is one GET (b.json was two: once to find whether the whole list parses, once
    for its records)."""
    args = ["validate", s3_parts, *CACHE, "--set", "data.invalid_records=skip"]
    with watched_requests() as requests:
        assert main(args) == 0
    parts = ["a.jsonl", "images/red.png", "b.json", "images/blue.png"]
    assert requests.of("GetObject") == [f"data/parts/{name}" for name in parts]
    out = capsys.readouterr().out
    assert "read 4 records" in out
    assert "all: 2 records (0 multi-turn, 0 multi-image, 0 text-only), 2 turns, 2 images" in out
    rows = [json.loads(line) for line in Path("outputs/datasets/rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"], r["field"]) for r in rows] == [
        (f"{s3_parts}/a.jsonl", 2, "(line)"),
        (f"{s3_parts}/a.jsonl", 3, "conversations[0].value"),
    ]
    assert rows[0]["record"] == "{oops"
    assert f"image ../secret.png is outside {s3_parts}, where the record was read from" in rows[1]["reason"]
    assert main(["validate", f"{s3_parts}/b.json", *CACHE]) == 0  # one object, by its key
    assert "all: 1 record (0 multi-turn, 0 multi-image, 0 text-only), 1 turn, 1 image" in capsys.readouterr().out


@pytest.mark.integration
def test_the_images_beside_one_s3_object_are_downloaded_at_once_and_checked_in_record_order(
    workdir: Path, s3_env: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each image one GET, several in flight at once while the records before them are checked (were one at a time:
    a round trip's wait each), the records checked in order as before: the missing image and the one that is no
    image rejected at their lines, an image named twice read once; a download that may pass stops validation at
    the record that names it."""
    client = s3_env.client()
    client.create_bucket(Bucket="images-at-once")
    names = [f"images/{i:02d}.png" for i in range(20)]
    for name in names:
        client.put_object(Bucket="images-at-once", Key=f"data/{name}", Body=png_bytes())
    client.put_object(Bucket="images-at-once", Key="data/images/broken.png", Body=b"not an image")
    lines = [record(f"Which {i}?", name) for i, name in enumerate(names)]
    lines[10:10] = [record("Gone?", "images/missing.png"), record("Broken?", "images/broken.png")]
    lines.append(record("Again?", names[3]))
    client.put_object(Bucket="images-at-once", Key="data/train.jsonl", Body="".join(lines).encode())
    args = ["validate", "s3://images-at-once/data/train.jsonl", *CACHE, "--set", "data.invalid_records=skip"]
    with watched_requests(delay_s=0.05) as requests:
        assert main(args) == 0
    assert "read 23 records" in capsys.readouterr().out
    gets = requests.of("GetObject")
    assert gets[0] == "data/train.jsonl"
    assert sorted(gets[1:]) == sorted(f"data/{name}" for name in [*names, "images/missing.png", "images/broken.png"])
    assert requests.most_at_once > 1
    from vlmops.data.validation import IMAGE_THREADS  # (here: the code before it read them one at a time)

    assert requests.most_at_once <= IMAGE_THREADS
    rows = [json.loads(line) for line in Path("outputs/datasets/rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rows] == [
        (11, "image s3://images-at-once/data/images/missing.png: no such object (storage.endpoint_url: the S3 server)"),
        (
            12,
            "image s3://images-at-once/data/images/broken.png: not a readable image (no image format starts like "
            "b'not an image')",
        ),
    ]
    slow_down = {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}
    with watched_requests(fail={"data/images/15.png": ClientError(slow_down, "GetObject")}):  # downloaded ahead
        assert main(args) == 1
    assert (
        "error: s3://images-at-once/data/train.jsonl:18: image s3://images-at-once/data/images/15.png: An error "
        "occurred (SlowDown) when calling the GetObject operation: Unknown (storage.endpoint_url: the S3 server). "
        "Validation stops here rather than leave the record out for a failure that may pass: run it again"
    ) in capsys.readouterr().err


@pytest.mark.integration
def test_s3_uris_that_name_one_object_twice_are_refused(
    workdir: Path, s3_parts: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """By bucket and key, as local paths are refused by the file they lead to: a prefix and an object under it, and a
    data.eval that is data.train (written with a trailing slash)."""
    assert main(["validate", s3_parts, f"{s3_parts}/a.jsonl", *CACHE]) == 2
    assert (
        f"error: dataset paths 1 ({s3_parts}) and 2 ({s3_parts}/a.jsonl) both name 1 file, whose records would be read "
        f"twice: {s3_parts}/a.jsonl; drop path 2 (path 1 names each of its files)\n"
    ) in capsys.readouterr().err
    settings = ["--set", f"data.train={s3_parts}", "--set", f"data.eval={s3_parts}/"]
    assert main(["validate", *CACHE, *settings]) == 2
    assert (
        f"error: data.train and data.eval are {s3_parts} and {s3_parts}/, the same prefix: its records would be trained "
        "on and then evaluated as held out; give data.eval a prefix of its own, or set it to null to hold out "
        "data.eval_ratio of data.train\n"
    ) in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.parametrize(
    ("uri", "refusal"),
    [
        (
            "s3://no-such-bucket/parts",
            "error: s3://no-such-bucket/parts: there is no bucket 'no-such-bucket' on the S3 server at {endpoint}; check "
            "the URI, and storage.endpoint_url (or AWS_ENDPOINT_URL) for the server\n",
        ),
        (
            "s3://validate-parts/data/nothing",
            "error: s3://validate-parts/data/nothing does not exist: no object has this key and none lies under it as a "
            "prefix; pass an s3://bucket/key.jsonl object or the s3://bucket/prefix of .json/.jsonl objects\n",
        ),
        (
            "s3://validate-parts/data/parts/images",
            "error: s3://validate-parts/data/parts/images: no .json or .jsonl dataset objects under this prefix (it "
            "holds blue.png, red.png); pass the prefix that holds the dataset's parts\n",
        ),
    ],
    ids=["no-bucket", "nothing-there", "no-dataset-objects"],
)
def test_an_s3_uri_with_no_dataset_is_named_with_the_fix(
    workdir: Path, s3_parts: str, s3_env: S3Server, capsys: pytest.CaptureFixture[str], uri: str, refusal: str
) -> None:
    assert main(["validate", uri, *CACHE]) == 2
    out, err = capsys.readouterr()
    assert refusal.format(endpoint=s3_env.endpoint_url) in err
    assert "read " not in out and "Traceback" not in err


@pytest.mark.integration
def test_an_s3_server_that_does_not_answer_is_named_as_an_outage(
    workdir: Path, s3_env: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """As batch inference names it: the service and its URL, and what to do (exit 1: a rerun may pass), not a
    traceback, nor "does not exist"."""
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [
        "validate",
        "s3://validate-parts/data/parts",
        *CACHE,
        "--set",
        f"storage.endpoint_url=http://127.0.0.1:{port}",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"error: S3 at http://127.0.0.1:{port} did not answer: EndpointConnectionError: " in err
    assert "start it (or fix its URL in the config), then run the command again" in err
    assert "Traceback" not in err
