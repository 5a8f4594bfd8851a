"""A batch job stopped from outside: Ctrl-C, SIGTERM (`timeout`, systemd, Kubernetes, Slurm, `kill`) and a closed
terminal (SIGHUP) stop `vlmops batch-infer` the same way, and what stopped runs leave in an output is removed by the
next run of the job, never what a run going on writes.

The jobs: 12 records in 6 shards of 2; a record of shard 2 (and of shard 3, with two workers) holds an image the test's
server holds back, so that the job stays mid-way, two parts written, until the test lets it go.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import shlex
import signal
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from tests.image_server import serving_images
from tests.infer.test_batch_infer import rejects, results
from tests.infer.test_batch_job import ROOT, job_config, simple_prompts, start_until_parts
from tests.infer.test_parallel import _session
from vlmops.cli.main import main
from vlmops.infer.batch_job import run_batch_job
from vlmops.infer.job_status import JobResult
from vlmops.infer.output import TMP_DIR, open_output, written_file
from vlmops.plural import counted
from vlmops.scratch import FOREIGN_STALE_S

JOB = [
    "--set", "infer.shard_size=2", "--set", "infer.batch_size=1", "--set", "infer.max_new_tokens=4",
    "--set", "storage.url_allow_networks=[127.0.0.1/32]",
]  # fmt: skip
STOPPED_S = 20.0
"""How long a stopped job may take to end: it takes a fraction of a second; before, Ctrl-C waited on the held image's
read (storage.url_timeout_s, retried: two minutes)."""


def held_prompts(path: Path, url: str, held: tuple[int, ...] = (5,)) -> Path:
    lines: list[dict[str, Any]] = [{"id": f"r{i}", "query": f"What is {i}?"} for i in range(12)]
    for i in held:
        lines[i]["images"] = [f"{url}/held.png"]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def as_from_a_shell() -> None:
    """The signals' default dispositions, as a shell starts a command with: a pytest-xdist worker ignores SIGINT, and
    a child inherits what its parent ignores (`nohup` ignores SIGHUP: the command then leaves it ignored)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def on_a_terminal(cmd: list[str], env: dict[str, str], out: Path, parts: int) -> tuple[subprocess.Popen[bytes], int]:
    """`cmd` run on a terminal of its own (a pty it controls, as a login shell's command), returned with the terminal's
    far end once `parts` parts are written; what it prints is read meanwhile. Closing that end hangs the terminal up."""
    terminal, far = pty.openpty()

    def take_the_terminal() -> None:
        as_from_a_shell()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    job = subprocess.Popen(
        cmd, env=env, stdin=far, stdout=far, stderr=far, start_new_session=True, preexec_fn=take_the_terminal
    )
    os.close(far)
    os.set_blocking(terminal, False)
    deadline = time.monotonic() + 300
    while len(list(out.glob("part-*.jsonl"))) < parts:
        assert job.poll() is None, "the job ended before it could be stopped"
        assert time.monotonic() < deadline
        with contextlib.suppress(BlockingIOError):
            os.read(terminal, 1 << 16)
        time.sleep(0.05)
    return job, terminal


