"""Folders published whole: content-addressed ones are never swapped under a process that reads them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlmops.staging import STAGING_PREFIX, LockTimeoutError, build_lock, staging_in

HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


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


def test_a_build_lock_held_too_long_names_the_lock_what_holds_it_and_the_way_out(tmp_path: Path) -> None:
    """Waiting past `timeout` on a lock another process holds ends in LockTimeoutError (a failed run, exit 1) naming
    the lock file, what its holder is doing and what to do: not filelock's bare Timeout ("The file lock ... could not
    be acquired") an hour into a run. The lock is an flock: killing its holder frees it at once, though the file
    stays, as the message says."""
    final = tmp_path / "cache" / "manifests" / "tiny-vl.json"
    lock_file = final.with_name(".tiny-vl.json.lock")
    final.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with (
            pytest.raises(LockTimeoutError) as raised,
            build_lock(final, "fetching s3://models/tiny-vl into /cache/s3/models/tiny-vl", timeout=0.3),
        ):
            pytest.fail("entered a lock that another process holds")
    finally:
        holder.kill()
        holder.wait()
    message = str(raised.value)
    assert message.startswith(f"{lock_file} is still locked after 0.3 s: another process is fetching s3://models/")
    assert f"lsof {lock_file}" in message and "a lock file left behind locks nothing" in message
    assert raised.value.exit_code == 1

    assert lock_file.exists()  # the killed holder's file is still there...
    with build_lock(final, timeout=0.3):  # ...and locks nothing
        assert lock_file.exists()
