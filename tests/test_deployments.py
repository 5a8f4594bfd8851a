"""prefect.yaml: every deployment points at a real flow with parameters it accepts."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_entrypoint_is_a_flow_taking_the_parameters(deployment: dict) -> None:
    from prefect import Flow

    path, _, name = deployment["entrypoint"].partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, name)
    assert isinstance(flow, Flow)
    accepted = inspect.signature(flow.fn).parameters
    assert set(deployment.get("parameters", {})) <= set(accepted)
    for schedule in deployment.get("schedules", []):
        assert len(schedule["cron"].split()) == 5
