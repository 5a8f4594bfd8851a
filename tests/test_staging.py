"""Folders published whole: content-addressed ones are never swapped under a process that reads them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmops.scratch import FOREIGN_STALE_S
from vlmops.staging import STAGING_PREFIX, LockTimeoutError, build_lock, staged_folder, staging_in

ROOT = Path(__file__).resolve().parents[1]

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


BUILDING = """
import os, signal, sys
from pathlib import Path
from vlmops.staging import staging_in
with staging_in(Path(sys.argv[1]), sys.argv[2]) as stage:
    (stage.path / "model.safetensors").write_bytes(b"x" * 1000)  # a download under way
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print(stage.path, flush=True)
    sys.stdin.read()  # until the test is done with it
    stage.name(sys.argv[2])
"""


def test_staging_removes_the_folders_killed_processes_left_and_not_a_live_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model download (a merge, a conversion) killed outright (SIGKILL, the OOM killer) left its `.staging-`
    folder in the cache, GBs each, forever. The next build in that folder removes those of dead processes, whatever
    model they were for, but not the folder a live process is downloading into (another model's, at the same time),
    nor another machine's or an unmarked one until nothing in it changed for a day."""
    cache = tmp_path / "cache"
    building = [sys.executable, "-c", BUILDING, str(cache)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    live = subprocess.Popen(
        [*building, "v2", "wait"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert live.stdout is not None
        held = Path(live.stdout.readline().strip())
        assert subprocess.run([*building, "v1", "kill"], env=env).returncode == -signal.SIGKILL  # its sweep left `held`
        (dead,) = set(cache.iterdir()) - {held}
        foreign = cache / f".staging-v1.{'a' * 12}.{'1' * 32}"  # another kernel's (a cache on NFS): judged by its age
        unmarked = cache / ".staging-v1.k2x9_q1z"  # an older vlmops's (tempfile.mkdtemp), fresh: may still be building
        stale = cache / ".staging-v1.p0w8_e3r"  # ...and one a day old
        for folder in (foreign, unmarked, stale):
            folder.mkdir()
            (folder / "part").write_bytes(b"y" * 100)
        for path in (stale / "part", stale):
            os.utime(path, (time.time() - FOREIGN_STALE_S - 60,) * 2)
        with caplog.at_level("INFO", logger="vlmops.staging"), staging_in(cache, "v3") as stage:
            assert sorted(cache.iterdir()) == sorted([held, foreign, unmarked, stage.path])
            stage.name("v3")
    finally:
        live.communicate("")
    assert live.returncode == 0
    assert sorted(p.name for p in cache.iterdir()) == sorted(["v2", "v3", foreign.name, unmarked.name])
    said = [r.getMessage() for r in caplog.records if "staging folder" in r.getMessage()]
    swept = ", ".join(sorted([dead.name, stale.name]))
    assert said == [f"removed 2 staging folders (1.1 kB) that runs killed while writing left in {cache}: {swept}"]


SWAPPING = """
import os, shutil, signal, sys
from pathlib import Path
from vlmops.staging import staged_folder
final = Path(sys.argv[1])
with staged_folder(final) as staging:
    (staging / "model.safetensors").write_bytes(b"new")
    # Killed while the replaced version is removed (a model's GBs take a while): it stays beside the new one.
    shutil.rmtree = lambda path, *args, **kwargs: Path(path).exists() and os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_folder_replaced_by_a_process_killed_mid_swap_is_removed_by_the_next_build(tmp_path: Path) -> None:
    """Publishing over an existing folder moves the old one aside first (`.staging-old-`): a kill while it is removed
    left it beside the new one, under a name the old code only cleared when that same folder was written again."""
    final = tmp_path / "merged"
    with staged_folder(final) as staging:
        (staging / "model.safetensors").write_bytes(b"old")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", SWAPPING, str(final)], env=env).returncode == -signal.SIGKILL
    assert (final / "model.safetensors").read_bytes() == b"new"
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(f"{STAGING_PREFIX}old-merged")]
    assert (aside / "model.safetensors").read_bytes() == b"old"
    with staged_folder(tmp_path / "other") as staging:
        (staging / "weights").write_bytes(b"other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "other"]
