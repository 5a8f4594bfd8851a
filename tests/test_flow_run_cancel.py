"""Cancelling a batch-inference flow run mid-job (the UI's Cancel, `prefect flow-run cancel ID`: the run's state set to
Cancelling) on a real process worker: the job's processes end at once (or, `distributed=True`, no task worker starts
another of its shards), the run ends Cancelled, its log says where the job stands and how to finish it, and a rerun
finishes the job, every record once.

Prefect's worker sees the Cancelling state, sends SIGTERM to the flow run's process group, checks every 3 s whether it
is gone and sends SIGKILL after 30 s. The job's child is in a session of its own (vlmops.infer.parallel), which that
SIGTERM does not reach: the flow run's process stops it when the signal interrupts it (TerminationSignal).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import pytest

from tests.image_server import serving_images
from tests.infer.test_batch_infer import rejects, results
from tests.infer.test_parallel import _session
from tests.prefect_runs import (
    deployment_run,
    flow_run_logs,
    flow_run_state,
    task_runs,
    task_states,
    task_workers,
    worker_command,
)
from vlmops.infer.parallel import POLL_S

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(600)]

# 12 records in 6 shards of 2, two of them rejects, answered one at a time in the job's child. Shard 2 holds an image
# the test's server holds back: the job stays mid-way, two parts written, until the test lets it go. (One process: a
# job's per-GPU workers are in its child's session, which the checks below cover too, and die with it: test_parallel.)
JOB = [
    "infer.shard_size=2",
    "infer.max_new_tokens=4",
    "infer.batch_size=1",
    "storage.url_allow_networks=[127.0.0.1/32]",
]
JOB_GONE_S = 5.0
"""From the Cancelling state (the call that sets it returned) to no process of the job: measured 0.01 s on this 2-core
machine, busy with other tests (load 3-5). The SIGTERM's own grace periods are far longer (Prefect's 30 s, the group
stop's 10 s): a job that waited for either fails this."""
CANCELLED_S = 25.0
"""From the Cancelling state to the Cancelled one: measured 9 s, all of it Prefect's (the flow run's process is gone
1-1.6 s after the SIGTERM; its worker checks every 3 s, then runs the hooks and sets the state). Under Prefect's 30 s
grace: a flow run's process that did not end on the SIGTERM would be SIGKILLed only then."""


def _job_processes(out: Path, command: str = "") -> list[int]:
    """The live processes whose command line names `out` (and `command`): the job's child (`vlmops batch-infer`) and
    its workers (`python -m vlmops.infer.parallel`), were there several."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # ended as we looked
        pid = int(cmdline.parent.name)
        if str(out).encode() in args and command.encode() in b" ".join(args) and _alive(pid):
            found.append(pid)
    return found


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command's name: state, parent, process group, session, ...; [] once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has exited: it counts as gone)."""
    return _stat(pid)[:1] not in ([], ["Z"])


def _set_state(flow_run_id: UUID, state: str) -> None:
    """What the UI's Cancel (`prefect flow-run cancel`) and `prefect flow-run retry` do to a deployment's flow run."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling, Scheduled

    async def propose() -> None:
        async with get_client() as client:
            if state == "Cancelling":
                await client.set_flow_run_state(flow_run_id, Cancelling())
            else:
                await client.set_flow_run_state(flow_run_id, Scheduled(message="Retried via CLI"), force=True)

    asyncio.run(propose())


def _until(condition: Callable[[], object], seconds: float, what: str, every: float = 0.01) -> None:
    """Wait until `condition()` holds; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(every)


