"""The Prefect API going away in the middle of a flow run, with a real server: `vlmops run` (the retrain flow) against
the test harness's Prefect server behind a proxy that stops at the train step's request for its `gpu` slot, after the
download and the validation finished, and stays down until the command has ended.

The command ends (exit 1; bounded by a generous subprocess timeout) naming the Prefect API, its URL and the fix, and
says to run it again: the flow run's end cannot be recorded while the API is away, so Prefect shows it Running and
`prefect flow-run retry` refuses it; nothing tells the user to retry it. Nothing the failed run began is left where
the next run would take it up. With the API back, the same command completes in a run folder of its own: the download
and the validation reused (`Cached`), every step after them once, every eval record answered once, one model version.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.outage_proxy import OutageProxy
from tests.prefect_runs import task_states

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
NUM_EVAL = 4


def _vlmops_run(
    outputs: Path, api_url: str, storage: Path, client_retries: int | None = None
) -> subprocess.CompletedProcess[str]:
    """`vlmops run` as a user runs it, with PREFECT_API_URL at `api_url`: a small run, everything under `outputs`;
    `client_retries`: PREFECT_CLIENT_MAX_RETRIES (None: Prefect's 5)."""
    overrides = [
        f"run.output_dir={outputs}",
        f"model.cache_dir={outputs}/cache",
        f"tracking.uri=sqlite:///{outputs}/mlflow.db",
        "data.demo.num_train=16",
        f"data.demo.num_eval={NUM_EVAL}",
        "train.max_steps=2",
        "infer.shard_size=2",
        "eval.evaluate_base=false",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_API_URL": api_url,
        "PREFECT_LOCAL_STORAGE_PATH": str(storage),  # the task results the second run reuses
    }
    if client_retries is not None:
        env["PREFECT_CLIENT_MAX_RETRIES"] = str(client_retries)
    command = [sys.executable, "-m", "vlmops.cli", "run", *(arg for o in overrides for arg in ("--set", o))]
    # A hang is a failure: the command must end on its own well before this.
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)


def _flow_run_state(flow_run_id: str) -> str | None:
    """The type of the flow run's state as the API records it."""
    import asyncio
    from uuid import UUID

    from prefect.client.orchestration import get_client

    async def read() -> str | None:
        async with get_client() as client:
            state_type = (await client.read_flow_run(UUID(flow_run_id))).state_type
        return state_type.value if state_type else None

    return asyncio.run(read())


def test_the_prefect_api_going_away_mid_run_is_named_and_the_command_run_again_finishes_the_job(
    prefect_harness: None, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    outputs, storage = tmp_path / "outputs", tmp_path / "prefect-storage"
    runs = outputs / "runs"
    proxy = OutageProxy(urlsplit(str(PREFECT_API_URL.value())).port or 0)  # the harness's server
    api = f"{proxy.url}/api"
    try:
        proxy.fail_at(b"/api/v2/concurrency_limits/increment-with-lease ")  # the train step's `gpu` slot, the first
        # Prefect's client retries a cut connection 5 times, 2 to 32 s apart: a minute for each request after the
        # outage. Two retries keep this short and still ride out the harness's own 503s before it (SQLite busy: a
        # step's first request for its slot often gets one); the run after it keeps all five.
        first = _vlmops_run(outputs, api, storage, client_retries=2)
        assert proxy.stops == 1, first.stderr[-3000:]
        (failed,) = runs.iterdir()
        failed_files = sorted(p.name for p in failed.iterdir())
        proxy.start()
        second = _vlmops_run(outputs, api, storage)
    finally:
        proxy.stop()

    # The command's last words name the outage, its URL and the fix: run it again (a new flow run).
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    outage = rf"Prefect API at {re.escape(api)} did not answer: \w+: [^\n]+\n"
    assert re.search(
        rf"\nerror: {outage}start it \(or point PREFECT_API_URL at the server\), then run the command again\n\Z",
        first.stderr,
    ), first.stderr[-5000:]
    # The flow's own error (its log: a deployment's run shows it) names it too, and says why not a retry. It was a
    # ConnectError raised while the advice was written: the advice asked the API whether the run had a deployment.
    failed_run = (failed / "prefect_flow_run_id").read_text().strip()
    assert re.search(
        rf"\nvlmops\.outages\.ServiceUnavailable: {outage}start it \(or point PREFECT_API_URL at the server\), then start "
        rf"a new run: it reuses only the download and the validation\. Prefect may still show flow run {failed_run} "
        r"Running \(its end could not be recorded while the API was away\), and `prefect flow-run retry` refuses a run "
        r"that is not over\n",
        first.stderr,
    ), first.stderr[-5000:]
    assert _flow_run_state(failed_run) == "RUNNING"  # what Prefect shows of it, once the API is back
    # Nothing of the train step began: no half-written folder for a later run to take for its own.
    assert failed_files == ["config.yaml", "prefect_flow_run_id"]

    # The same command with the API back: a run of its own, which reuses the download and the validation.
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    (done,) = (p for p in runs.iterdir() if p != failed)
    states = task_states((done / "prefect_flow_run_id").read_text().strip())
    assert states["download_model"] == states["validate_dataset"] == ["Cached"], states
    assert states["train"] == states["merge"] == states["batch_infer"] == ["Completed"], states
    summary = json.loads((done / "summary.json").read_text())
    assert summary["run_dir"] == str(done) and summary["model_version"] == "1"
    client = MlflowClient(tracking_uri=f"sqlite:///{outputs}/mlflow.db")
    assert [str(v.version) for v in client.search_model_versions("name = 'vlmops-demo'")] == ["1"]
    rows = [json.loads(line) for line in (done / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [row["source"].rsplit(":", 1)[1] for row in rows] == [str(i) for i in range(1, NUM_EVAL + 1)]
