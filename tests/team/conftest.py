"""The team stack (infra/local) started natively for the `team` and `browser` tests, and one team workflow on it.

`team_stack`: PostgreSQL, SeaweedFS, MLflow and Prefect servers and a worker, in a temporary folder on free ports,
with random credentials; stopped (and the stop checked) after the last test of tests/team/, so that its idle
servers and polling worker do not run beside the rest of the suite. `deployments`: `prefect deploy --all` on it, once.

`team_run`: what a team does with it, through the real CLIs: `prefect deploy`, then `retrain/on-demand` while
the pool's GPU slots are set to 0 (the train step fails, the finished steps' results are in S3), then
`prefect flow-run retry` picked up by a second worker with nothing local in common with the first, then
`promote/on-demand`, then `batch-inference/on-demand` on `models:/NAME@champion` over prompts in S3.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from infra.local.stack import Settings, Stack
from infra.server_objects import GPU_LIMIT

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
# flows/promote.py lands with the promotion work; until then the batch job uses the challenger.
MODEL_NAME = "vlmops-team"
NUM_PROMPTS = 12
# Small and fast: the point is the servers, not the model.
RUN_OVERRIDES = [
    "data.demo.num_train=32",
    "data.demo.num_eval=8",
    "train.epochs=1",
    "eval.evaluate_base=false",
    "infer.shard_size=4",
]


@dataclass
class TeamRun:
    stack: Stack
    workdir: Path
    retrain_id: str
    failed_attempt_log: str
    promote_id: str
    batch_id: str
    batch_model: str
    batch_output: str
    prompt_keys: list[str]
    deploy_log: str


@pytest.fixture(scope="package")
def team_stack() -> Iterator[Stack]:
    """The whole stack, natively, in a temporary folder (open to PostgreSQL's user: mode 711)."""
    root = Path(tempfile.mkdtemp(prefix="vlmops-team-stack-"))
    root.chmod(0o711)
    env = {
        "VLMOPS_STACK_DIR": str(root),
        "POSTGRES_PORT": "0",
        "S3_PORT": "0",
        "MLFLOW_PORT": "0",
        "PREFECT_PORT": "0",
        "POSTGRES_PASSWORD": secrets.token_hex(8),
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(8),
        "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(8),
        "PREFECT_API_AUTH_STRING": f"admin:{secrets.token_hex(8)}",
        # A run whose heartbeats (every 30 s, Prefect's minimum) stopped is marked Crashed after 45 s, not 90: the
        # crash test waits that long. 15 s of slack is plenty for a heartbeat thread that sleeps in 1 s steps.
        "VLMOPS_CRASHED_AFTER_S": "45",
    }
    stack = Stack(Settings.load(env=env, env_file=root / "no.env"))
    try:
        with pytest.MonkeyPatch.context() as patch:
            # The workers the stack starts (they inherit this environment) look for new flow runs every second
            # instead of Prefect's 10 s: each of the four flow runs of `team_run` waited 5 s on average for one.
            patch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
            stack.up()
            yield stack
    finally:
        stack.down()
        still_up = [name for name, healthy in stack.status().items() if healthy]
        left = sorted(p.name for p in (root / "pids").glob("*.pid"))
        shutil.rmtree(root, ignore_errors=True)
    assert not still_up and not left, f"after down: still answering {still_up}, pid files {left}"


def prefect_cli(stack: Stack, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """The `prefect` command as a team member runs it: the stack's client settings, from the repository."""
    env = {**os.environ, **stack.client_env(), "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(stack.root / "cli")}
    result = subprocess.run(
        [PREFECT, "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"prefect {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def flow_run_id(output: str) -> str:
    found = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert found, output[-3000:]
    return found.group(1)


def prefect_api(stack: Stack, method: str, path: str, body: Any = None) -> Any:
    response = stack._prefect(method, path, body)
    assert response.status_code in (200, 201, 204), (path, response.status_code, response.text)
    return response.json() if response.content else None


def wait_for_flow_run(stack: Stack, flow_run_id: str, timeout: float = 900) -> dict[str, Any]:
    """The flow run once it is in a final state (Completed, Failed, Crashed, Cancelled)."""
    deadline = time.monotonic() + timeout
    while True:
        flow_run = prefect_api(stack, "GET", f"/flow_runs/{flow_run_id}")
        if flow_run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return flow_run
        assert time.monotonic() < deadline, f"flow run {flow_run_id} still {flow_run['state']['name']}"
        time.sleep(1)


def set_gpu_slots(stack: Stack, slots: int) -> None:
    prefect_api(stack, "PATCH", f"/v2/concurrency_limits/{GPU_LIMIT}", {"limit": slots})


def upload_prompts(stack: Stack, workdir: Path) -> tuple[str, list[str]]:
    """A prompts file and its images in S3 (s3:// image paths): what a batch job reads in team mode."""
    from vlmops.data.demo import write_demo_dataset

    _, eval_file = write_demo_dataset(workdir / "prompt-images", num_train=1, num_eval=NUM_PROMPTS, seed=7)
    s3 = stack._s3()
    lines, keys = [], []
    for i, line in enumerate(eval_file.read_text().splitlines()):
        record = json.loads(line)
        question = record["conversations"][0]["value"]
        image = re.search(r"<img>(.*?)</img>", question)
        assert image
        key = f"prompts/images/{Path(image.group(1)).name}"
        s3.upload_file(str(eval_file.parent / image.group(1)), stack.bucket, key)
        query = question.replace(image.group(1), f"s3://{stack.bucket}/{key}")
        keys.append(f"p{i:02d}")
        lines.append(json.dumps({"id": keys[-1], "query": query}))
    s3.put_object(Bucket=stack.bucket, Key="prompts/prompts.jsonl", Body="\n".join(lines).encode() + b"\n")
    return f"s3://{stack.bucket}/prompts/prompts.jsonl", keys


@pytest.fixture(scope="package")
def deployments(team_stack: Stack) -> str:
    """The deployments of prefect.yaml on the stack, as a team member makes them; `prefect deploy`'s output."""
    return prefect_cli(team_stack, "deploy", "--all").stdout


@pytest.fixture(scope="package")
def team_run(team_stack: Stack, deployments: str) -> Iterator[TeamRun]:
    stack = team_stack
    workdir = Path(tempfile.mkdtemp(prefix="vlmops-team-run-"))
    overrides = [*stack.team_overrides(), f"run.output_dir={workdir / 'outputs'}", *RUN_OVERRIDES]
    params = json.dumps({"overrides": overrides})

    # The pool's GPUs drained: the run does download, validation and DVC versioning, then train fails at once.
    set_gpu_slots(stack, 0)
    first = prefect_cli(stack, "deployment", "run", "retrain/on-demand", "--params", params, "--watch", check=False)
    set_gpu_slots(stack, 1)
    assert first.returncode != 0, first.stdout[-3000:]
    retrain_id = flow_run_id(first.stdout)

    # The retry goes to another worker (its own PREFECT_HOME: no local results), which reuses the finished steps.
    stack.stop("prefect-worker")
    stack.start_worker("prefect-worker-2", workdir / "worker-2-home")
    prefect_cli(stack, "flow-run", "retry", retrain_id)
    # Polled through the API: `prefect flow-run watch` replays the first attempt's events and can stop early.
    retried = wait_for_flow_run(stack, retrain_id)
    assert retried["state"]["type"] == "COMPLETED", retried["state"]

    promoted = prefect_cli(stack, "deployment", "run", "promote/on-demand", "--params", params, "--watch")
    promote_id = flow_run_id(promoted.stdout)

    prompts, keys = upload_prompts(stack, workdir)
    model = f"models:/{MODEL_NAME}@champion"
    output = f"s3://{stack.bucket}/answers/{time.strftime('%Y%m%d-%H%M%S')}/"
    batch_params = json.dumps({"model": model, "input": prompts, "output": output, "overrides": overrides})
    batch = prefect_cli(stack, "deployment", "run", "batch-inference/on-demand", "--params", batch_params, "--watch")
    # Back to the stack's own worker: `up` starts only what is missing.
    stack.stop("prefect-worker-2")
    stack.up()
    yield TeamRun(
        stack=stack,
        workdir=workdir,
        retrain_id=retrain_id,
        failed_attempt_log=first.stdout,
        promote_id=promote_id,
        batch_id=flow_run_id(batch.stdout),
        batch_model=model,
        batch_output=output,
        prompt_keys=keys,
        deploy_log=deployments,
    )
    shutil.rmtree(workdir, ignore_errors=True)
