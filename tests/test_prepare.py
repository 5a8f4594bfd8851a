"""Validation report and the content-addressed dataset snapshot."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from vlmops.config import DataConfig
from vlmops.data.formats import read_dataset
from vlmops.data.prepare import load_prepared, prepare_dataset, split_by_ratio
from vlmops.data.problems import DatasetError
from vlmops.errors import UserInputError


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_demo_snapshot_counts_and_lengths(tmp_path: Path, demo_data: tuple[Path, Path], tiny_processor: Any) -> None:
    train, evals = demo_data
    prepared = prepare_dataset(DataConfig(), train, evals, tmp_path, tiny_processor.tokenizer, 16)
    stats = prepared.report.splits
    assert stats["train"].records == 48 and stats["eval"].records == 8
    assert stats["train"].multi_turn_records > 0
    assert stats["train"].multi_image_records > 0
    assert stats["train"].text_only_records > 0
    assert stats["train"].image_tokens == stats["train"].images * 16
    # lengths include the image tokens: an eval record is BOS + system + question + 16 image tokens + answer
    assert stats["eval"].tokens_min > 16
    report = json.loads((prepared.path / "report.json").read_text())
    assert report["splits"]["train"]["records"] == 48
    # The snapshot is self-contained: images are copied in and every record still parses from there.
    reread = read_dataset(prepared.train_file)
    assert reread.problems == []
    assert all(Path(i.uri).is_relative_to(prepared.path / "images") for c in reread.conversations for i in c.images)
    assert load_prepared(prepared.path).content_hash == prepared.content_hash


def test_same_input_same_snapshot(tmp_path: Path, demo_data: tuple[Path, Path], tiny_processor: Any) -> None:
    train, evals = demo_data
    a = prepare_dataset(DataConfig(), train, evals, tmp_path, tiny_processor.tokenizer, 16)
    b = prepare_dataset(DataConfig(), train, evals, tmp_path, tiny_processor.tokenizer, 16)
    assert a.path == b.path
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_records_stop_or_are_skipped_and_listed(tmp_path: Path, tiny_processor: Any) -> None:
    (tmp_path / "ok.png").write_bytes(_png_bytes())
    data = tmp_path / "d.jsonl"
    good = {
        "conversations": [{"from": "user", "value": "<img>ok.png</img>Colour?"}, {"from": "assistant", "value": "red"}]
    }
    missing = {
        "conversations": [
            {"from": "user", "value": "<img>gone.png</img>Colour?"},
            {"from": "assistant", "value": "red"},
        ]
    }
    inline = {
        "conversations": [
            {"from": "user", "value": f"<img>data:image/png;base64,{base64.b64encode(_png_bytes()).decode()}</img>Hi"},
            {"from": "assistant", "value": "red"},
        ]
    }
    data.write_text("\n".join(json.dumps(r) for r in [good, missing, good, inline, {"x": 1}]) + "\n")
    tok = tiny_processor.tokenizer
    with pytest.raises(DatasetError) as info:
        prepare_dataset(DataConfig(eval_ratio=0.25), data, None, tmp_path / "out", tok, 16)
    locations = sorted(p.location for p in info.value.problems)
    assert locations == [f"{data}:2", f"{data}:5"]
    assert "gone.png: file not found" in str(info.value)
    skipped = prepare_dataset(
        DataConfig(eval_ratio=0.25, invalid_records="skip"), data, None, tmp_path / "out", tok, 16
    )
    assert len(skipped.report.rejected) == 2
    assert skipped.report.splits["train"].records + skipped.report.splits["eval"].records == 3
    # kept + rejected = read, and every rejected record is in the rejects file with its line and reason
    report = skipped.report
    assert report.read == 5 and report.rejected_count == 2
    assert report.rejects_file == str(tmp_path / "out" / "rejects.jsonl")
    rows = [json.loads(line) for line in Path(report.rejects_file).read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rows] == [(2, "conversations[0].value"), (5, "(record)")]


def test_max_length_policies(tmp_path: Path, demo_data: tuple[Path, Path], tiny_processor: Any) -> None:
    train, evals = demo_data
    tok = tiny_processor.tokenizer
    with pytest.raises(DatasetError, match="data.max_length_policy"):
        prepare_dataset(DataConfig(max_length=80), train, evals, tmp_path, tok, 16)
    dropped = prepare_dataset(DataConfig(max_length=80, max_length_policy="drop"), train, evals, tmp_path, tok, 16)
    assert dropped.report.dropped_too_long
    assert dropped.report.splits["train"].tokens_max <= 80
    # truncate-text: the two-image records keep only their prompt at 80 tokens; validation refuses them, each named
    # (the same policy training applies, so they do not get as far as the training process).
    truncate = DataConfig(max_length=80, max_length_policy="truncate-text")
    with pytest.raises(DatasetError, match="leaves no answer token") as err:
        prepare_dataset(truncate, train, evals, tmp_path, tok, 16)
    conversations = read_dataset(train).conversations
    two_images = sorted(c.source for c in conversations if len(c.images) == 2)
    assert two_images and sorted(p.location for p in err.value.problems) == two_images
    lines = train.read_text().splitlines(keepends=True)
    cuttable = tmp_path / "data" / "cuttable.jsonl"  # beside the images its relative paths name
    shutil.copytree(train.parent, cuttable.parent)
    cuttable.write_text("".join(line for line, c in zip(lines, conversations, strict=True) if len(c.images) < 2))
    kept = prepare_dataset(truncate, cuttable, evals, tmp_path, tok, 16)
    assert kept.report.splits["train"].records == 48 - len(two_images)
    assert kept.report.splits["train"].over_max_length > 0


def test_split_by_ratio_is_seeded(demo_data: tuple[Path, Path]) -> None:
    convs = read_dataset(demo_data[0]).conversations
    a_train, a_eval = split_by_ratio(convs, 0.25, seed=3)
    _, b_eval = split_by_ratio(convs, 0.25, seed=3)
    assert [c.source for c in a_eval] == [c.source for c in b_eval]
    assert len(a_eval) == 12 and len(a_train) == 36
    assert [c.source for c in split_by_ratio(convs, 0.25, seed=4)[1]] != [c.source for c in a_eval]


def test_the_snapshot_copies_images_and_leaves_the_users_files_alone(
    tmp_path: Path, demo_data: tuple[Path, Path], tiny_processor: Any
) -> None:
    """A content-addressed snapshot must not change when a source image is edited in place (no hardlinks)."""
    train, evals = demo_data
    prepared = prepare_dataset(DataConfig(), train, evals, tmp_path, tiny_processor.tokenizer, 16)
    sources = {p.stat().st_ino for p in train.parent.rglob("*.png")}
    assert sources and all(p.stat().st_ino not in sources for p in (prepared.path / "images").iterdir())


def test_a_broken_data_uri_is_a_rejected_record_naming_it(tmp_path: Path, tiny_processor: Any) -> None:
    """A data: URI whose payload is not ASCII base64, or whose media type is not a plain name, is the record's
    problem (line, field, what to fix), not an error that stops validation."""
    png = base64.b64encode(_png_bytes()).decode()

    def record(uri: str) -> str:
        turns = [{"from": "user", "value": f"<img>{uri}</img>Hi"}, {"from": "assistant", "value": "red"}]
        return json.dumps({"conversations": turns})

    data = tmp_path / "d.jsonl"
    uris = [
        f"data:image/png;base64,{png}",
        f"data:image/png;base64,{png[:8]}\u00e9{png[8:]}",  # a non-ASCII character in the payload
        f"data:image/png/x;base64,{png}",  # a slash in the media type: not a file name suffix
    ]
    data.write_text("\n".join(record(u) for u in uris) + "\n")
    evals = tmp_path / "e.jsonl"
    evals.write_text(record(uris[0]) + "\n")
    prepared = prepare_dataset(
        DataConfig(invalid_records="skip"), data, evals, tmp_path / "out", tiny_processor.tokenizer, 16
    )
    rows = [json.loads(line) for line in Path(prepared.report.rejects_file).read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rows] == [(2, "conversations[0].value")]
    assert "base64" in rows[0]["reason"]
    assert sorted(p.suffix for p in (prepared.path / "images").iterdir()) == [".img", ".png"]


def _asked(question: str, image: str | None = None) -> str:
    """A record asking `question` (about `image`, a path relative to its file), as a jsonl line."""
    value = f"<img>{image}</img>{question}" if image else question
    return json.dumps({"conversations": [{"from": "user", "value": value}, {"from": "assistant", "value": "red"}]})


def _questions(snapshot_file: Path) -> list[str]:
    """The question of each record of a snapshot file, in order."""
    return [
        json.loads(line)["conversations"][0]["value"].rsplit("</img>", 1)[-1]
        for line in snapshot_file.read_text().splitlines()
    ]


def _bmp(path: Path) -> None:
    """A BMP (its bytes, and so its name in a snapshot, are the same on every Pillow)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path, format="BMP")


