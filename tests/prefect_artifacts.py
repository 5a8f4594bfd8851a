"""Prefect artifacts of a flow run, read through the API the tests run against (harness or server)."""

from __future__ import annotations

import asyncio
from typing import Any


def flow_run_artifacts(flow_run_id: str) -> dict[str, Any]:
    """The artifacts of `flow_run_id`, by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> dict[str, Any]:
        async with get_client() as prefect:
            found = await prefect.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
            return {a.key: a for a in found}

    return asyncio.run(read())
