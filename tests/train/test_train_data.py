"""The training data path: max_length policies, truncation that never cuts an image, mixed batches,
lazy image loading in DataLoader workers, seeded shuffling."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from vlmops.config import load_config
from vlmops.conversation import Conversation
from vlmops.data.formats import read_dataset
from vlmops.data.images import ImageLoadError
from vlmops.data.length import length_fingerprint, read_lengths
from vlmops.data.parsing import parse_record
from vlmops.data.prepare import PreparedDataset
from vlmops.data.problems import DatasetError
from vlmops.models.template import IGNORE_INDEX, IMAGE_TOKEN, encode
from vlmops.train.data import SFTDataset, VisionLanguageCollator

NIT = 16  # image tokens per image on the tiny models


@pytest.fixture(scope="module")
def processor(tiny_model: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def image(demo_data: tuple[Path, Path]) -> str:
    return str(sorted((demo_data[0].parent / "images").iterdir())[0])


def record(*turns: str, source: str = "t.jsonl:1") -> Conversation:
    roles = ["user", "assistant"] * len(turns)
    conv = {"conversations": [{"from": r, "value": v} for r, v in zip(roles, turns, strict=False)]}
    return parse_record(conv, source, Path("/"))


def length(conv: Conversation, processor: Any) -> int:
    return len(encode(conv.messages, processor.tokenizer, NIT))


def test_error_policy_lists_every_too_long_record(processor: Any, image: str) -> None:
    short = record(f"<img>{image}</img>What colour?", "red", source="a.jsonl:1")
    long_a = record(f"<img>{image}</img>" + "what colour is it " * 20, "red", source="a.jsonl:2")
    long_b = record("say hello " * 30, "hello", source="a.jsonl:3")
    limit = length(short, processor)
    with pytest.raises(DatasetError) as err:
        SFTDataset([short, long_a, long_b], processor, limit, "error")
    assert [p.location for p in err.value.problems] == ["a.jsonl:2", "a.jsonl:3"]
    assert f"> data.max_length {limit}" in str(err.value)
    assert "drop" in str(err.value) and "truncate-text" in str(err.value)


def test_drop_policy_drops_and_reports(processor: Any, image: str) -> None:
    short = record(f"<img>{image}</img>What colour?", "red", source="a.jsonl:1")
    long_a = record(f"<img>{image}</img>" + "what colour is it " * 20, "red", source="a.jsonl:2")
    dataset = SFTDataset([short, long_a, short], processor, length(short, processor), "drop")
    assert len(dataset) == 2
    assert dataset.report.dropped == ["a.jsonl:2"]

    # Every record dropped: the error names the file and what to change (it said only "the train split has no
    # record left after data.max_length_policy drop").
    with pytest.raises(ValueError) as err:
        SFTDataset([long_a], processor, length(short, processor), "drop")
    assert str(err.value).startswith(
        "a.jsonl: every record of the train split (1 record) is longer than data.max_length "
    ), err.value
    assert ", and data.max_length_policy drop left none: raise data.max_length to at least " in str(err.value)
    assert f"raise data.max_length to at least {length(long_a, processor)}" in str(err.value)
    assert "data.max_length_policy to truncate-text" in str(err.value)


def check_sample(dataset: SFTDataset, index: int, limit: int) -> dict[str, torch.Tensor]:
    """A loaded sample fits, holds only whole images, and every image has its pixels."""
    sample = dataset[index]
    ids = sample["input_ids"].tolist()
    assert len(ids) <= limit
    image_tokens = ids.count(dataset.image_token_id)
    images = len(dataset.encoded(index).images)
    assert image_tokens == images * NIT
    assert sample.get("pixel_values", torch.empty(0, 3, 32, 32)).shape[0] == images
    assert any(label != IGNORE_INDEX for label in sample["labels"].tolist())
    return sample


def test_truncate_drops_whole_trailing_turns_first(processor: Any, image: str) -> None:
    first = [f"<img>{image}</img>What colour is the shape?", "red"]
    second = [f"<img>{image}</img>" + "and what shape is it " * 10, "circle"]
    conv = record(*first, *second)
    limit = length(record(*first), processor) + 5
    dataset = SFTDataset([conv], processor, limit, "truncate-text")
    assert dataset.report.truncated == [conv.source]
    sample = check_sample(dataset, 0, limit)
    # What is left is exactly the first exchange, ending with its answer's EOS.
    expected = encode(record(*first).messages, processor.tokenizer, NIT)
    assert sample["input_ids"].tolist() == expected.input_ids
    assert sample["labels"].tolist() == expected.labels
    assert sample["input_ids"][-1] == processor.tokenizer.eos_token_id


def test_truncate_cuts_the_text_of_the_last_turn(processor: Any, image: str) -> None:
    conv = record(f"<img>{image}</img>What colour is the shape?", "red", "Name colours.", "red green blue " * 8)
    full = encode(conv.messages, processor.tokenizer, NIT)
    limit = len(full) - 10
    dataset = SFTDataset([conv], processor, limit, "truncate-text")
    sample = check_sample(dataset, 0, limit)
    # the first exchange whole, the second answer cut: labels exactly where the full sample had them
    assert sample["input_ids"].tolist() == full.input_ids[:limit]
    assert sample["labels"].tolist() == full.labels[:limit]
    assert sample["labels"][-1] != IGNORE_INDEX


def test_truncate_cuts_answer_text_but_keeps_images_whole(processor: Any, image: str) -> None:
    answer = "red green blue yellow purple orange " * 6
    conv = record(f"<img>{image}</img><img>{image}</img>Name colours.", answer)
    full = encode(conv.messages, processor.tokenizer, NIT)
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    limit = first_label + 3  # room for three answer tokens
    dataset = SFTDataset([conv], processor, limit, "truncate-text")
    sample = check_sample(dataset, 0, limit)
    assert len(dataset.encoded(0).images) == 2
    assert sample["input_ids"].tolist() == full.input_ids[:limit]
    # labels only on the kept answer tokens, and no EOS (the answer was cut, not finished)
    assert sample["labels"].tolist() == full.labels[:limit]
    assert sum(label != IGNORE_INDEX for label in sample["labels"].tolist()) == 3


def test_truncate_refuses_to_cut_into_an_image(processor: Any, image: str) -> None:
    conv = record("Describe " + f"<img>{image}</img>" * 3 + "these.", "red", source="b.jsonl:7")
    full = encode(conv.messages, processor.tokenizer, NIT)
    image_start = full.input_ids.index(processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    limit = image_start + NIT + NIT // 2  # the cut would land in the middle of the second image
    with pytest.raises(DatasetError) as err:
        SFTDataset([conv], processor, limit, "truncate-text")
    assert err.value.problems[0].location == "b.jsonl:7"
    assert "leaves no answer token" in str(err.value)


def test_truncate_on_real_data_keeps_every_sample_whole(processor: Any, demo_data: tuple[Path, Path]) -> None:
    conversations = read_dataset(demo_data[0]).conversations
    limit = 80  # demo lengths: 54-79 (one image or none), 95 (two turns), 96 (two images, then the question)
    two_images = [c for c in conversations if len(c.images) == 2]
    rest = [c for c in conversations if len(c.images) < 2]
    dataset = SFTDataset(rest, processor, limit, "truncate-text")
    assert len(dataset) == len(rest)
    assert sorted(dataset.report.truncated) == sorted(c.source for c in rest if len(c.messages) == 4)
    for index in range(len(dataset)):
        check_sample(dataset, index, limit)
    # Cutting a two-image record at 80 would leave only its prompt: refused, each record named.
    with pytest.raises(DatasetError) as err:
        SFTDataset(conversations, processor, limit, "truncate-text")
    assert sorted(p.location for p in err.value.problems) == sorted(c.source for c in two_images)


def test_training_reuses_the_lengths_validation_measured(
    processor: Any, snapshot: PreparedDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    fingerprint = length_fingerprint(processor.tokenizer, NIT, None)
    saved = read_lengths(snapshot.path, fingerprint)
    assert saved["train"] == snapshot.report.lengths["train"] and len(saved["eval"]) == 8
    assert read_lengths(snapshot.path, length_fingerprint(processor.tokenizer, NIT, "another system prompt")) == {}
    conversations = read_dataset(snapshot.train_file).conversations
    measured = SFTDataset(conversations, processor, 512, "error")
    assert measured.lengths == saved["train"]
    import vlmops.train.data as train_data

    calls = []
    monkeypatch.setattr(train_data, "encode", lambda *a, **k: calls.append(a) or encode(*a, **k))
    reused = SFTDataset(conversations, processor, 512, "error", lengths=saved["train"])
    assert reused.lengths == measured.lengths and calls == []  # not tokenised again
    cuttable = [(c, n) for c, n in zip(conversations, saved["train"], strict=True) if len(c.images) < 2]
    rest, rest_lengths = [c for c, _ in cuttable], [n for _, n in cuttable]
    cut = SFTDataset(rest, processor, 80, "truncate-text", lengths=rest_lengths)
    assert 0 < len(calls) == sum(n > 80 for n in rest_lengths)  # only the records to cut
    assert cut.lengths == SFTDataset(rest, processor, 80, "truncate-text").lengths and max(cut.lengths) <= 80


def test_collator_mixes_text_only_and_image_samples(processor: Any, image: str) -> None:
    convs = [
        record(f"<img>{image}</img><img>{image}</img>Two?", "red"),
        record("Say hello.", "hello"),
        record(f"<img>{image}</img>One?", "blue"),
    ]
    dataset = SFTDataset(convs, processor, 512, "error")
    samples = [dataset[i] for i in range(3)]
    batch = VisionLanguageCollator(pad_token_id=processor.tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"].shape[0] == 3
    assert torch.equal(batch["pixel_values"][:2], samples[0]["pixel_values"])  # in sample order
    assert torch.equal(batch["pixel_values"][2], samples[2]["pixel_values"][0])
    longest = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape == (3, longest)
    assert batch["attention_mask"][1].sum() == len(samples[1]["input_ids"])
    assert (batch["labels"][1, len(samples[1]["input_ids"]) :] == IGNORE_INDEX).all()
    text_only = VisionLanguageCollator(pad_token_id=0)([samples[1], samples[1]])
    assert "pixel_values" not in text_only


def test_images_load_lazily_in_dataloader_workers(processor: Any, demo_data: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(demo_data[0].parent, data_dir)
    conversations = read_dataset(data_dir / "train.jsonl").conversations[:12]
    dataset = SFTDataset(conversations, processor, 512, "error")
    collate = VisionLanguageCollator(pad_token_id=processor.tokenizer.pad_token_id)
    in_process = list(DataLoader(dataset, batch_size=4, collate_fn=collate))
    in_workers = list(DataLoader(dataset, batch_size=4, collate_fn=collate, num_workers=2))
    for a, b in zip(in_process, in_workers, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The dataset was built without reading images: remove one and only that sample fails, when loaded.
    victim = next(i for i in range(len(dataset)) if dataset.encoded(i).images)
    Path(dataset.encoded(victim).images[0].uri).unlink()
    with pytest.raises(ImageLoadError, match="file not found"):
        dataset[victim]


def test_shuffling_is_deterministic_by_seed(tiny_model: Path, processor: Any, snapshot: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from vlmops.train.sft import dummy_pixel_values, training_arguments
    from vlmops.train.trainer import VLTrainer

    dataset = SFTDataset(read_dataset(snapshot.train_file).conversations, processor, 512, "error")
    in_file_order = [dataset[i]["input_ids"].tolist() for i in range(8)]

    def order(seed: int) -> list[list[int]]:
        config = load_config(None, {"run.seed": seed, "train.batch_size": 8})
        trainer = VLTrainer(
            model=AutoModelForImageTextToText.from_pretrained(tiny_model),
            args=training_arguments(config, tmp_path / f"s{seed}", "fp32"),
            train_dataset=dataset,
            eval_dataset=dataset,
            data_collator=VisionLanguageCollator(pad_token_id=processor.tokenizer.pad_token_id),
            run_files=[],
            dummy_pixels=dummy_pixel_values(processor),
        )
        return [
            [t for t in row if t != processor.tokenizer.pad_token_id]
            for batch in trainer.get_train_dataloader()
            for row in batch["input_ids"].tolist()
        ]

    first = order(0)
    assert first == order(0)
    assert first != order(1)
    assert first[:8] != in_file_order  # shuffled