def test_a_folder_of_parts_is_one_split_read_in_sorted_order(tmp_path: Path, tiny_processor: Any) -> None:
    """data.train: data/train (parts, as a team shards its data) and data.eval: data/eval were refused as files that do
    not exist. Each folder is now read as `vlmops validate PATH` reads it: its .json/.jsonl files in sorted order
    (a subfolder's too, nothing else), one split, each reject named by its part and line."""
    train, evals = tmp_path / "data" / "train", tmp_path / "data" / "eval"
    _bmp(train / "images" / "red.bmp")
    (train / "part-0001.jsonl").write_text(_asked("Three?") + "\n{oops\n" + _asked("Four?", "images/red.bmp") + "\n")
    (train / "part-0000.jsonl").write_text(_asked("One?", "images/red.bmp") + "\n" + _asked("Two?") + "\n")
    (train / "more").mkdir()
    (train / "more" / "part-0002.json").write_text(json.dumps([json.loads(_asked("Five?"))]))
    (train / "README.md").write_text("not a dataset file")
    evals.mkdir()
    for name in ("b.jsonl", "a.jsonl"):
        (evals / name).write_text(_asked(f"Eval {name}?") + "\n")
    data = DataConfig(invalid_records="skip")
    prepared = prepare_dataset(data, train, evals, tmp_path / "out", tiny_processor.tokenizer, 16)

    assert _questions(prepared.train_file) == ["Five?", "One?", "Two?", "Three?", "Four?"]  # by path: more/ first
    assert _questions(prepared.eval_file) == ["Eval a.jsonl?", "Eval b.jsonl?"]
    report = prepared.report
    assert (report.read, report.rejected_count, report.splits["train"].images) == (8, 1, 2)
    [reject] = report.rejected
    assert (reject["location"], reject["field"]) == (f"{train / 'part-0001.jsonl'}:2", "(line)")
    [row] = [json.loads(line) for line in Path(report.rejects_file).read_text().splitlines()]
    assert (row["file"], row["line"], row["record"]) == (str(train / "part-0001.jsonl"), 2, "{oops")
    assert json.loads((prepared.path / "report.json").read_text())["sources"] == {
        "train": f"{train} (3 files: more/part-0002.json, part-0000.jsonl, part-0001.jsonl)",
        "eval": f"{evals} (2 files: a.jsonl, b.jsonl)",
    }
    # a folder of one file freezes into the very snapshot of that file
    (tmp_path / "one").mkdir()
    shutil.copy(evals / "a.jsonl", tmp_path / "one" / "a.jsonl")
    from_folder = prepare_dataset(data, train, tmp_path / "one", tmp_path / "out", tiny_processor.tokenizer, 16)
    from_file = prepare_dataset(data, train, evals / "a.jsonl", tmp_path / "out", tiny_processor.tokenizer, 16)
    assert from_folder.path == from_file.path


