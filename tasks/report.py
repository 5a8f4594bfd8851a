"""What a flow run shows about itself: its Prefect artifacts, and the flow-run tags its MLflow records carry."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

FLOW_RUN_TAG = "prefect_flow_run_id"
"""The tag naming the flow run (of the retrain run and its model version): a retry of the flow run keeps it."""


def flow_run_tags() -> dict[str, str]:
    """The running flow run's id and its deployment's name ("none" when run outside a deployment)."""
    from prefect.runtime import deployment, flow_run

    from vlmops.registry.lineage import NO_DEPLOYMENT

    return {
        FLOW_RUN_TAG: str(flow_run.id or ""),
        "prefect_deployment": str(deployment.name or NO_DEPLOYMENT),
    }


def publish_summary(key: str, markdown: str, description: str) -> None:
    """A markdown artifact of this flow run (the latest under `key` in the Artifacts page)."""
    create_markdown_artifact(markdown=markdown, key=key, description=description)


def publish_samples(key: str, rows: list[dict[str, Any]], description: str) -> None:
    """A table artifact of eval samples (one row per record) of this flow run."""
    create_table_artifact(table=rows, key=key, description=description)