def test_a_cancelled_flow_run_stops_its_job_at_once_and_a_retry_of_it_finishes_the_job(
    prefect_harness: None, tiny_model: Path, tmp_path: Path
) -> None:
    """Before, the run ended Cancelled and its job stopped, but its log said nothing of the job: not that it was
    stopped, nor how far it got, nor how to finish it. Without the group stop on the TerminationSignal
    (run_in_process_group), the job ended only with the flow run's process, 1-3 s later (its PR_SET_PDEATHSIG)."""
    lines: list[dict[str, object]] = [
        {"id": f"r{i}", "query": f"What is {i}?"} if i % 5 != 4 else {"prompt": "neither"} for i in range(12)
    ]
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    with serving_images() as server:
        lines[5]["images"] = [f"{server.url}/held.png"]
        prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
        parameters = {
            "model": str(tiny_model),
            "input": str(prompts),
            "output": str(out),
            "overrides": [f"model.cache_dir={tmp_path / 'cache'}", *JOB],
        }
        flow_run_id = deployment_run("cancel", parameters)
        worker, env = worker_command("cancel", {}, tmp_path)
        printed = tmp_path / "worker.log"
        with printed.open("w") as log, subprocess.Popen(worker, cwd=tmp_path, env=env, stdout=log, stderr=log) as first:
            try:
                _until(
                    lambda: len(list(out.glob("part-*.jsonl"))) == 2 and _job_processes(out),
                    240,
                    "the job did not get under way",
                    every=0.1,
                )
                (job,) = _job_processes(out, "batch-infer")  # its session's leader: any worker of it is in it
                flow_process = int(_stat(job)[1])  # the flow run's (`python -m prefect.engine`)
                time.sleep(3 * POLL_S)  # the flow has seen both parts; the job waits on the held image
                _set_state(flow_run_id, "Cancelling")
                started = time.monotonic()
                _until(lambda: not _alive(job), JOB_GONE_S, "the job outlived the cancel")
                # Stopped by the flow as the cancel's SIGTERM reached it, not only by the kernel once the flow run's
                # process ended (the child's PR_SET_PDEATHSIG), which waits on Prefect's handling of the cancel (1-2 s
                # here), or on the SIGKILL 30 s later where a flow does not end on a SIGTERM.
                assert _alive(flow_process), "the job ended only with the flow run's process"
                _until(
                    lambda: flow_run_state(flow_run_id)[0] not in ("Running", "Cancelling"),
                    CANCELLED_S - (time.monotonic() - started),
                    "the flow run did not end in time",
                    every=0.2,
                )
                first.wait(60)
            finally:
                if first.poll() is None:
                    first.kill()
        output = printed.read_text()
        state, message = flow_run_state(flow_run_id)
        assert state == "Cancelled", (state, message, output[-5000:])
        assert not _session(job) and not _job_processes(out), "a process of the job outlived the cancel"

        # Two whole parts, nothing half-written beside them (a part is written aside, under _job/tmp, then renamed).
        parts = sorted(p.name for p in out.glob("part-*.jsonl"))
        assert parts == ["part-00000.jsonl", "part-00001.jsonl"], parts
        assert not (out / "manifest.json").exists() and not list((out / "_job" / "tmp").glob("*"))
        for shard, part in enumerate(parts):
            keys = [json.loads(line)["key"] for line in (out / part).read_text().splitlines()]
            shard_rejects = (out / "_job" / f"rejects-0000{shard}.jsonl").read_text().splitlines()
            assert len(keys) + len(shard_rejects) == 2, (part, keys, shard_rejects)
        kept = {part: _written(out / part) for part in parts}

        # The flow run's log (the UI's) says the job stopped, how far it got and how to go on, once.
        stopped = [line for line in flow_run_logs(flow_run_id) if " stopped (" in line]
        job_id = json.loads((out / "_job" / "job.json").read_text())["job_id"]
        assert stopped == [
            f"job {job_id} stopped (the flow run was cancelled or terminated), and its processes with it: "
            f"2 of 6 shards done in {out}; to finish it, run the flow again with the same parameters, or retry this "
            f"flow run: `prefect flow-run retry {flow_run_id}`; the shards already written are kept and only the rest "
            "are answered"
        ], stopped

        # The same flow run again, as the line says (`prefect flow-run retry ID`), on a worker.
        server.release.set()
        _set_state(flow_run_id, "Scheduled")
        again = subprocess.run(worker, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert flow_run_state(flow_run_id)[0] == "Completed", again.stdout[-3000:] + again.stderr[-3000:]
    answered = [int(str(r["key"])[1:]) for r in results(out)]
    rejected = [int(r["line"]) - 1 for r in rejects(out)]
    assert sorted(answered + rejected) == list(range(12)) and sorted(rejected) == [4, 9]  # every record once
    assert {part: _written(out / part) for part in kept} == kept  # the parts from before the cancel, not rewritten


def _written(path: Path) -> tuple[int, int]:
    """The file's inode and modification time: a part published again is another file."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def test_a_cancelled_distributed_flow_run_hands_out_no_more_shards_and_a_rerun_finishes_the_job(
    prefect_harness: None, tiny_model: Path, tmp_path: Path
) -> None:
    """`distributed=True`, the deployment's flow run on a process worker: one task worker answers the job's 4 shards one
    at a time and holds shard 1 (its image held back) when the flow run is cancelled. Before, the flow run ended
    Cancelled and the task worker went on to answer shards 2 and 3 all the same, for no one. Now the flow sets their
    task runs Cancelled and the task worker skips them when it gets them (Prefect's task worker alone runs a background
    task run it was handed whatever its state by then); shard 1 finishes its part, and a rerun with the same parameters
    answers the rest, every record once. (Before that, the task worker could not even read a deployment's shards: their
    context names the flow's module, `batch_inference`, which it could not import; see serve_shards.)"""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.batch_inference import batch_inference

    lines: list[dict[str, object]] = [{"id": f"r{i}", "query": f"What is {i}?"} for i in range(8)]
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    with serving_images() as server:
        lines[2]["images"] = [f"{server.url}/held.png"]  # shard 1 (records 2 and 3)
        prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
        overrides = [f"model.cache_dir={tmp_path / 'cache'}", *JOB]
        parameters = {"model": str(tiny_model), "input": str(prompts), "output": str(out), "overrides": overrides}
        flow_run_id = deployment_run("cancel-distributed", {**parameters, "distributed": True})
        worker, env = worker_command("cancel-distributed", {}, tmp_path)
        printed = tmp_path / "worker.log"
        with (
            printed.open("w") as log,
            subprocess.Popen(worker, cwd=tmp_path, env=env, stdout=log, stderr=log) as flow_worker,
            task_workers(1, env, tmp_path) as (task_log,),
        ):
            try:
                _until(
                    lambda: (
                        task_states(flow_run_id).get("answer_shard")
                        == ["Completed", "Running", "Scheduled", "Scheduled"]
                    ),
                    120,
                    "the task worker did not get to shard 1",
                    every=0.2,
                )
                _set_state(flow_run_id, "Cancelling")
                _until(
                    lambda: flow_run_state(flow_run_id)[0] not in ("Running", "Cancelling"),
                    CANCELLED_S,
                    "the flow run did not end in time",
                    every=0.2,
                )
                flow_worker.wait(60)
            finally:
                if flow_worker.poll() is None:
                    flow_worker.kill()
            assert flow_run_state(flow_run_id)[0] == "Cancelled", printed.read_text()[-5000:]
            # The shards not started are Cancelled on the server; shard 1 runs on.
            assert task_states(flow_run_id)["answer_shard"] == ["Completed", "Running", "Cancelled", "Cancelled"]
            stopped = [line for line in flow_run_logs(flow_run_id) if " stopped (" in line]
            job_id = json.loads((out / "_job" / "job.json").read_text())["job_id"]
            assert stopped == [
                f"job {job_id} stopped (the flow run was cancelled or terminated): 1 of 4 shards done in {out}; 2 shards "
                "cancelled before a task worker started them; still running on task workers: 1 shard (00001), each "
                "finishing its shard and writing its part whole, which the rerun keeps (Prefect cannot stop a running "
                "task run); to finish it, run the flow again with the same parameters, or retry this flow run: "
                f"`prefect flow-run retry {flow_run_id}`; the shards already written are kept and only the rest are "
                "answered"
            ], stopped

            # Shard 1 finishes; the task worker then gets shards 2 and 3 (it was handed shard 2 already, waiting for
            # its one slot) and ends each without answering it.
            server.release.set()
            shard_runs = [run_id for _, run_id in task_runs(flow_run_id)["answer_shard"]]
            _until(lambda: all(_taken_up(run_id) for run_id in shard_runs), 60, "shards left untaken", every=0.2)
            assert task_states(flow_run_id)["answer_shard"] == ["Completed", "Completed", "Cancelled", "Cancelled"]
            parts = sorted(p.name for p in out.glob("part-*.jsonl"))
            assert parts == ["part-00000.jsonl", "part-00001.jsonl"], (parts, task_log.read_text()[-3000:])
            skipped = [
                line.split(" - ", 1)[1] for line in task_log.read_text().splitlines() if " not answered: " in line
            ]
            assert skipped == [
                f"shard {shard} of {out} not answered: its task run was cancelled (the flow run was cancelled or "
                "terminated)"
                for shard in ("00002", "00003")
            ], skipped
            kept = {part: _written(out / part) for part in parts}

            # The same job again (as the line says: the same parameters): shards 2 and 3, on the same task worker.
            with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: env["PREFECT_LOCAL_STORAGE_PATH"]}):
                summary = batch_inference(**parameters, distributed=True)
    assert summary["records"] == summary["results"] == 8 and summary["shards_run"] == 2, summary
    assert [str(r["key"]) for r in results(out)] == [f"r{i}" for i in range(8)]  # every record once, in input order
    assert {part: _written(out / part) for part in kept} == kept  # the parts from before the cancel, not rewritten


def _taken_up(task_run_id: str) -> bool:
    """Whether a task worker has taken the task run up (it went Running) and ended it."""
    from prefect.client.orchestration import get_client

    async def read() -> bool:
        async with get_client() as client:
            run = await client.read_task_run(UUID(task_run_id))
            states = await client.read_task_run_states(UUID(task_run_id))
            return run.state is not None and run.state.is_final() and any(s.is_running() for s in states)

    return asyncio.run(read())