def test_a_folder_split_off_by_eval_ratio_reads_every_part(tmp_path: Path, tiny_processor: Any) -> None:
    """data.eval null: data.eval_ratio is held out of all the parts' records together."""
    train = tmp_path / "train"
    train.mkdir()
    for part in range(3):
        (train / f"part-{part}.jsonl").write_text("".join(_asked(f"Q{part}.{i}?") + "\n" for i in range(4)))
    prepared = prepare_dataset(DataConfig(eval_ratio=0.25), train, None, tmp_path / "out", tiny_processor.tokenizer, 16)
    kept = _questions(prepared.train_file) + _questions(prepared.eval_file)
    assert sorted(kept) == sorted(f"Q{part}.{i}?" for part in range(3) for i in range(4))
    assert (len(_questions(prepared.train_file)), len(_questions(prepared.eval_file))) == (9, 3)


def test_a_single_files_snapshot_keeps_its_hash(tmp_path: Path, tiny_processor: Any) -> None:
    """A user's existing snapshots (and the steps cached on them) stay valid: a file's snapshot is named as before."""
    _bmp(tmp_path / "data" / "images" / "red.bmp")
    (tmp_path / "data" / "train.jsonl").write_text(_asked("One?", "images/red.bmp") + "\n" + _asked("Two?") + "\n")
    (tmp_path / "data" / "eval.jsonl").write_text(_asked("Three?") + "\n")
    prepared = prepare_dataset(
        DataConfig(), tmp_path / "data" / "train.jsonl", tmp_path / "data" / "eval.jsonl", tmp_path / "out",
        tiny_processor.tokenizer, 16,
    )  # fmt: skip
    assert prepared.content_hash == PINNED_SNAPSHOT_HASH
    assert json.loads((prepared.path / "report.json").read_text())["sources"] == {
        "train": str(tmp_path / "data" / "train.jsonl"),
        "eval": str(tmp_path / "data" / "eval.jsonl"),
    }