@pytest.mark.parametrize(
    ("stop", "status", "reason"),
    [
        ("Ctrl-C", 130, "interrupted"),
        ("SIGTERM", 143, "terminated: SIGTERM"),
        ("closed terminal", 129, "hung up: SIGHUP"),
    ],
)
def test_a_stopped_job_ends_at_once_saying_how_far_it_got_and_the_command_that_finishes_it(
    stop: str, status: int, reason: str, tiny_model: Path, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT to the command's process group), SIGTERM to its process and a closed terminal stop a job the
    same way: in a moment, although a record's image is being read from a server that does not answer, its processes
    gone, nothing half-written left, the exit status of the signal (128 + its number), and a line with the job, the
    shards done and the command that finishes it. Before, SIGTERM and SIGHUP killed the command outright (no line,
    no clean-up: an S3 output's scratch folder stayed), and Ctrl-C waited minutes for the image's read to time out."""
    out = tmp_path / "out"
    with serving_images() as server:
        prompts = held_prompts(tmp_path / "prompts.jsonl", server.url)
        args = ["batch-infer", "--model", str(tiny_model), "--input", str(prompts), "--output", str(out), *JOB]
        cmd = [sys.executable, "-m", "vlmops.cli", *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if stop == "closed terminal":
            job, terminal = on_a_terminal(cmd, env, out, 2)
            os.close(terminal)  # the terminal's window closed: SIGHUP, and every write to it fails from now on
        else:
            job = start_until_parts(cmd, env, out, 2, stderr=subprocess.PIPE, preexec_fn=as_from_a_shell)
            if stop == "Ctrl-C":
                os.killpg(job.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches its whole foreground group
            else:
                os.kill(job.pid, signal.SIGTERM)  # as `timeout`, systemd or the kubelet send it: to the process
        try:
            _, err = job.communicate(timeout=STOPPED_S)
        except subprocess.TimeoutExpired:
            job.kill()
            job.communicate()
            pytest.fail(f"the job did not end within {STOPPED_S:g} s of the {stop}")
        assert job.returncode == status, job.returncode
        assert not _session(job.pid), "a process of the job outlived it"
        assert sorted(p.name for p in out.glob("part-*.jsonl")) == ["part-00000.jsonl", "part-00001.jsonl"]
        assert not list((out / TMP_DIR).iterdir()) and not (out / "manifest.json").exists()
        again = args
        if stop != "closed terminal":  # there, the line went to the closed terminal
            job_id = json.loads((out / "_job" / "job.json").read_text())["job_id"]
            said, command = err.decode().rstrip("\n").split("\n")[-2:]
            assert said == (
                f"job {job_id} stopped ({reason}): 2 of 6 shards done in {out}, kept; to answer the rest, run the "
                f"same command again (vlmops batch-status {out} says where it stands):"
            ), said
            assert command == "  " + shlex.join(["vlmops", *args])
            again = shlex.split(command)[1:]
        kept = {part: part.stat().st_ino for part in out.glob("part-*.jsonl")}

        server.release.set()
        assert main(again) == 0  # the command the line gives, as it gives it
    assert sorted(int(str(r["key"])[1:]) for r in results(out)) == list(range(12)) and not rejects(out)  # once each
    assert {part: part.stat().st_ino for part in kept} == kept  # the parts from before the stop, not written again


def test_a_sigterm_stops_the_jobs_workers_and_removes_every_scratch_folder_of_an_s3_output(
    tiny_model: Path, tmp_path: Path, s3_server: Any
) -> None:
    """With an s3:// output each process of a job writes its files in a scratch folder of its own (then PUTs them):
    stopped by SIGTERM, the job stops its per-GPU workers and each removes its folder, as the job's own process does
    with its own. Killed outright before, all three were left in /tmp."""
    client = s3_server.client()
    client.create_bucket(Bucket="stops")
    scratch = tmp_path / "tmp"  # TMPDIR: where the processes make their scratch folders
    scratch.mkdir()
    with serving_images() as server:
        prompts = held_prompts(tmp_path / "prompts.jsonl", server.url, held=(5, 7))  # each worker's second shard
        client.upload_file(str(prompts), "stops", "in/prompts.jsonl")
        cmd = [
            sys.executable, "-m", "vlmops.cli", "batch-infer", "--model", str(tiny_model),
            "--input", "s3://stops/in", "--output", "s3://stops/out", *JOB, "--set", "infer.workers=2",
        ]  # fmt: skip
        env = {**os.environ, **s3_server.env(), "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)}
        job = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, preexec_fn=as_from_a_shell)
        try:
            deadline = time.monotonic() + 300
            while client.list_objects_v2(Bucket="stops", Prefix="out/part-")["KeyCount"] < 2:  # a part from each
                assert job.poll() is None, "the job ended before it could be stopped"
                assert time.monotonic() < deadline, "the job did not get under way"
                time.sleep(0.1)
            assert len(list(scratch.glob("vlmops-job-*"))) == 3  # the job's and each worker's
            os.kill(job.pid, signal.SIGTERM)
            _, err = job.communicate(timeout=STOPPED_S)
        finally:
            if job.poll() is None:
                job.kill()
                job.communicate()
            for pid in _session(job.pid):  # what the code under test left behind
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            server.release.set()
    assert job.returncode == 143, err.decode()[-3000:]
    assert not _session(job.pid), "a worker outlived the job"
    assert not list(scratch.glob("vlmops-*")), sorted(p.name for p in scratch.iterdir())
    assert "stopped (terminated: SIGTERM): 2 of 6 shards done in s3://stops/out, kept;" in err.decode()


KILLED_WHILE_WRITING = """
import os, signal, sys
from vlmops.infer.output import open_output, written_file
with written_file(open_output(sys.argv[1]), "part-00001.jsonl") as path:
    path.write_text('{"key": "r2", "response": "hal')
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_removes_the_files_that_killed_runs_left_half_written_and_not_those_being_written(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run killed while it writes a part (SIGKILL, the OOM killer) leaves the file it wrote in `_job/tmp`, one per
    process; nothing removed them, run after run. The next run of the job removes those of writers that are gone, but
    not the file of a run writing now (two runs of one job at once, or a distributed job's task workers on a shared
    folder: the writer holds a lock on it), nor another machine's until it is a day old."""
    prompts = simple_prompts(tmp_path / "prompts.jsonl", 4)
    out = tmp_path / "out"
    trial = job_config(**{"infer.shard_size": 2, "infer.max_shards": 1})
    run_batch_job(str(tiny_model), str(prompts), str(out), trial, progress=False)  # the job, its first shard done
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_WRITING, str(out)], env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert killed.returncode == -signal.SIGKILL
    tmp = out / TMP_DIR
    (dead,) = tmp.iterdir()
    dead_size = dead.stat().st_size
    old = tmp / f".part-00001.jsonl.{'0' * 32}.tmp"  # an older vlmops's name, or another machine's: judged by age
    fresh = tmp / f".part-00001.jsonl.{'a' * 12}.{'1' * 32}.tmp"
    for path in (old, fresh):
        path.write_text("half")
    os.utime(old, (time.time() - FOREIGN_STALE_S - 60,) * 2)

    class AbandonedError(Exception):
        """Ends the live writer's block: its file is removed, not published."""

    with pytest.raises(AbandonedError), written_file(open_output(str(out)), "part-00001.jsonl") as live:
        live.write_text("being written by a run of the same job going on now")
        with caplog.at_level("INFO", logger="vlmops.infer.job_output"):
            done = run_batch_job(str(tiny_model), str(prompts), str(out), job_config(**{"infer.shard_size": 2}))
        assert sorted(p.name for p in tmp.iterdir()) == sorted([live.name, fresh.name])
        raise AbandonedError
    assert isinstance(done, JobResult) and [s.shard for s in done.ran] == [1]
    assert sorted(r["key"] for r in results(out)) == ["r0", "r1", "r2", "r3"]
    swept = ", ".join(sorted([old.name, dead.name]))
    said = [r.getMessage() for r in caplog.records if "temporary file" in r.getMessage()]
    size = counted(len(b"half") + dead_size, "byte")
    assert said == [f"removed 2 temporary files ({size}) that runs killed while writing left in {tmp}: {swept}"], said


WRITING_TO_S3 = """
import os, signal, sys
from vlmops.infer.output import open_output, written_file
with written_file(open_output("s3://scratch/out"), "part-00001.jsonl") as path:
    path.write_text("x" * 1000)  # a part waiting for its PUT
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print(path.parent, flush=True)
    sys.stdin.read()  # until the test is done with it
"""


def test_an_s3_job_removes_the_scratch_folders_of_killed_processes_on_this_machine_and_not_a_live_ones(
    tiny_model: Path, tmp_path: Path, s3_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A process writing to an s3:// output killed outright (SIGKILL, the OOM killer) left its scratch folder in
    /tmp, with the part it was about to PUT: a GPU worker killed now and then filled its disk. A job's start removes
    those of dead processes on this machine, not the folder of a live one (another job writing now, holding its lock)
    nor another machine's until it is a day old."""
    s3_server.client().create_bucket(Bucket="scratch")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, **s3_server.env(), "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)}
    writer = [sys.executable, "-c", WRITING_TO_S3]
    assert subprocess.run([*writer, "kill"], env=env).returncode == -signal.SIGKILL
    (dead,) = scratch.iterdir()
    foreign = scratch / f"vlmops-job-{'a' * 12}.{'1' * 32}"  # another kernel's (TMPDIR on NFS): judged by its age
    unnamed = scratch / "vlmops-job-k2x9_q1z"  # a folder no held scratch is named like (tempfile.mkdtemp's)
    for folder in (foreign, unnamed):
        folder.mkdir()
    live = subprocess.Popen([*writer, "wait"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None
        held = Path(live.stdout.readline().strip())
        with pytest.MonkeyPatch.context() as patch, caplog.at_level("INFO", logger="vlmops.infer.job_output"):
            for key, value in s3_server.env().items():
                patch.setenv(key, value)
            patch.setattr(tempfile, "tempdir", str(scratch))
            prompts = simple_prompts(tmp_path / "prompts.jsonl", 2)
            done = run_batch_job(str(tiny_model), str(prompts), "s3://scratch/job", job_config(), progress=False)
        assert held.parent == scratch and held.is_dir()
        assert sorted(scratch.iterdir()) == sorted([held, foreign, unnamed])
    finally:
        live.communicate("")
    assert isinstance(done, JobResult) and done.records == 2
    said = [r.getMessage() for r in caplog.records if "scratch folder" in r.getMessage()]
    assert said == [f"removed 1 scratch folder (1.0 kB) that runs killed while writing left in {scratch}: {dead.name}"]
