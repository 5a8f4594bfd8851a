"""Batch inference over worker processes (one per GPU on a GPU machine; here two CPU processes), the check
that every shard adds up before the manifest is written, and child process groups stopped as a whole."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.image_server import serving_images
from tests.infer.test_batch_infer import rejects, results
from vlmops.config import load_config
from vlmops.errors import RunFailed
from vlmops.infer.batch_job import run_batch_job
from vlmops.infer.job_output import finalize, open_job, pending_shards
from vlmops.infer.job_plan import ModelInfo
from vlmops.infer.job_status import JobResult
from vlmops.infer.output import open_output
from vlmops.infer.parallel import CHILD_CONFIG_STEM, POLL_S, WORKERS_STEM, complete_lines, run_in_process_group
from vlmops.infer.planning import plan_job
from vlmops.scratch import held_folder, remove_abandoned_folders

ROOT = Path(__file__).resolve().parents[2]


def test_two_workers_give_every_record_once_and_the_same_answers(
    tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]
) -> None:
    _, eval_file = demo_data  # 6 records in 3 shards of 2: worker 0 takes shards 0 and 2, worker 1 shard 1
    overrides = ["infer.batch_size=2", "infer.max_new_tokens=4", "infer.shard_size=2"]
    single = run_batch_job(str(tiny_model), str(eval_file), str(tmp_path / "one"), load_config(None, overrides))
    split = run_batch_job(
        str(tiny_model), str(eval_file), str(tmp_path / "two"), load_config(None, [*overrides, "infer.workers=2"])
    )
    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert [r["key"] for r in two] == [f"eval.jsonl:{i}" for i in range(1, 7)]  # input order, each once
    assert [r["response"] for r in two] == [r["response"] for r in one]
    assert split.results == 6 and split.manifest["job_id"] == single.manifest["job_id"]
    assert sorted(s.shard for s in split.ran) == [0, 1, 2]
    assert len({s.worker for s in split.ran}) == 2  # both processes answered shards
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_finalize_refuses_missing_shards_and_shards_that_do_not_add_up(
    tmp_path: Path, demo_data: tuple[Path, Path]
) -> None:
    _, eval_file = demo_data
    config = load_config(None, ["infer.shard_size=4"])  # 6 records: shards of 4 and 2
    output = open_output(str(tmp_path / "out"))
    plan = open_job(plan_job(ModelInfo("m", None, "sha256:0"), str(eval_file), config), output)
    part = tmp_path / "out" / "part-00000.jsonl"
    part.write_text("".join(json.dumps({"key": i, "generated_tokens": 1}) + "\n" for i in range(4)))
    assert [s.index for s in pending_shards(plan, output)] == [1]
    with pytest.raises(RunFailed, match=r"1 shard not done yet \(00001\); run the same job again"):
        finalize(plan, output)
    (tmp_path / "out" / "part-00001.jsonl").write_text(json.dumps({"key": 4, "generated_tokens": 1}) + "\n")
    with pytest.raises(RunFailed, match=r"shard 00001 has 1 result and 0 rejects for 2 records"):
        finalize(plan, output)
    (tmp_path / "out" / "part-00001.jsonl").write_text(
        "".join(json.dumps({"key": i, "generated_tokens": 1}) + "\n" for i in (4, 5))
    )
    part.write_text(part.read_text() + json.dumps({"key": 3, "generated_tokens": 1}) + "\n")  # one twice
    with pytest.raises(RunFailed, match=r"shard 00000 has 5 results and 0 rejects for 4 records"):
        finalize(plan, output)
    assert not (tmp_path / "out" / "manifest.json").exists()


CHILD = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(sys.argv[1], "w").write(f"{os.getpid()} {grandchild.pid}")
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "State:\tZ" in status.read_text())


def test_an_interrupt_stops_the_child_and_everything_it_started(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"

    def interrupt_once_started() -> None:
        if pids_file.is_file() and pids_file.read_text():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_in_process_group([sys.executable, "-c", CHILD, str(pids_file)], poll=interrupt_once_started)
    pids = [int(p) for p in pids_file.read_text().split()]
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)

    with pytest.raises(RunFailed, match="exited with status 3") as failed:
        run_in_process_group([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert "last lines" not in str(failed.value)


def test_a_failed_childs_last_error_lines_end_its_error(capfd: pytest.CaptureFixture[str]) -> None:
    """A flow shows the task's exception, not the child's terminal: why the child failed must be in it."""
    child = "import sys\nfor i in range(30): print(f'line {i}', file=sys.stderr)\nsys.exit('vlmops: error: the reason')"
    with pytest.raises(RunFailed) as failed:
        run_in_process_group([sys.executable, "-c", child])
    message = str(failed.value)
    assert message.endswith("  line 28\n  line 29\n  vlmops: error: the reason"), message
    assert "  line 19\n" in message and "line 18" not in message
    assert "line 0" in capfd.readouterr().err  # all of it still reached our stderr as it came


def test_a_stats_line_being_written_is_read_once_whole(tmp_path: Path) -> None:
    """The coordinator polls each worker's stats file while the worker appends to it: a line without its newline
    yet is not parsed (json.loads of half a line failed the whole job), and is read whole on the next poll."""
    stats = tmp_path / "stats-0.jsonl"
    assert complete_lines(stats) == []  # not written yet
    first = json.dumps({"shard": 0, "results": 3})
    second = json.dumps({"shard": 2, "results": 4})
    stats.write_text(first + "\n" + second[:9], encoding="utf-8")
    assert complete_lines(stats) == [first]
    with stats.open("a", encoding="utf-8") as f:
        f.write(second[9:] + "\n")
    assert [json.loads(line) for line in complete_lines(stats)] == [json.loads(first), json.loads(second)]


# A step that runs a batch job in a child (a Prefect task's process, here a plain one): killed outright below.
JOB_STARTER = """
import sys
from vlmops.config import load_config
from vlmops.infer.parallel import run_job_in_child
model, prompts, out, *overrides = sys.argv[1:]
run_job_in_child(model, prompts, out, load_config(None, overrides))
"""
KILLED_JOB = ["infer.shard_size=2", "infer.max_new_tokens=4", "storage.url_allow_networks=[127.0.0.1/32]"]
# Scratch folders that a step and a job killed outright before left in the temp dir (`held_folder`'s, unheld).
ABANDONED = """
import os, signal, sys
from pathlib import Path
from vlmops.scratch import new_held_folder
for stem in sys.argv[2:]:
    new_held_folder(Path(sys.argv[1]), stem)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _session(sid: int) -> list[int]:
    """The live processes of session `sid` (a zombie has exited: it counts as gone)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, _pgrp, session = stat.read_text().rpartition(")")[2].split()[:4]
        except OSError:
            continue  # ended as we looked
        if int(session) == sid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def _children(pid: int, argument: str) -> list[int]:
    """The children of `pid` whose command line holds `argument`."""
    found = []
    for child in psutil.Process(pid).children():
        try:
            if argument in child.cmdline():
                found.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """Those of `pids` still alive after `seconds`."""
    deadline = time.monotonic() + seconds
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a process dies with its parent on Linux")
def test_a_step_killed_outright_takes_its_job_and_the_jobs_workers_with_it(tiny_model: Path, tmp_path: Path) -> None:
    """SIGKILL of the step alone (the OOM killer, a cancellation past its grace period) runs no clean-up in it, yet
    the job's child dies with it, and so, killed alone as it is, takes both its workers; an orphan kept the GPU's
    memory and went on writing the output. The same job run again then answers every record exactly once.

    The step's folder (the job's config) and the job's (the workers' config and stats) are left in the temp dir: each
    removes those that such kills left before as it starts (a TemporaryDirectory's were left forever), never a live
    process's (here this process's own)."""
    # 12 records in 6 shards of 2 (worker 0 answers shards 0, 2, 4; worker 1 shards 1, 3, 5), two of them rejects.
    # Each worker's second shard holds an image the server holds back: the job stays mid-way until the test is done
    # with it (left to run on, an orphan would finish its few records unseen).
    lines: list[dict[str, object]] = [
        {"id": f"r{i}", "query": f"What is {i}?"} if i % 5 != 4 else {"prompt": "neither"} for i in range(12)
    ]
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    scratch = tmp_path / "tmp"  # TMPDIR: where the step and the job make their scratch folders
    scratch.mkdir()
    with (
        serving_images() as server,
        held_folder(CHILD_CONFIG_STEM, scratch) as live_config,
        held_folder(WORKERS_STEM, scratch) as live_workers,
    ):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)}
        abandoning = [sys.executable, "-c", ABANDONED, str(scratch), CHILD_CONFIG_STEM, WORKERS_STEM]
        assert subprocess.run(abandoning, env=env).returncode == -signal.SIGKILL
        dead = set(scratch.iterdir()) - {live_config, live_workers}
        assert len(dead) == 2
        for i in (5, 7):
            lines[i]["images"] = [f"{server.url}/held.png"]
        prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
        step = [sys.executable, "-c", JOB_STARTER, str(tiny_model), str(prompts), str(out)]
        starter = subprocess.Popen(
            [*step, "infer.workers=2", "infer.batch_size=1", *KILLED_JOB], env=env, start_new_session=True
        )
        job = None
        try:
            deadline = time.monotonic() + 120
            while True:  # until both workers run and each has written its first part
                assert starter.poll() is None, "the job ended before the step could be killed"
                assert time.monotonic() < deadline, "the job did not get under way"
                jobs = _children(starter.pid, "batch-infer")
                job = jobs[0] if jobs else None  # the leader of a session of its own: its workers join it
                workers = _children(job, "vlmops.infer.parallel") if job else []
                if len(workers) == 2 and len(list(out.glob("part-*.jsonl"))) == 2:
                    break
                time.sleep(0.05)
            assert job is not None
            # The job has shown both parts in its progress bar and has nothing more to write while the workers
            # wait: an orphan that wrote to its stderr (a pipe to the killed step) would end with a broken pipe,
            # which a long shard on a GPU would not reach for minutes.
            time.sleep(3 * POLL_S)
            os.kill(starter.pid, signal.SIGKILL)  # the step alone, not its group
            starter.wait()
            assert not _gone_within([job], 3), "the job's child outlived the step that started it"
            assert not _gone_within(workers, 3), "the job's workers outlived the job"
            assert not _session(job), "a process of the job outlived it"
        finally:
            if starter.poll() is None:
                starter.kill()
                starter.wait()
            for pid in _session(job) if job else []:  # what the code under test left behind
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        server.release.set()
        assert not (out / "manifest.json").exists()
        # The earlier kills' folders went as the step (its config's) and the job (its workers') started; the killed
        # step's and job's own are left, one each, for the next step's and job's sweep, which leaves the live ones.
        assert not dead & set(scratch.iterdir())
        for stem in (CHILD_CONFIG_STEM, WORKERS_STEM):
            # A killed process's lock goes once its last thread has ended, which may be after it shows as a zombie.
            deadline = time.monotonic() + 10
            while not (found := [r.name for r in remove_abandoned_folders(scratch, stem)]):
                assert time.monotonic() < deadline, f"the killed process's {stem} folder is still held"
                time.sleep(0.05)
            (killed,) = found
            assert killed.startswith(stem)
        assert sorted(scratch.iterdir()) == sorted([live_config, live_workers])

        # The same job again (workers and batch size are not part of it: here in this process, faster).
        config = load_config(None, ["infer.batch_size=4", *KILLED_JOB])
        done = run_batch_job(str(tiny_model), str(prompts), str(out), config)
    assert isinstance(done, JobResult) and (done.records, done.results, done.rejects) == (12, 10, 2)
    assert sorted(s.shard for s in done.ran) == [2, 3, 4, 5]  # the two answered before the kill are kept
    answered = [int(r["key"][1:]) for r in results(out)]
    rejected = [r["line"] - 1 for r in rejects(out)]
    assert sorted(answered + rejected) == list(range(12)) and sorted(rejected) == [4, 9]