PINNED_SNAPSHOT_HASH = "cb8e40f086188bdd2c8a40bca95412b0bdeb2cc868c82f3d14b98342d3dcad46"
"""Computed by the code before folders were read (a single file's path, unchanged since)."""


def _eval_and_train(tmp_path: Path) -> None:
    """train/ (a.jsonl, b.jsonl), latest -> train, eval/ (c.jsonl, and b.jsonl -> ../train/b.jsonl), other/ (c.jsonl)."""
    for folder, names in (("train", ["a", "b"]), ("eval", ["c"]), ("other", ["c"])):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / f"{name}.jsonl").write_text(_asked(f"{folder} {name}?") + "\n")
    (tmp_path / "eval" / "b.jsonl").symlink_to(tmp_path / "train" / "b.jsonl")
    (tmp_path / "latest").symlink_to(tmp_path / "train")


@pytest.mark.parametrize(
    ("train", "evals", "refusal"),
    [
        (
            "train",
            "latest",
            "data.train and data.eval are {t}/train and {t}/latest, the same folder: its records would be trained on "
            "and then evaluated as held out; give data.eval a folder of its own, or set it to null to hold out "
            "data.eval_ratio of data.train",
        ),
        (
            "train",
            "eval",
            "data.train ({t}/train) and data.eval ({t}/eval) both name 1 file, whose records would be trained on and "
            "then evaluated as held out: {t}/eval/b.jsonl (as {t}/train/b.jsonl); move the shared files out of one of "
            "the two folders",
        ),
        (
            "train",
            "train/a.jsonl",
            "data.train ({t}/train) and data.eval ({t}/train/a.jsonl) both name 1 file, whose records would be trained "
            "on and then evaluated as held out: {t}/train/a.jsonl; move them out of data.train's folder ({t}/train), "
            "or give data.eval files of its own, or set it to null to hold out data.eval_ratio of data.train",
        ),
        (
            "train/b.jsonl",
            "eval",
            "data.train ({t}/train/b.jsonl) and data.eval ({t}/eval) both name 1 file, whose records would be trained "
            "on and then evaluated as held out: {t}/eval/b.jsonl (as {t}/train/b.jsonl); move them out of data.eval's "
            "folder ({t}/eval)",
        ),
    ],
    ids=["one-folder-two-names", "a-file-in-both", "eval-inside-train", "train-inside-eval"],
)
def test_eval_data_that_shares_files_with_train_is_refused(
    tmp_path: Path, tiny_processor: Any, train: str, evals: str, refusal: str
) -> None:
    """A file in both folders would be trained on and then scored as held out: refused, with the keys, the files and
    the fix; nothing is written."""
    _eval_and_train(tmp_path)
    with pytest.raises(UserInputError) as err:
        prepare_dataset(
            DataConfig(), tmp_path / train, tmp_path / evals, tmp_path / "out", tiny_processor.tokenizer, 16
        )
    assert str(err.value) == refusal.format(t=tmp_path)
    assert not (tmp_path / "out").exists()
    # folders that share nothing are fine
    prepare_dataset(
        DataConfig(), tmp_path / "train", tmp_path / "other", tmp_path / "out", tiny_processor.tokenizer, 16
    )


def test_a_missing_or_empty_folder_is_named_by_its_key(tmp_path: Path, tiny_processor: Any) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "train.jsonl").write_text(_asked("One?") + "\n")
    with pytest.raises(FileNotFoundError) as err:
        prepare_dataset(
            DataConfig(), tmp_path / "train.jsonl", tmp_path / "empty", tmp_path, tiny_processor.tokenizer, 16
        )
    assert str(err.value) == f"data.eval: {tmp_path / 'empty'}: no .json or .jsonl dataset files in this folder"
    with pytest.raises(FileNotFoundError) as err:
        prepare_dataset(DataConfig(), tmp_path / "gone", None, tmp_path, tiny_processor.tokenizer, 16)
    assert str(err.value) == (
        f"data.train: {tmp_path / 'gone'} does not exist: pass .json/.jsonl dataset files or folders of them"
    )
