"""A worker's machine lost in the middle of a flow run, on the real stack: the worker and the flow run's process are
killed at once, so nothing reports the run's end. The run stops sending heartbeats; the server's automation
`crash-zombie-flow-runs` marks it Crashed (the stack's window: 45 s, tests/team/conftest.py); `prefect flow-run retry`,
which refuses a run shown Running, accepts it; a worker picks the retry up and it completes, reusing the steps that had
finished.

The run is caught at a known point: the pool's one GPU slot is taken (as by another run), so the run does the download
and the validation and then waits in its train step for the slot.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from infra.local.stack import Stack
from infra.server_objects import GPU_LIMIT, ZOMBIE_AUTOMATION
from tests.team.conftest import RUN_OVERRIDES, flow_run_id, prefect_api, prefect_cli, wait_for_flow_run

pytestmark = [pytest.mark.team, pytest.mark.integration, pytest.mark.timeout(1800)]

T = TypeVar("T")


def _wait_for(what: str, found: Callable[[], T | None], timeout: float = 600) -> T:
    """Poll `found` until it gives something; a bound for a hang, far above the few seconds each step takes."""
    deadline = time.monotonic() + timeout
    while (value := found()) is None:
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(1)
    return value


def _task_runs(stack: Stack, run_id: str) -> list[dict[str, Any]]:
    return prefect_api(stack, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})


def _heartbeats(stack: Stack, run_id: str) -> list[dict[str, Any]]:
    resource = f"prefect.flow-run.{run_id}"
    body = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]}, "resource": {"id": [resource]}}, "limit": 50}
    return prefect_api(stack, "POST", "/events/filter", body)["events"]


def _lose_the_machine_of(stack: Stack, worker: str) -> list[str]:
    """SIGKILL the worker and every process it started (the flow run's), the worker first: nothing is left to report
    the flow run's end. (A flow run's process killed alone is reported Crashed by its worker.) Their command lines."""
    pid = stack._pid(worker)
    assert pid is not None, f"{worker} is not running"
    parent = psutil.Process(pid)
    processes = [parent, *parent.children(recursive=True)]
    commands = [" ".join(p.cmdline()) for p in processes]
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=30)
    return commands


def test_a_flow_run_whose_machine_was_lost_is_marked_crashed_and_its_retry_reuses_the_finished_steps(
    team_stack: Stack, deployments: str
) -> None:
    stack = team_stack
    workdir = Path(tempfile.mkdtemp(prefix="vlmops-team-crash-"))
    overrides = [
        *stack.team_overrides(),
        f"run.output_dir={workdir / 'outputs'}",
        *RUN_OVERRIDES,
        "registry.model_name=vlmops-team-crash",  # not the version the other team tests count
    ]
    prefect_api(stack, "PATCH", f"/v2/concurrency_limits/{GPU_LIMIT}", {"active_slots": 1})
    try:
        started = prefect_cli(
            stack, "deployment", "run", "retrain/on-demand", "--params", json.dumps({"overrides": overrides})
        )
        run_id = flow_run_id(started.stdout)

        def train_waiting() -> dict[str, Any] | None:
            runs = [t for t in _task_runs(stack, run_id) if t["name"].startswith("train-")]
            return runs[0] if runs and runs[0]["state"]["type"] == "RUNNING" else None

        _wait_for("the train step to wait for the GPU slot", train_waiting)
        _wait_for("a heartbeat of the flow run", lambda: _heartbeats(stack, run_id) or None)
        # Prefect refuses to retry a run it shows Running: all a user could do before the automation.
        refused = prefect_cli(stack, "flow-run", "retry", run_id, check=False)
        said = " ".join((refused.stdout + refused.stderr).split())  # as one line, whatever the console's width
        assert refused.returncode != 0 and "is in state 'RUNNING' and cannot be retried" in said, said

        killed = _lose_the_machine_of(stack, "prefect-worker")
        lost_at = time.monotonic()
        assert len(killed) >= 2 and "worker start" in killed[0], killed  # the worker and its flow run's process
        crashed = wait_for_flow_run(stack, run_id, timeout=600)
    finally:
        prefect_api(stack, "PATCH", f"/v2/concurrency_limits/{GPU_LIMIT}", {"active_slots": 0})
    state, window = crashed["state"], stack.settings["VLMOPS_CRASHED_AFTER_S"]
    assert state["type"] == "CRASHED", state
    print(f"marked Crashed {time.monotonic() - lost_at:.0f} s after the worker was lost (window: {window} s)")
    # The automation's doing (the stack's window in its message), not a worker's report.
    expected = f"No heartbeat for {window} s: its process died or lost the API (automation {ZOMBIE_AUTOMATION})"
    assert state["message"] == expected, state

    stack.up()  # a worker again, as on the machine that replaces the lost one
    prefect_cli(stack, "flow-run", "retry", run_id)
    retried = wait_for_flow_run(stack, run_id)
    assert retried["state"]["type"] == "COMPLETED", retried["state"]
    states: dict[str, list[str]] = {}
    for task_run in _task_runs(stack, run_id):
        states.setdefault(task_run["name"].rsplit("-", 1)[0], []).append(task_run["state"]["name"])
    print("task run states:", json.dumps(states, sort_keys=True))
    # The lost attempt's download and validation were reused; its train step never got the slot, so it ran now.
    assert "Cached" in states["download_model"] and "Cached" in states["validate_dataset"], states
    assert "Completed" in states["train"] and "Completed" in states["register"], states
    shutil.rmtree(workdir, ignore_errors=True)
