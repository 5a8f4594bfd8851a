"""Batch inference split over worker processes (one per GPU on a GPU machine; here two CPU processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmops.config import load_config
from vlmops.infer.batch import batch_infer
from vlmops.infer.parallel import merge_shards, parallel_batch_infer
from vlmops.models.loading import load_model


def test_two_workers_give_every_record_once_and_the_same_answers(
    tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]
) -> None:
    _, eval_file = demo_data  # 6 records in 2 shares of 3, batches of 2 + 1
    config = load_config(None, ["infer.batch_size=2", "infer.max_new_tokens=4"])
    single = batch_infer(load_model(tiny_model, device="cpu"), eval_file, tmp_path / "one.jsonl", config.infer)
    split = parallel_batch_infer(tiny_model, eval_file, tmp_path / "two.jsonl", config, workers=2)
    one = [json.loads(line) for line in single.path.read_text().splitlines()]
    two = [json.loads(line) for line in split.path.read_text().splitlines()]
    assert [r["index"] for r in two] == list(range(6))
    assert [r["prediction"] for r in two] == [r["prediction"] for r in one]
    assert split.count == 6
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_merge_refuses_duplicates_and_gaps(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"index": i, "generated_tokens": 1}) + "\n" for i in (0, 2)))
    b.write_text("".join(json.dumps({"index": i, "generated_tokens": 1}) + "\n" for i in (1, 3)))
    records, tokens = merge_shards([a, b], 4)
    assert [r["index"] for r in records] == [0, 1, 2, 3] and tokens == 4
    with pytest.raises(RuntimeError, match=r"missing \[4\]"):
        merge_shards([a, b], 5)
    b.write_text("".join(json.dumps({"index": i}) + "\n" for i in (1, 2)))
    with pytest.raises(RuntimeError, match="predicted twice"):
        merge_shards([a, b], 3)
