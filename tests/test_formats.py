"""Dataset files: both formats, json and jsonl, and a clear report of every rejected record."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from vlmops.conversation import ImageRef
from vlmops.data.formats import read_dataset

SEED_EXAMPLE = [
    {"conversations": [{"from": "user", "value": "<img>img_path</img>11111"}, {"from": "assistant", "value": "22222"}]},
    {
        "conversations": [
            {"from": "user", "value": "<img>img_path</img><img>img_path2</img><img>img_path3</img>aaaaa"},
            {"from": "assistant", "value": "bbbbb"},
            {"from": "user", "value": "<img>img_path</img>ccccc"},
            {"from": "assistant", "value": "ddddd"},
        ]
    },
    {
        "conversations": [
            {"from": "user", "value": "AAAAA"},
            {"from": "assistant", "value": "BBBBB"},
            {"from": "user", "value": "CCCCC"},
            {"from": "assistant", "value": "DDDDD"},
        ]
    },
]


def test_seed_custom_dataset_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(SEED_EXAMPLE))
    read = read_dataset(path)
    assert read.problems == []
    assert [len(c.images) for c in read.conversations] == [1, 4, 0]
    assert read.conversations[0].images[0] == ImageRef(str(tmp_path / "img_path"))
    assert read.conversations[1].messages[0].text("<i>") == "<i><i><i>aaaaa"


def test_messages_format_and_remote_images(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    record = {
        "id": "r1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>What is <image>?"},
            {"role": "assistant", "content": "two"},
        ],
        "images": ["https://host/a.png", "s3://bucket/b.png"],
    }
    path.write_text(json.dumps(record) + "\n")
    read = read_dataset(path)
    assert read.problems == []
    conv = read.conversations[0]
    assert [i.uri for i in conv.images] == ["https://host/a.png", "s3://bucket/b.png"]
    assert conv.meta == {"id": "r1"}
    assert conv.messages[0].role == "system"


def test_every_rejected_record_has_file_line_field_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "ok"}]}),
        "{not json",
        json.dumps({"conversations": [{"from": "robot", "value": "hi"}]}),
        json.dumps({"conversations": [{"from": "user", "value": "hi"}]}),
        json.dumps({"conversations": [{"from": "assistant", "value": "x"}, {"from": "user", "value": "y"}]}),
        json.dumps({"text": "no conversation"}),
        json.dumps(
            {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}], "images": []}
        ),
        json.dumps(
            {"conversations": [{"from": "user", "value": "<img></img>hi"}, {"from": "assistant", "value": "a"}]}
        ),
    ]
    path.write_text("\n".join(lines) + "\n")
    read = read_dataset(path)
    assert len(read.conversations) == 1
    by_line = {p.location: p for p in read.problems}
    assert set(by_line) == {f"{path}:{n}" for n in range(2, 9)}
    assert "not valid JSON" in by_line[f"{path}:2"].reason
    assert by_line[f"{path}:3"].field == "conversations[0].from"
    assert "must end with an assistant turn" in by_line[f"{path}:4"].reason
    assert "'user' was expected" in by_line[f"{path}:5"].reason
    assert "needs a 'conversations' or 'messages' key" in by_line[f"{path}:6"].reason
    assert "more <image> tags" in by_line[f"{path}:7"].reason
    assert "empty image reference" in by_line[f"{path}:8"].reason


def test_json_index_locations(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([SEED_EXAMPLE[0], {"conversations": []}]))
    read = read_dataset(path)
    assert [str(p.location) for p in read.problems] == [f"{path}[1]"]


def test_missing_file_and_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.train"):
        read_dataset(tmp_path / "nope.jsonl")
    other = tmp_path / "d.csv"
    other.write_text("a,b")
    with pytest.raises(ValueError, match="unsupported dataset file type"):
        read_dataset(other)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_key_twice_in_one_object_is_rejected_not_dropped(tmp_path: Path, suffix: str) -> None:
    # json keeps the last of two values for one key: the first answer, or the first id, would be lost unseen.
    answer_twice = (
        '{"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "a", "value": "b"}]}'
    )
    id_twice = (
        '{"id": 1, "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "a"}], "id": 2}'
    )
    deep_twice = (
        '{"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "a"}], '
        '"m": [[{"k": 1, "k": 2}]]}'
    )
    path = tmp_path / f"d{suffix}"
    good = json.dumps(SEED_EXAMPLE[2])
    records = [good, answer_twice, id_twice, good, deep_twice, good]
    path.write_text("\n".join(records) + "\n" if suffix == ".jsonl" else "[" + ",\n".join(records) + "]")
    read = read_dataset(path)
    assert len(read.conversations) == 3  # a record after one with a key twice is read as any other
    assert [(p.field, "appears twice" in p.reason) for p in read.problems] == [
        ("conversations[1].value", True),
        ("id", True),
        ("m[0][0].k", True),
    ]


def test_a_line_that_does_not_parse_leaves_the_next_as_it_is_and_a_bom_past_the_first_line_is_named(
    tmp_path: Path,
) -> None:
    """A line that breaks after an object with a key twice is one problem, and the line after it is read as any other;
    a BOM at the start of a line past the first (a file joined from others) is named as json names it."""
    good = json.dumps(SEED_EXAMPLE[2])
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(["\ufeff" + good, '[{"k": 1, "k": 2}, ', good, "\ufeff" + good]) + "\n")
    read = read_dataset(path)
    assert len(read.conversations) == 2
    assert [str(p) for p in read.problems] == [
        f"{path}:2 (line): not valid JSON: Expecting value at column 20",
        f"{path}:4 (line): not valid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) at column 1",
    ]


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        (
            {
                "conversations": [
                    {"from": "user", "value": "<image>What is it?"},
                    {"from": "assistant", "value": "a cat"},
                ],
                "images": ["cat.png"],
            },
            "images",
            r"<img>path</img> tags",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "draft", "loss": False},
                    {"role": "user", "content": "again"},
                    {"role": "assistant", "content": "final"},
                ]
            },
            "messages[1].loss",
            r'a turn has "role" and "content" only',
        ),
        (
            {"conversations": [{"from": "user", "value": "hi", "name": "ann"}, {"from": "assistant", "value": "a"}]},
            "conversations[0].name",
            r'a turn has "from" and "value" only',
        ),
        (
            {
                "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "a"}],
                "messages": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "b"}],
            },
            "messages",
            r"a record is in one format",
        ),
    ],
    ids=["images beside conversations", "a turn's loss", "a turn's name", "messages beside conversations"],
)
def test_a_field_the_parser_would_not_read_is_rejected(
    tmp_path: Path, record: dict[str, object], field: str, reason: str
) -> None:
    # Left unread, each would be gone from the snapshot without a word: the image, the turn masked from the loss.
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(SEED_EXAMPLE[2]) + "\n" + json.dumps(record) + "\n")
    read = read_dataset(path)
    assert len(read.conversations) == 1
    [problem] = read.problems
    assert (problem.location, problem.field) == (f"{path}:2", field)
    assert re.search(reason, problem.reason), problem.reason


def test_each_spelling_of_an_image_resolves_and_a_link_is_followed_where_it_leads_at_each_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan resolves each distinct reference once (`ImagePaths`): every spelling of one image still names it, a
    reference refused once is refused again under its own field, and the next scan sees a symlink pointed elsewhere."""
    monkeypatch.setenv("HOME", str(tmp_path))
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    a, b, outside = data / "images" / "a.png", data / "images" / "b.png", tmp_path / "outside.png"
    for path in (a, b, outside):
        path.write_bytes(b"png")
    a, b, outside = a.resolve(), b.resolve(), outside.resolve()  # as scans name them, if tmp_path is under a link
    link = data / "link.png"
    link.symlink_to(a)
    spellings = ["images/a.png", "./images/a.png", "link.png", "images/../link.png", "~/data/images/a.png", "link.png"]
    records: list[dict[str, Any]] = [
        {"conversations": [{"from": "user", "value": f"<img>{name}</img>What?"}, {"from": "assistant", "value": "A"}]}
        for name in spellings
    ]
    records.append(
        {
            "messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A"}],
            "images": ["link.png"],
        }
    )
    file = data / "d.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in records))

    def scan() -> list[str]:
        read = read_dataset(file)
        assert read.problems == []
        return [image.uri for conv in read.conversations for image in conv.images]

    assert scan() == [str(a)] * 7
    link.unlink()
    link.symlink_to(b)
    assert scan() == [str(a), str(a), str(b), str(b), str(a), str(b), str(b)]
    link.unlink()
    link.symlink_to(outside)
    problems = read_dataset(file).problems
    assert [(p.location, p.field) for p in problems] == [
        (f"{file}:3", "conversations[0].value"),
        (f"{file}:4", "conversations[0].value"),
        (f"{file}:6", "conversations[0].value"),
        (f"{file}:7", "images[0]"),
    ]
    assert all(f"outside the dataset's folder (a link to {outside})" in p.reason for p in problems)
