"""batch_infer: every record once and in order, batching that does not change answers, atomic output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlmops.config import InferConfig
from vlmops.conversation import to_img_tags
from vlmops.data.formats import DatasetError, read_dataset
from vlmops.data.images import ImageLoadError
from vlmops.infer.batch import batch_infer
from vlmops.infer.generation import answer_tokens
from vlmops.models.loading import LoadedModel, load_model


def infer(batch_size: int, max_new_tokens: int = 10) -> InferConfig:
    return InferConfig.model_validate({"batch_size": batch_size, "max_new_tokens": max_new_tokens})


@pytest.fixture(scope="module")
def loaded(tiny_model: Path) -> LoadedModel:
    return load_model(tiny_model)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_record_once_in_input_order_across_uneven_batches(
    loaded: LoadedModel, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    train_file, _ = demo_data  # 11 records: single-image, multi-turn, two-image and text-only ones
    result = batch_infer(loaded, train_file, tmp_path / "pred.jsonl", infer(batch_size=4))  # 4 + 4 + 3
    records = read_lines(result.path)
    conversations = read_dataset(train_file).conversations

    assert result.count == len(records) == len(conversations) == 11
    assert [r["index"] for r in records] == list(range(11))
    assert [r["source"] for r in records] == [c.source for c in conversations]
    for record, conv in zip(records, conversations):
        assert record["reference"] == conv.messages[-1].text("")
        assert record["num_images"] == len(conv.images)
        assert len(record["history"]) == (len(conv.messages) - 2) // 2
        assert record["prompt"] == to_img_tags(conv.messages[-2].parts)
    kinds = {(r["num_images"], len(r["history"])) for r in records}
    assert {(0, 0), (1, 0), (2, 0), (1, 1)} <= kinds, kinds  # the batches really mixed every record kind
    assert result.generated_tokens == sum(r["generated_tokens"] for r in records) > 0
    assert result.tokens_per_s > 0


def test_answers_end_at_the_first_eos() -> None:
    # generate pads a row that finished early (here: pad 2 after EOS 1) until the longest row is done
    assert answer_tokens([5, 6, 1, 2, 2], eos_token_id=1) == [5, 6, 1]
    assert answer_tokens([5, 6, 7], eos_token_id=1) == [5, 6, 7]


def test_batching_does_not_change_the_answers(
    loaded: LoadedModel, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    """Left padding and batched images must give what each record gets alone (greedy, float32)."""
    train_file, _ = demo_data
    one = read_lines(batch_infer(loaded, train_file, tmp_path / "one.jsonl", infer(batch_size=1)).path)
    many = read_lines(batch_infer(loaded, train_file, tmp_path / "many.jsonl", infer(batch_size=5)).path)
    assert [r["prediction"] for r in many] == [r["prediction"] for r in one]


def test_hybrid_model_batches(tiny_hybrid_model: Path, demo_data: tuple[Path, Path], tmp_path: Path) -> None:
    _, eval_file = demo_data
    hybrid = load_model(tiny_hybrid_model)
    one = read_lines(batch_infer(hybrid, eval_file, tmp_path / "one.jsonl", infer(batch_size=1)).path)
    many = read_lines(batch_infer(hybrid, eval_file, tmp_path / "many.jsonl", infer(batch_size=4)).path)
    assert [r["prediction"] for r in many] == [r["prediction"] for r in one]
    assert len(many) == 6


def copy_dataset(demo_data: tuple[Path, Path], folder: Path) -> Path:
    """A private copy of the demo train split, images included, that a test may damage."""
    shutil.copytree(demo_data[0].parent, folder)
    return folder / "train.jsonl"


def test_unreadable_image_mid_way_leaves_no_output_file(
    loaded: LoadedModel, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    dataset = copy_dataset(demo_data, tmp_path / "data")
    lines = dataset.read_text().splitlines()
    # Record 9 (of 11) gets an image that exists but is not a picture: found only when its batch runs.
    bad = tmp_path / "data" / "images" / "broken.png"
    bad.write_bytes(b"this is not a png")
    lines[8] = json.dumps(
        {
            "conversations": [
                {"from": "user", "value": f"<img>{bad}</img>Colour?"},
                {"from": "assistant", "value": "red"},
            ]
        }
    )
    dataset.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "pred.jsonl"
    out.parent.mkdir()
    with pytest.raises(ImageLoadError, match=r"train\.jsonl:9: image \S*broken\.png: not a readable image"):
        batch_infer(loaded, dataset, out, infer(batch_size=2))
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temp file left behind either

    # A finished predictions file from before is left exactly as it was.
    out.write_text('{"index": 0}\n')
    with pytest.raises(ImageLoadError):
        batch_infer(loaded, dataset, out, infer(batch_size=2))
    assert out.read_text() == '{"index": 0}\n'


def test_missing_image_fails_before_generating(
    loaded: LoadedModel, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    dataset = copy_dataset(demo_data, tmp_path / "data")
    record = json.loads(dataset.read_text().splitlines()[-1])
    missing = (tmp_path / "data" / "images" / "gone.png").resolve()
    record["conversations"][0]["value"] = f"<img>{missing}</img>Colour?"
    with dataset.open("a") as f:
        f.write(json.dumps(record) + "\n")
    out = tmp_path / "pred.jsonl"
    with pytest.raises(ImageLoadError, match=r"1 image file\(s\) not found:\n  - \S*train\.jsonl:12: \S*gone\.png"):
        batch_infer(loaded, dataset, out, infer(batch_size=4))
    assert not out.exists()


def test_invalid_records_are_refused_not_skipped(
    loaded: LoadedModel, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    dataset = copy_dataset(demo_data, tmp_path / "data")
    with dataset.open("a") as f:
        f.write(json.dumps({"conversations": [{"from": "user", "value": "no answer"}]}) + "\n")
    with pytest.raises(DatasetError, match=r"train\.jsonl:12 \(turns\): the conversation must end with an assistant"):
        batch_infer(loaded, dataset, tmp_path / "pred.jsonl", infer(batch_size=4))
