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
