"""One run of a batch job at a time: a second run of the job while a first holds its output is refused at once, naming
the first (pid, host, command) and what to do; once the first is killed outright (SIGKILL) the next run goes on. A
local output's lock is an flock the kernel drops with its process; an S3 output's a lease object the run renews, which
a run killed outright leaves to the next run, at once where its pid is this machine's and gone, else once it is
LEASE_STALE_S old.

The first run here is a child process that holds the output the way a job's coordinating process does
(`hold_job_run`), and sleeps."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.infer.test_batch_infer import results
from tests.infer.test_batch_job import ROOT, job_config, simple_prompts
from vlmops.cli.main import main
from vlmops.infer import job_lock
from vlmops.infer.batch_job import run_batch_job
from vlmops.infer.job_lock import JobRunningError, hold_job_run, refuse_if_running
from vlmops.infer.job_status import JobResult
from vlmops.infer.output import open_output

HOLDS_THE_OUTPUT = """
import sys, time
from vlmops.infer import job_lock
from vlmops.infer.output import open_output
job_lock.LEASE_RENEW_S = 0.5  # an S3 lease: renewed often, so that the test's short LEASE_STALE_S sees it live
with job_lock.hold_job_run(open_output(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(600)
"""


@contextmanager
def first_run(output: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """A process holding `output` as a running job's coordinator does, until the block ends (it is SIGKILLed)."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDS_THE_OUTPUT, output], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def refused_naming(holder: subprocess.Popen[str], message: str) -> None:
    going_on = f"is going on: pid {holder.pid} on {socket.gethostname()}, since "
    assert re.search(rf"another run of (this job|job [0-9a-f]{{16}}) {re.escape(going_on)}", message), message
    assert "hold_job_run" in message and "Two runs at once would answer the same shards twice" in message, message
    assert f"(`kill {holder.pid}` on {socket.gethostname()}: it stops in order" in message, message
    assert "`vlmops batch-status " in message, message


def test_a_second_run_of_a_local_job_is_refused_naming_the_first_until_it_is_killed(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, the second run answered every shard the first had not published yet, beside it: the GPU work twice.
    `vlmops batch-status` says which: running (by whom) or stopped; before, "running, or stopped"."""
    prompts = simple_prompts(tmp_path / "prompts.jsonl", 4)
    out = tmp_path / "out"
    config = job_config(**{"infer.shard_size": 2})
    started = run_batch_job(
        str(tiny_model),
        str(prompts),
        str(out),
        config.model_copy(update={"infer": config.infer.model_copy(update={"max_shards": 1})}),
        progress=False,
    )
    assert not isinstance(started, JobResult) and len(started.ran) == 1  # a trial run's first shard: stopped there
    assert main(["batch-status", str(out)]) == 0
    assert ": 1 of 2 shards done (50%); stopped: the same command resumes it\n" in capsys.readouterr().out
    with first_run(str(out)) as holder:

        def not_now(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("the refused run went on to resolve the model")

        monkeypatch.setattr("vlmops.infer.batch_job.resolve_job_model", not_now)
        with pytest.raises(JobRunningError) as refused:
            run_batch_job(str(tiny_model), str(prompts), str(out), config, progress=False)
        refused_naming(holder, str(refused.value))
        monkeypatch.undo()
        # The CLI: exit 2, as for other input the user can change, with the same message.
        args = ["batch-infer", "-m", str(tiny_model), "-i", str(prompts), "-o", str(out), "--set", "infer.shard_size=2"]
        assert main(args) == 2
        refused_naming(holder, capsys.readouterr().err)
        # A run that passed the first look (the other started meanwhile) is refused where it takes the lock.
        with pytest.raises(JobRunningError) as refused, hold_job_run(open_output(str(out))):
            pass
        refused_naming(holder, str(refused.value))
        assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.jsonl"]  # nothing answered
        assert main(["batch-status", str(out)]) == 0
        text = capsys.readouterr().out
        assert f": 1 of 2 shards done (50%); running: pid {holder.pid} on {socket.gethostname()}, since " in text, text
        assert "  run by            " in text and "hold_job_run" in text, text
        assert main(["batch-status", str(out), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["state"] == "running" and status["run"]["pid"] == holder.pid, status
    # Killed outright: the kernel dropped its lock with it, and the next run goes on.
    assert main(["batch-status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["state"], status["run"]) == ("stopped", None), status
    done = run_batch_job(str(tiny_model), str(prompts), str(out), config, progress=False)
    assert isinstance(done, JobResult) and done.results == 4 and len(done.ran) == 1
    assert sorted(r["key"] for r in results(out)) == ["r0", "r1", "r2", "r3"]
    refuse_if_running(open_output(str(out)))  # let go at its end


@pytest.mark.integration
def test_a_second_run_of_an_s3_job_is_refused_until_the_first_has_ended_or_its_lease_is_stale(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SeaweedFS (as AWS S3) honours `If-None-Match: *`: the lease is taken by one run only. A live first run renews
    it, so it is never stale however long it runs. Killed outright on this machine (an OOM-killed job step that its
    flow retries), its lease is taken over by the next run at once: its pid is gone. Another machine's lease, whose
    pid cannot be looked up here, is taken over once not renewed for LEASE_STALE_S; the lease goes with its run."""
    client = s3_server.client()
    client.create_bucket(Bucket="leases")
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    uri = "s3://leases/answers/run1"
    with first_run(uri, s3_server.env()) as holder:
        with monkeypatch.context() as short:
            short.setattr(job_lock, "LEASE_STALE_S", 3.0)
            time.sleep(job_lock.LEASE_STALE_S + 1.0)  # older than a lease is let live, were it not renewed
            with pytest.raises(JobRunningError) as refused:
                refuse_if_running(open_output(uri))
        refused_naming(holder, str(refused.value))
        assert "its lease renewed " in str(refused.value)
        with pytest.raises(JobRunningError) as refused, hold_job_run(open_output(uri)):
            pass
        refused_naming(holder, str(refused.value))
        going_on = job_lock.run_going_on(open_output(uri))  # what `vlmops batch-status` says
        assert going_on.running and going_on.holder is not None and going_on.holder.pid == holder.pid
        killed = holder.pid
    with caplog.at_level(logging.WARNING, logger="vlmops.infer.job_lock"), hold_job_run(open_output(uri)):
        pass  # at once: LEASE_STALE_S is 120 s
    (took,) = [r.getMessage() for r in caplog.records]
    assert f"its process, pid {killed} on {socket.gethostname()}, has ended: killed outright" in took, took
    assert "Contents" not in client.list_objects_v2(Bucket="leases", Prefix="answers/run1/")
    assert job_lock.run_going_on(open_output(uri)) == job_lock.RunGoingOn(False)

    # A run on another machine, killed outright (or its machine lost), as its lease says.
    elsewhere = job_lock.RunHolder(4242, "gpu-node-7", "2026-12-06T10:00:00Z", "vlmops batch-infer ...", "t", "k:1")
    client.put_object(Bucket="leases", Key=f"answers/run1/{job_lock.LEASE}", Body=elsewhere.to_text().encode())
    monkeypatch.setattr(job_lock, "LEASE_STALE_S", 3.0)
    with pytest.raises(JobRunningError) as refused:
        refuse_if_running(open_output(uri))
    assert "another run of this job is going on: pid 4242 on gpu-node-7, since " in str(refused.value)
    caplog.clear()
    deadline = time.monotonic() + 60
    with caplog.at_level(logging.WARNING, logger="vlmops.infer.job_lock"):
        while True:
            try:
                with hold_job_run(open_output(uri)):
                    break
            except JobRunningError:
                assert time.monotonic() < deadline, "the other machine's stale lease was never taken over"
                time.sleep(0.5)
    (took,) = [r.getMessage() for r in caplog.records]
    assert "it stopped renewing it " in took and "(pid 4242 on gpu-node-7): killed outright, or its machine" in took
    assert "Contents" not in client.list_objects_v2(Bucket="leases", Prefix="answers/run1/")
    refuse_if_running(open_output(uri))
