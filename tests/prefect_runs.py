"""Prefect flow runs and their task runs, read through the API the tests run against (harness or server),
prefect.yaml's batch-inference deployment run by a real process worker, and task workers for its distributed jobs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = yaml.safe_load((ROOT / "prefect.yaml").read_text())
BATCH = next(d for d in PREFECT_YAML["deployments"] if d["entrypoint"] == "flows/batch_inference.py:batch_inference")


def task_runs(flow_run_id: Any) -> dict[str, list[tuple[str, str]]]:
    """The state and id of each of the flow run's task runs (of every try), by task name, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def read() -> dict[str, list[tuple[str, str]]]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            )
        found: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for run in runs:
            found[run.name.rsplit("-", 1)[0]].append((str(run.state_name), str(run.id)))
        return dict(found)

    return asyncio.run(read())


def task_states(flow_run_id: Any) -> dict[str, list[str]]:
    """The states of the flow run's task runs (of every try), by task name, oldest first."""
    return {name: [state for state, _ in runs] for name, runs in task_runs(flow_run_id).items()}


def deployment_run(pool: str, parameters: dict[str, Any]) -> UUID:
    """A process work pool `pool`, prefect.yaml's batch-inference deployment on it (its entrypoint and pull step), and a
    flow run of that deployment with `parameters`: its id."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.batch_inference import batch_inference

    async def create() -> UUID:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            flow_id = await client.create_flow_from_name(batch_inference.name)
            deployment_id = await client.create_deployment(
                flow_id=flow_id,
                name=pool,
                entrypoint=BATCH["entrypoint"],
                pull_steps=PREFECT_YAML["pull"],
                work_pool_name=pool,
            )
            flow_run = await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
            return flow_run.id

    return asyncio.run(create())


def worker_command(pool: str, worker_env: dict[str, str], tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """`prefect worker start` for one flow run of `pool`, and its environment: the team's client settings (this API,
    this checkout for the pull step) with `worker_env` on top."""
    from prefect.settings import PREFECT_API_URL

    inherited = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLMOPS_VERBOSE")}
    env = {
        **inherited,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-storage"),
        "VLMOPS_HOME": str(ROOT),  # prefect.yaml's pull step: the flow runs from this checkout
        **worker_env,
    }
    prefect = str(Path(sys.executable).with_name("prefect"))
    return [prefect, "worker", "start", "--pool", pool, "--type", "process", "--run-once", "--limit", "1"], env


def flow_run_state(flow_run_id: UUID) -> tuple[str | None, str | None]:
    """The flow run's state: (name, message)."""
    from prefect.client.orchestration import get_client

    async def read() -> tuple[str | None, str | None]:
        async with get_client() as client:
            state = (await client.read_flow_run(flow_run_id)).state
            return (state.name, state.message) if state else (None, None)

    return asyncio.run(read())


def flow_run_logs(flow_run_id: UUID) -> list[str]:
    """What Prefect's API handler sent the server of the flow run (the UI's log)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return [log.message for log in asyncio.run(read())]


@contextmanager
def task_workers(count: int, env: dict[str, str], folder: Path) -> Iterator[list[Path]]:
    """`count` task workers for distributed batch jobs (`python -m flows.batch_inference serve`) in `env` (the API and
    the storage the flow runs use), subscribed when this yields their log files (under `folder`); ended on exit."""
    workers = []
    logs = [folder / f"task-worker-{n}.log" for n in range(count)]
    try:
        for log in logs:
            with log.open("w") as f:
                cmd = [sys.executable, "-m", "flows.batch_inference", "serve"]
                env = {**env, "PYTHONPATH": str(ROOT)}
                workers.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 180
        while not all("Subscribing to runs of task" in log.read_text() for log in logs):
            assert all(w.poll() is None for w in workers), [log.read_text()[-2000:] for log in logs]
            assert time.monotonic() < deadline, [log.read_text()[-2000:] for log in logs]
            time.sleep(0.5)
        time.sleep(2)  # the subscription is made just after the log line
        yield logs
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(30)
