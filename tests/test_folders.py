"""A folder someone gave is read whole: files in a symlinked subfolder are found, hashed and uploaded, once each."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vlmops.data.formats import dataset_files
from vlmops.folders import files_under
from vlmops.infer.planning import folder_hash
from vlmops.infer.records import find_inputs


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
    assert warned == [
        f"{root / 'up'} links to {root.resolve()}, already read: not read twice",
        f"{root / 'zz-again'} links to {(tmp_path / 'elsewhere' / 'batch').resolve()}, already read: not read twice",
    ]


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
