"""Prefect task runs of a flow run, read through the API the tests run against (harness or server)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any


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
