"""Folders published whole: content-addressed ones are never swapped under a process that reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmops.staging import STAGING_PREFIX, staging_in


def test_a_content_addressed_folder_published_twice_keeps_the_first(tmp_path: Path) -> None:
    with staging_in(tmp_path, "dataset") as first:
        (first.path / "data.txt").write_text("same bytes")
        final = first.name("abc", replace=False)
    reader = (final / "data.txt").open()  # another run reads (or DVC tracks) the folder meanwhile
    inode = final.stat().st_ino
    with staging_in(tmp_path, "dataset") as second:
        (second.path / "data.txt").write_text("same bytes")
        second.name("abc", replace=False)
    assert final.stat().st_ino == inode  # the same folder, not a swapped-in copy
    assert (final / "data.txt").is_file() and reader.read() == "same bytes"
    reader.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)] == []


def test_a_text_written_atomically_is_old_or_new_never_a_part(tmp_path: Path) -> None:
    """run.json, config.yaml and result.json go through write_text_atomic: a write that breaks off mid-way (here a
    character UTF-8 cannot encode, after the good text) leaves the old file as it was and nothing beside it."""
    from vlmops.staging import write_text_atomic

    target = tmp_path / "run.json"
    write_text_atomic(target, '{"old": true}\n')
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(target, '{"new": "' + "x" * 100_000 + '\ud800"}\n')
    assert target.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    write_text_atomic(target, '{"new": true}\n')
    assert target.read_text() == '{"new": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
