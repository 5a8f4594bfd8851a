"""prefect.yaml: every deployment points at a real flow with parameters it accepts."""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
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


RUN_COMMAND = re.compile(r"prefect deployment run ([^`\n]*)")


def _run_examples() -> list[tuple[str, str]]:
    """Every `prefect deployment run ...` the docs show: prefect.yaml (comments and descriptions), the README, the
    flows' docstrings and the configs' comments; a command continued with a backslash is one line."""
    texts = {"prefect.yaml descriptions": "\n".join(d.get("description", "") for d in DEPLOYMENTS)}
    for file in [
        ROOT / "prefect.yaml",
        ROOT / "README.md",
        *(ROOT / "flows").glob("*.py"),
        *(ROOT / "configs").glob("*.yaml"),
    ]:
        lines = file.read_text(encoding="utf-8").splitlines()
        if file.suffix == ".yaml":
            lines = [line.lstrip("# ") for line in lines if line.lstrip().startswith("#")]
        texts[str(file.relative_to(ROOT))] = "\n".join(lines).replace("\\\n", " ")
    return [(where, m) for where, text in texts.items() for m in RUN_COMMAND.findall(text)]


RUN_EXAMPLES = _run_examples()


@pytest.mark.parametrize(("where", "command"), RUN_EXAMPLES, ids=[f"{w}:{c}" for w, c in RUN_EXAMPLES])
def test_documented_deployment_runs_pass_parameter_validation(where: str, command: str) -> None:
    """`--param` values as Prefect's CLI parses them (JSON where they parse: `challenger=7` is a number) pass the
    server's schema check and the flow's own validation."""
    from prefect.cli._utilities import load_json_key_values
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    name, *words = shlex.split(command, comments=True)
    flow_name, _, deployment_name = name.partition("/")
    params = load_json_key_values([w for prev, w in zip(["", *words], words) if prev == "--param"], "parameter")
    for deployment in DEPLOYMENTS:
        path, _, attr = deployment["entrypoint"].partition(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attr)
        if (flow.name, deployment["name"]) == (flow_name, deployment_name):
            break
    else:
        pytest.fail(f"{where}: `prefect deployment run {command}` names no deployment of prefect.yaml")
    parameters = {**deployment.get("parameters", {}), **params}
    errors = validate(parameters, parameter_schema(flow).model_dump_for_openapi())
    assert not errors, f"{where}: `prefect deployment run {command}`: {[e.message for e in errors]}"
    flow.validate_parameters(parameters)
